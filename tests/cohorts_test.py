"""Tests of `mfl_tff.algorithms.cohorts`: stacked clients give the unstacked run's results.

Five digits clients of different sizes in cohorts of 3 (so the second cohort is padded with an
empty client), against the same five clients one per federated client: FedAvg (one pass) and MFL
(two phases, learned alpha) after three rounds, metrics included, and a non-finite client inside a
cohort is rejected alone; each with the cohort's clients in a loop and vectorized.
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from mfl_tff.algorithms import builders, cohorts
from mfl_tff.data import digits, packing
from tests import testing

CLIENTS = 5
COHORT = 3
ROUNDS = 3
TOLERANCE = 1e-5

pytestmark = pytest.mark.usefixtures("tff_local_execution")


@pytest.fixture(scope="module")
def task():
    return digits.build_digits(num_train_clients=10, num_eval_clients=1)


@pytest.fixture(scope="module")
def clients(task):
    packed = task.train_clients(task.train_data.client_ids[:CLIENTS])
    assert len({packing.num_examples(c) for c in packed}) > 1
    return packed


OPTIONS = {
    "fedavg": dict(inner_lr=0.1),
    "mfl": dict(inner_lr=0.1, inner_steps=1, meta_lr=0.01),
}


@pytest.fixture(scope="module")
def built(task):
    """`built(name, cohort_size, vectorize) -> (process, spec)`, each built once: a build costs
    seconds (MFL with vectorized cohorts the most: both its phases are converted), a round a
    fraction of one."""
    cache = {}

    def get(name, cohort_size, vectorize=False):
        key = name, cohort_size, vectorize
        if key not in cache:
            options = builders.AlgorithmOptions(
                cohort_size=cohort_size, vectorize_cohorts=vectorize, **OPTIONS[name]
            )
            cache[key] = builders.build_algorithm(name, task, options)
        return cache[key]

    return get


def _run(built, name, cohort_size, clients, vectorize=False):
    process, spec = built(name, cohort_size, vectorize)
    values = spec.client_values(clients)
    state = process.initialize()
    for _ in range(ROUNDS):
        output = process.next(state, values)
        state = output.state
    return process, state, output.metrics


def _max_diff(a, b) -> float:
    return max(
        float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
        for x, y in zip(tf.nest.flatten(a), tf.nest.flatten(b))
    )


def test_vectorize_cohorts_must_be_a_bool(task):
    with pytest.raises(TypeError, match="vectorize_cohorts must be True or False"):
        builders.build_algorithm(
            "fedavg", task, builders.AlgorithmOptions(cohort_size=2, vectorize_cohorts="yes")
        )


def test_make_cohorts_pads_the_last_cohort_with_empty_clients(clients):
    stacked = cohorts.make_cohorts(clients, COHORT)
    assert len(stacked) == 2
    assert stacked[0]["support"]["x"].shape[0] == COHORT
    np.testing.assert_array_equal(stacked[1]["support"]["x"][1], clients[4]["support"]["x"])
    assert not np.any(stacked[1]["support"]["mask"][2]) and not np.any(
        stacked[1]["query"]["mask"][2]
    )
    with pytest.raises(ValueError, match="cohort_size"):
        cohorts.make_cohorts(clients, 0)


@pytest.mark.parametrize("vectorize", [False, True])
@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_cohorts_equal_the_unstacked_run(built, clients, name, vectorize):
    process, stacked_state, stacked_metrics = _run(built, name, COHORT, clients, vectorize)
    _, state, metrics = _run(built, name, None, clients)
    ours = process.get_model_weights(stacked_state).trainable
    reference = process.get_model_weights(state).trainable
    initial = process.get_model_weights(process.initialize()).trainable
    assert _max_diff(reference, initial) > 1e-3  # it trained
    assert _max_diff(ours, reference) <= TOLERANCE
    if name == "mfl":
        assert _max_diff(process.get_hparams(stacked_state), process.get_hparams(state)) <= 1e-6
    # Metrics too: counts exactly (padding clients are not counted), averages closely.
    flat_stacked, flat = tf.nest.flatten(stacked_metrics), tf.nest.flatten(metrics)
    assert len(flat_stacked) == len(flat)
    np.testing.assert_allclose(flat_stacked, flat, rtol=1e-4, atol=1e-6)
    work = metrics["client_work"] if name == "fedavg" else metrics["adaptive_client_work"]
    assert work["num_clients"] == CLIENTS


@pytest.mark.parametrize("vectorize", [False, True])
def test_non_finite_client_in_a_cohort_is_rejected_alone(built, clients, vectorize):
    poisoned = [testing.copy_client(c) for c in clients]
    poisoned[1]["support"]["x"][0, 0, 3, 3] = np.nan
    process, stacked_state, stacked_metrics = _run(built, "fedavg", COHORT, poisoned, vectorize)
    _, state, _ = _run(built, "fedavg", None, [c for i, c in enumerate(clients) if i != 1])
    assert stacked_metrics["client_work"]["num_clients_rejected"] == 1
    assert stacked_metrics["client_work"]["num_clients"] == CLIENTS
    ours = process.get_model_weights(stacked_state).trainable
    assert all(np.all(np.isfinite(w)) for w in ours)
    assert _max_diff(ours, process.get_model_weights(state).trainable) <= TOLERANCE
