"""End-to-end smoke test of every built-in task: FedAvg trains, and no TFF worker is left behind.

For each task: build it by name with small options, pack a fixed set of training clients, run 5
FedAvg rounds inside `runtime.local_execution()`, and check that the training loss on those clients
falls. The loss is measured on the same clients by an extra round's `client_work/train_loss`
metric, which is taken at the round's incoming model (so round 1 reports theta_0 and round 6
reports theta_5).
"""

from __future__ import annotations

import numpy as np
import pytest

from mfl_tff.algorithms import fedavg
from mfl_tff.data import registry
from mfl_tff.training import runtime

ROUNDS = 5
NUM_CLIENTS = 3

# name -> (options, client learning rate)
TASKS = {
    "digits": (dict(num_train_clients=6, num_eval_clients=3), 0.1),
    "digits_fewshot": (dict(num_train_clients=8, num_eval_clients=3), 0.1),
    "sinusoid": (dict(num_train_clients=8, num_eval_clients=3), 0.01),
    "synthetic": (dict(num_train_clients=6, num_eval_clients=3), 0.01),
    "emnist": (dict(num_eval_clients=3), 0.05),
}


def test_every_registered_task_is_covered():
    assert set(TASKS) == set(registry.task_names())


@pytest.mark.parametrize("name", sorted(TASKS))
def test_fedavg_trains_on_builtin_task_and_stops_its_worker(name, emnist_dir):
    options, learning_rate = TASKS[name]
    if name == "emnist":
        options = dict(options, data_cache_dir=emnist_dir[0])
    task = registry.get_task(name, **options)
    clients = task.train_clients(task.train_data.client_ids[:NUM_CLIENTS])
    losses = []
    before = set(runtime.live_worker_pids())  # background jobs may run workers of their own
    with runtime.local_execution():
        process = fedavg.build_fedavg(
            task.model_fn, task.client_data_type(), client_learning_rate=learning_rate
        )
        state = process.initialize()
        for _ in range(ROUNDS + 1):
            output = process.next(state, clients)
            state = output.state
            losses.append(float(output.metrics["client_work"]["train_loss"]))
            assert output.metrics["client_work"]["num_clients"] == NUM_CLIENTS
            assert output.metrics["client_work"]["num_clients_rejected"] == 0
    assert set(runtime.live_worker_pids()) <= before
    print(f"{name} train loss by round: {np.round(losses, 3)}")
    assert np.all(np.isfinite(losses))
    assert losses[-1] < losses[0], losses
