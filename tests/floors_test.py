"""Tests of `experiments.floors`: the plain-TensorFlow floor computes the same round as our
process (the reference is the TFF process itself, which is tested against `tff.learning`)."""

from __future__ import annotations

import dataclasses

import pytest

from experiments import benchmarking as bm
from experiments import floors
from mfl_tff.algorithms import builders
from tests import testing

CLIENTS = 3
ROUNDS = 2
TOLERANCE = 1e-5

pytestmark = pytest.mark.usefixtures("tff_local_execution")


@pytest.fixture(scope="module")
def rounds(small_digits_task):
    return bm.pack_rounds(small_digits_task, CLIENTS, ROUNDS)


# The floor composes any record the same way; mfl covers its paths: two phases, both streams,
# the second phase seeing the alpha the first stepped. A one-phase record (meta_sgd, fedavg,
# reptile) differs only in its client function and server optimizer; each further case costs
# 15-30 s of compilation the suite's time budget does not have.
@pytest.mark.parametrize(
    "name, options",
    [("mfl", builders.AlgorithmOptions(inner_lr=0.1, inner_steps=1, meta_lr=0.01))],
)
def test_floor_round_equals_our_process(small_digits_task, rounds, name, options):
    floor = floors.TFFloor(name, small_digits_task, options, rounds[0])
    initial = floor.weights()
    process, spec = builders.build_algorithm(
        name, small_digits_task, dataclasses.replace(options, cohort_size=CLIENTS)
    )
    state = process.initialize()
    for clients in rounds:
        floor.run_round(floor.feed(clients))
        state = process.next(state, spec.client_values(clients)).state
    ours = process.get_model_weights(state).trainable
    assert testing.max_abs_diff(floor.weights(), initial) > 1e-3  # it trained
    assert testing.max_abs_diff(floor.weights(), ours) <= TOLERANCE
    floor.close()


def test_floor_names_the_choices_for_an_unknown_algorithm(small_digits_task, rounds):
    with pytest.raises(ValueError, match="choose one of: fedavg"):
        floors.TFFloor(
            "no_such_algorithm", small_digits_task, builders.AlgorithmOptions(), rounds[0]
        )
