"""Tests of `mfl_tff.training.rounds`: the one round loop, and several rounds per TFF call.

The reference for the multi-round computation is the plain loop of separate `process.next` calls
on the same rounds' clients: the states (theta and alpha) and every round's metrics must agree to
1e-6.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_federated as tff

from mfl_tff.algorithms import builders
from mfl_tff.data import digits
from mfl_tff.training import rounds

CLIENTS = 4
TOLERANCE = 1e-6


@pytest.fixture(scope="module", autouse=True)
def execution(tff_local_execution):
    yield


@pytest.fixture(scope="module")
def task():
    return digits.build_digits_fewshot(num_eval_clients=2, seed=1)


@pytest.fixture(scope="module", params=["fedavg", "mfl"])
def built(request, task):
    options = builders.AlgorithmOptions(inner_lr=0.4, inner_steps=1)
    return builders.build_algorithm(request.param, task, options)


@pytest.fixture(scope="module")
def multi(built):
    """Two rounds per call: one compiled computation shared by the tests of a process."""
    return rounds.MultiRound(built[0], 2)


def _flat(structure):
    return [np.asarray(v, np.float64) for v in tf.nest.flatten(structure)]


def _max_diff(a, b) -> float:
    flat_a, flat_b = _flat(a), _flat(b)
    assert len(flat_a) == len(flat_b)
    return max(float(np.max(np.abs(x - y))) for x, y in zip(flat_a, flat_b))


def _separate_calls(process, spec, task, round_nums):
    state, metrics = process.initialize(), []
    for r in round_nums:
        ids = task.sample_train_ids(CLIENTS, r)
        output = process.next(state, spec.client_values(task.train_clients(ids, r)))
        state = output.state
        metrics.append(output.metrics)
    return state, metrics


def _learned(process, state):
    values = [process.get_model_weights(state).trainable]
    if "alpha" in process.get_hparams(state):
        values.append(process.get_hparams(state)["alpha"])
    return values


def _metric_values(metrics):
    flat = tff.program.structure_utils.flatten_with_name(metrics)
    return {k: float(v) for k, v in flat if np.ndim(v) == 0}


def test_run_round_trains_the_clients_of_seed_and_round(built, task):
    process, spec = built
    result = rounds.run_round(process, spec, task, process.initialize(), 3, CLIENTS)
    assert result.client_ids == task.sample_train_ids(CLIENTS, 3)
    reference, _ = _separate_calls(process, spec, task, [3])
    assert _max_diff(_learned(process, result.state), _learned(process, reference)) == 0.0


def test_two_rounds_in_one_call_equal_two_calls(built, multi, task):
    process, spec = built
    values = [rounds.round_values(task, spec, task.sample_train_ids(CLIENTS, r), r) for r in (1, 2)]
    state, metrics = multi(process.initialize(), values)
    reference, reference_metrics = _separate_calls(process, spec, task, [1, 2])
    initial = _learned(process, process.initialize())
    assert _max_diff(_learned(process, reference), initial) > 1e-3  # it trained
    assert _max_diff(_learned(process, state), _learned(process, reference)) <= TOLERANCE
    assert len(metrics) == 2
    for ours, theirs in zip(metrics, reference_metrics):
        ours, theirs = _metric_values(ours), _metric_values(theirs)
        assert ours.keys() == theirs.keys()
        for name in ours:
            assert abs(ours[name] - theirs[name]) <= 1e-5 * max(1.0, abs(theirs[name])), name


def test_run_rounds_cuts_calls_where_the_state_is_needed(built, multi, task):
    process, spec = built
    seen = []
    state = rounds.run_rounds(
        process,
        spec,
        task,
        clients_per_round=CLIENTS,
        rounds=range(1, 6),
        multi_round=multi,
        state_needed=lambda r: r == 3,
        after_round=lambda result: seen.append((result.round_num, result.state is not None)),
    )
    # Calls: rounds (1, 2), then 3 alone (cut: its state is needed), then (4, 5).
    assert seen == [(1, False), (2, True), (3, True), (4, False), (5, True)]
    reference, _ = _separate_calls(process, spec, task, range(1, 6))
    assert _max_diff(_learned(process, state), _learned(process, reference)) <= TOLERANCE


class _TaskFailingAt:
    """The task, except that packing round `bad_round` raises; records the packing threads."""

    def __init__(self, task, bad_round: int):
        self._task, self._bad_round, self.threads = task, bad_round, set()

    def __getattr__(self, name):
        return getattr(self._task, name)

    def train_clients(self, client_ids, round_num=None):
        self.threads.add(threading.current_thread().name)
        if round_num == self._bad_round:
            raise ValueError(f"no data for round {round_num}")
        return self._task.train_clients(client_ids, round_num)


def test_run_rounds_packs_ahead_and_stops_at_a_packing_error(built, multi, task):
    process, spec = built
    failing = _TaskFailingAt(task, bad_round=4)
    seen = []
    with pytest.raises(ValueError, match="no data for round 4"):
        rounds.run_rounds(
            process,
            spec,
            failing,
            clients_per_round=CLIENTS,
            rounds=range(1, 7),
            multi_round=multi,
            after_round=lambda result: seen.append(result.round_num),
        )
    # Rounds (1, 2) ran and were reported; the call of (3, 4) never started.
    assert seen == [1, 2]
    assert failing.threads and all(name.startswith("mfl-pack") for name in failing.threads)


def test_multi_round_refuses_a_bad_count(built, multi):
    process, _ = built
    with pytest.raises(ValueError, match="rounds_per_call"):
        rounds.MultiRound(process, 0)
    with pytest.raises(ValueError, match="Expected 2 rounds"):
        multi(process.initialize(), [[]])


def test_a_round_run_phase_by_phase_equals_one_call(built, task):
    process, spec = built
    if not spec.phase_computations:
        assert built[1].name == "fedavg"  # One phase: nothing to split.
        return
    by_phase, by_phase_metrics = process.initialize(), []
    for r in (1, 2):
        result = rounds.run_round(process, spec, task, by_phase, r, CLIENTS, by_phase=True)
        by_phase = result.state
        by_phase_metrics.append(result.metrics)
    reference, reference_metrics = _separate_calls(process, spec, task, [1, 2])
    assert _max_diff(_learned(process, by_phase), _learned(process, reference)) <= TOLERANCE
    assert _max_diff(by_phase, reference) <= TOLERANCE  # optimizer and aggregator states too
    for ours, theirs in zip(by_phase_metrics, reference_metrics):
        ours, theirs = _metric_values(ours), _metric_values(theirs)
        assert list(ours) == list(theirs)  # same names, same order
        for name in ours:
            assert abs(ours[name] - theirs[name]) <= 1e-5 * max(1.0, abs(theirs[name])), name
