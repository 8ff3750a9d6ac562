"""Tests of several TFF workers sharing each round's clients (`mfl_tff.training.multi_worker`).

The workers are `worker_binary`s on loopback ports that this module starts and stops itself.
What matters: the result equals one machine's (mfl's two-phase round too, run phase by phase), a
computation that cannot be split is refused rather than run on one worker, and a worker lost
mid-run fails the round naming it instead of merging the other workers' partial aggregates.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator

import numpy as np
import portpicker
import pytest
import tensorflow_federated as tff

from mfl_tff.algorithms import builders
from mfl_tff.data import registry
from mfl_tff.training import multi_worker, rounds, runtime
from tests import testing

ROUNDS = 3
CLIENTS_PER_ROUND = 6
# Short, so that the dead-worker test ends quickly; a healthy loopback worker answers in ms.
TIMEOUT_S = 2.0


@pytest.fixture(scope="module")
def workers() -> Iterator[tuple[runtime.WorkerService, runtime.WorkerService]]:
    """Two loopback workers of this module, stopped (only they) after it."""
    started: list[runtime.WorkerService] = []
    try:
        started.append(runtime.WorkerService())
        started.append(runtime.WorkerService())
        yield started[0], started[1]
    finally:
        for service in started:
            service.stop()


@pytest.fixture(scope="module")
def task():
    return registry.get_task("sinusoid", seed=3)


# Few-shot digits with their images on the workers (`data_on_workers`): the driver sends indices,
# each worker gathers its clients' images. In cohorts, one per worker. Its one-machine reference
# is the default task, whose driver sends the images.
ON_WORKERS = "fedavg_data_on_workers"
ON_WORKERS_OPTIONS = builders.AlgorithmOptions(cohort_size=CLIENTS_PER_ROUND // 2)


@pytest.fixture(scope="module")
def fewshot() -> tuple:
    """digits_fewshot by default and with its data on the workers."""
    options = dict(num_train_clients=40, num_eval_clients=2)
    return (
        registry.get_task("digits_fewshot", **options),
        registry.get_task("digits_fewshot", data_on_workers=True, **options),
    )


@pytest.fixture(scope="module")
def built(task, fewshot) -> dict:
    # fedavg: one phase, one stream; mfl: two phases and both streams (meta_sgd's one phase
    # feeding both streams goes through the same split and merge).
    built = {name: builders.build_algorithm(name, task) for name in ("fedavg", "mfl")}
    built[ON_WORKERS] = builders.build_algorithm("fedavg", fewshot[1], ON_WORKERS_OPTIONS)
    return built


def _train(process, spec, task, state=None, first: int = 1):
    """Rounds `first`..ROUNDS from `state` (None: initialize) in the installed context."""
    return rounds.run_rounds(
        process,
        spec,
        task,
        clients_per_round=CLIENTS_PER_ROUND,
        rounds=range(first, ROUNDS + 1),
        state=state,
    )


@pytest.fixture(scope="module")
def one_machine(built, task, fewshot) -> dict:
    """The final (model, alpha) of each algorithm trained on one local worker."""
    with runtime.local_execution():
        want = {
            name: testing.model_and_meta(process, _train(process, spec, task))
            for name, (process, spec) in built.items()
            if name != ON_WORKERS
        }
        process, spec = builders.build_algorithm("fedavg", fewshot[0], ON_WORKERS_OPTIONS)
        want[ON_WORKERS] = testing.model_and_meta(process, _train(process, spec, fewshot[0]))
        return want


def _assert_equal_to(want, process, state) -> float:
    (want_theta, want_alpha), (theta, alpha) = want, testing.model_and_meta(process, state)
    worst = float(np.max(np.abs(theta - want_theta)))
    if want_alpha is not None:
        worst = max(worst, float(np.max(np.abs(alpha - want_alpha))))
    assert worst <= 1e-6, f"several workers and one machine differ by {worst}"
    return worst


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", ["fedavg", "mfl", ON_WORKERS])
def test_two_workers_equal_one_machine(name, workers, built, task, fewshot, one_machine):
    # mfl's round aggregates twice, the second time on the first's result: under several
    # workers it runs as its two phase computations (`rounds.next_round`), each split.
    process, spec = built[name]
    targets = [service.target for service in workers]
    with runtime.remote_execution(targets, timeout_s=TIMEOUT_S) as context:
        assert isinstance(context, multi_worker.MultiWorkerContext)
        state = _train(process, spec, fewshot[1] if name == ON_WORKERS else task)
        calls = context.calls_per_worker
    worst = _assert_equal_to(one_machine[name], process, state)
    print(f"{name}: max |two workers - one machine| = {worst:.3g}; calls per worker {calls}")
    # Each round's clients really were shared: both workers ran part of every round (phase).
    phases = max(1, len(spec.phase_computations))
    assert all(count >= ROUNDS * phases for count in calls.values()), calls
    # The workers belong to this module: using them must not stop them.
    assert all(service.running for service in workers)


def test_one_target_takes_the_single_worker_path(workers):
    @tff.federated_computation(tff.FederatedType(np.float32, tff.CLIENTS))
    def total(values):
        return tff.federated_sum(values)

    for target in (workers[0].target, [workers[0].target]):
        with runtime.remote_execution(target, timeout_s=TIMEOUT_S) as context:
            assert isinstance(context, tff.framework.SyncExecutionContext)
            assert total([1.0, 2.0, 3.0]) == pytest.approx(6.0)


def test_per_client_results_run_on_the_first_worker_in_client_order(workers):
    # TFF 0.87's mergeable context joins per-client results in the order the workers finish, so
    # a computation returning them (the personalization evaluation) runs whole on one worker.
    @tff.tensorflow.computation(np.int32)
    def double(x):
        return x * 2

    @tff.federated_computation(tff.FederatedType(np.int32, tff.CLIENTS))
    def per_client(values):
        return tff.federated_map(double, values)

    targets = [service.target for service in workers]
    with runtime.remote_execution(targets, timeout_s=TIMEOUT_S) as context:
        before = context.calls_per_worker
        assert per_client(list(range(8))) == [2 * i for i in range(8)]
        after = context.calls_per_worker
    assert after[targets[0]] == before[targets[0]] + 1
    assert after[targets[1]] == before[targets[1]]


def test_computation_without_clients_runs_on_the_first_worker(workers, built):
    process, _ = built["fedavg"]
    targets = [service.target for service in workers]
    with runtime.remote_execution(targets, timeout_s=TIMEOUT_S) as context:
        state = process.initialize()
        process.get_model_weights(state)
        calls = context.calls_per_worker
    assert calls == {targets[0]: 2, targets[1]: 0}


def test_dependent_aggregations_are_refused_not_run_on_one_worker(workers, built, task):
    # Two rounds in one computation: the second round's aggregation consumes the first's.
    process, spec = built["fedavg"]
    two_rounds = rounds.MultiRound(process, 2)
    with pytest.raises(multi_worker.NotMergeableError, match="one worker"):
        multi_worker.check_mergeable(two_rounds.computation)
    targets = [service.target for service in workers]
    ids = rounds.round_client_ids(task, CLIENTS_PER_ROUND, 1)
    values = rounds.round_values(task, spec, ids, 1)
    with runtime.remote_execution(targets, timeout_s=TIMEOUT_S) as context:
        state = process.initialize()
        with pytest.raises(multi_worker.NotMergeableError, match="aggregations consumes another"):
            two_rounds(state, [values, values])
        assert context.calls_per_worker[targets[1]] == 0


def test_mfl_round_splits_into_mergeable_phases(built):
    process, spec = built["mfl"]
    with pytest.raises(multi_worker.NotMergeableError):
        multi_worker.check_mergeable(process.next)
    assert len(spec.phase_computations) == 2
    for phase in spec.phase_computations:
        multi_worker.check_mergeable(phase)
    rounds.check_splittable(process, spec)  # What the binaries check before training.


def test_unanswering_worker_is_named_before_anything_runs(workers):
    silent = f"localhost:{portpicker.pick_unused_port()}"
    started = time.monotonic()
    with pytest.raises(ConnectionError, match=silent):
        with runtime.remote_execution([workers[0].target, silent], timeout_s=TIMEOUT_S):
            pytest.fail("entered the block with a worker that does not answer")
    assert time.monotonic() - started < 10


@pytest.mark.parametrize(
    "targets, named",
    [
        (["localhost:8000", "localhost"], "'localhost'"),
        (["localhost:8000", "h:70000"], "'h:70000'"),
        (["localhost:8000", "localhost:8000"], "localhost:8000 is listed twice"),
    ],
)
def test_bad_target_lists_name_the_culprit(targets, named):
    with pytest.raises(ValueError, match=named):
        with runtime.remote_execution(targets, timeout_s=TIMEOUT_S):
            pytest.fail("entered the block with a bad target")


def test_parse_targets_reads_comma_separated_lists():
    assert multi_worker.parse_targets("a:1, b:2") == ["a:1", "b:2"]
    assert multi_worker.parse_targets(["[::1]:8000"]) == ["[::1]:8000"]


@pytest.mark.parametrize(
    "cohort, clients, num_workers, want",
    [(25, 20, 1, 20), (25, 20, 2, 10), (25, 20, 3, 7), (4, 20, 2, 4), (0, 20, 2, None)],
)
def test_cohorts_leave_every_worker_its_share(cohort, clients, num_workers, want):
    assert multi_worker.cohort_size_for(cohort, clients, num_workers) == want


def _kill(service: runtime.WorkerService) -> None:
    os.kill(service.pid, signal.SIGKILL)
    service.stop()  # Reaps it.


@pytest.mark.timeout(120)
def test_lost_worker_is_retried_on_its_port_or_fails_the_round_naming_it(built, task, one_machine):
    # Workers of this test only, as it kills one. TFF retries a failed slice on its own worker,
    # never on another: a worker back on its port is used again, one that stays away fails the
    # whole round (the other worker's partial aggregate is dropped, never applied).
    process, spec = built["fedavg"]

    def train_round(state, round_num: int):
        return rounds.run_round(process, spec, task, state, round_num, CLIENTS_PER_ROUND).state

    with runtime.WorkerService() as first, runtime.WorkerService() as second:
        port = second.port
        with runtime.remote_execution([first.target, second.target], timeout_s=TIMEOUT_S):
            state = train_round(process.initialize(), 1)
            # Restarted by its operator between rounds: the next round's slice fails on the old
            # executor, and TFF's retry makes a new one on the new process.
            _kill(second)
            with runtime.WorkerService(port=port) as restarted:
                state = train_round(state, 2)
                _kill(restarted)
            started = time.monotonic()
            with pytest.raises(ConnectionError, match=f"localhost:{port}"):
                train_round(state, 3)
            assert time.monotonic() - started < 30
            # Back again: round 3 reruns from the state of round 2, and the run ends exactly where
            # one machine's does.
            with runtime.WorkerService(port=port):
                state = train_round(state, 3)
    _assert_equal_to(one_machine["fedavg"], process, state)
