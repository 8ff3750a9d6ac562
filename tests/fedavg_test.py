"""Tests of `mfl_tff.algorithms.fedavg.build_fedavg` against TFF's own FedAvg.

The reference is `tff.learning.algorithms.build_weighted_fed_avg` (client SGD at the same rate,
server SGD 1.0, the same FunctionalModel) fed the same clients as `tf.data` datasets: the real
examples of the packed support part, then those of the query part, batch for batch. Clients are
digits clients of different sizes, so packing pads partial batches and whole batches.
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_federated as tff

from mfl_tff.algorithms import fedavg
from mfl_tff.data import digits, packing

LR = 0.1
ROUNDS = 3
# Clients 0, 1, 3, 4 of this partition hold 80, 25, 19 and 37 packed examples (support and query
# both padded, some batches wholly padding).
CLIENT_INDICES = (0, 1, 3, 4)
TOLERANCE = 1e-5

# Measured max |difference| over all weights, printed for the report with `pytest -s`.
MEASURED: dict[str, float] = {}


@pytest.fixture(scope="module", autouse=True)
def execution(tff_local_execution):
    """Every computation of this module runs on a worker we own, stopped afterwards."""
    yield
    for name, value in MEASURED.items():
        print(f"fedavg_test max abs diff {name}: {value:.3g}")


@pytest.fixture(scope="module")
def task():
    return digits.build_digits(num_train_clients=40, num_eval_clients=3)


@pytest.fixture(scope="module")
def clients(task):
    ids = [task.train_data.client_ids[i] for i in CLIENT_INDICES]
    packed = task.train_clients(ids)
    sizes = [packing.num_examples(c) for c in packed]
    assert len(set(sizes)) == len(sizes), sizes  # different sizes...
    assert min(sizes) < 80  # ...and padding
    return packed


def as_dataset(client) -> tf.data.Dataset:
    return packing.to_dataset(client["support"]).concatenate(packing.to_dataset(client["query"]))


def make_process(task, local_epochs=1):
    return fedavg.build_fedavg(
        task.model_fn,
        task.client_data_type(),
        problem=task.problem,
        client_learning_rate=LR,
        local_epochs=local_epochs,
    )


@pytest.fixture(scope="module")
def process(task):
    return make_process(task)


@pytest.fixture(scope="module")
def process_two_epochs(task):
    return make_process(task, local_epochs=2)


@pytest.fixture(scope="module")
def tff_fedavg(task):
    return tff.learning.algorithms.build_weighted_fed_avg(
        task.model_fn(),
        client_optimizer_fn=tff.learning.optimizers.build_sgdm(learning_rate=LR),
        server_optimizer_fn=tff.learning.optimizers.build_sgdm(learning_rate=1.0),
    )


def run(process, client_values, rounds):
    state = process.initialize()
    outputs = []
    for _ in range(rounds):
        output = process.next(state, client_values)
        state = output.state
        outputs.append(output)
    return process.get_model_weights(state), outputs


def max_abs_diff(a, b) -> float:
    return max(
        float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
        for x, y in zip(a.trainable, b.trainable)
    )


def test_initial_weights_are_the_model_functions(process, task):
    weights = process.get_model_weights(process.initialize())
    expected = task.model_fn().initial_weights[0]
    assert len(weights.trainable) == len(expected)
    for w, e in zip(weights.trainable, expected):
        np.testing.assert_array_equal(w, e)


def test_three_rounds_equal_tff_weighted_fed_avg(process, tff_fedavg, clients):
    ours, outputs = run(process, clients, ROUNDS)
    reference, _ = run(tff_fedavg, [as_dataset(c) for c in clients], ROUNDS)
    initial = process.get_model_weights(process.initialize())
    assert max_abs_diff(ours, initial) > 1e-2  # it did train
    diff = max_abs_diff(ours, reference)
    MEASURED["3 rounds, 1 epoch"] = diff
    assert diff <= TOLERANCE
    metrics = outputs[-1].metrics["client_work"]
    assert metrics["num_clients"] == len(clients)
    assert metrics["num_examples"] == sum(packing.num_examples(c) for c in clients)
    assert metrics["num_clients_rejected"] == 0


def test_two_local_epochs_equal_tff_on_repeated_datasets(process_two_epochs, tff_fedavg, clients):
    ours, _ = run(process_two_epochs, clients, ROUNDS)
    reference, _ = run(tff_fedavg, [as_dataset(c).repeat(2) for c in clients], ROUNDS)
    one_epoch, _ = run(tff_fedavg, [as_dataset(c) for c in clients], ROUNDS)
    assert max_abs_diff(reference, one_epoch) > 1e-3  # the second epoch matters
    diff = max_abs_diff(ours, reference)
    MEASURED["3 rounds, 2 epochs"] = diff
    assert diff <= TOLERANCE


def _initial_loss(task, weights, client) -> tuple[float, int]:
    """Mean cross-entropy of a client's real examples, in plain TensorFlow (float64)."""
    xs, ys = [], []
    for part in ("support", "query"):
        keep = client[part]["mask"].reshape(-1) > 0
        xs.append(client[part]["x"].reshape(-1, 64)[keep])
        ys.append(client[part]["y"].reshape(-1)[keep])
    h = tf.constant(np.concatenate(xs), tf.float64)
    trainable = [tf.constant(w, tf.float64) for w in weights.trainable]
    for i in range(0, len(trainable), 2):
        h = tf.matmul(h, trainable[i]) + trainable[i + 1]
        if i + 2 < len(trainable):
            h = tf.nn.relu(h)
    y = np.concatenate(ys)
    loss = tf.reduce_logsumexp(h, axis=1) - tf.gather(h, y, batch_dims=1)
    return float(tf.reduce_mean(loss)), len(y)


def test_train_loss_metric_is_weighted_mean_of_clients_initial_losses(process, task, clients):
    state = process.initialize()
    weights = process.get_model_weights(state)
    metrics = process.next(state, clients).metrics["client_work"]
    losses_and_sizes = [_initial_loss(task, weights, c) for c in clients]
    expected = sum(loss * n for loss, n in losses_and_sizes) / sum(n for _, n in losses_and_sizes)
    np.testing.assert_allclose(metrics["train_loss"], expected, rtol=1e-5)


def with_nan_input(client):
    poisoned = tf.nest.map_structure(np.copy, client)
    poisoned["support"]["x"][0, 0, 3, 3] = np.nan  # a real example (batches fill front first)
    return poisoned


def test_non_finite_client_is_rejected_not_averaged(process, tff_fedavg, clients):
    poisoned = [clients[0], with_nan_input(clients[1]), clients[2], clients[3]]
    ours, outputs = run(process, poisoned, 2)
    others = [clients[0], clients[2], clients[3]]
    reference, _ = run(tff_fedavg, [as_dataset(c) for c in others], 2)
    assert all(np.all(np.isfinite(w)) for w in ours.trainable)
    diff = max_abs_diff(ours, reference)
    MEASURED["NaN client rejected, 2 rounds"] = diff
    assert diff <= TOLERANCE
    for output in outputs:
        metrics = output.metrics["client_work"]
        assert metrics["num_clients_rejected"] == 1
        assert np.isfinite(metrics["train_loss"])
        assert output.metrics["finalizer"]["update_non_finite"] == 0


@pytest.mark.parametrize(
    "options, error, message",
    [
        (dict(client_learning_rate=0.0), ValueError, "client_learning_rate"),
        (dict(client_learning_rate=float("nan")), ValueError, "client_learning_rate"),
        (dict(local_epochs=0), ValueError, "local_epochs"),
        (dict(local_epochs=1.5), ValueError, "local_epochs"),
        (dict(server_optimizer=tf.keras.optimizers.SGD()), TypeError, "tff.learning.optimizers"),
        (dict(model_aggregator=tff.aggregators.MeanFactory), TypeError, "Weighted"),
    ],
)
def test_bad_options_raise_actionable_errors(task, options, error, message):
    with pytest.raises(error, match=message):
        fedavg.build_fedavg(task.model_fn, task.client_data_type(), problem=task.problem, **options)
