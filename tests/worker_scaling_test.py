"""Tests of `experiments.worker_scaling`: what the driver sends per round, counted from values.

The reference is the arrays themselves: the packed client values' and the initialized state's
`nbytes` (the module counts the state from its TFF type).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import tensorflow as tf

from experiments import worker_scaling
from mfl_tff.algorithms import builders
from mfl_tff.data import registry
from mfl_tff.training import rounds

pytestmark = pytest.mark.usefixtures("tff_local_execution")


@pytest.fixture(scope="module")
def task():
    return registry.get_task("sinusoid", seed=1)


def _nbytes(structure) -> int:
    return sum(np.asarray(a).nbytes for a in tf.nest.flatten(structure))


def test_driver_bytes_count_the_clients_once_and_the_state_per_worker_and_call(task):
    options = builders.AlgorithmOptions.from_settings(task.settings, cohort_size=3)
    process, spec = builders.build_algorithm("fedavg", task, options)
    values = rounds.round_values(task, spec, rounds.round_client_ids(task, 6, 1), 1)
    data, state = _nbytes(values), _nbytes(process.initialize())
    assert worker_scaling.driver_bytes_per_round(process, spec, values, 1) == data + state
    # Two workers: each gets the state.
    want = data + 2 * state
    assert worker_scaling.driver_bytes_per_round(process, spec, values, 2) == want
    # A two-phase round (mfl's) is two calls under several workers, one call on one worker.
    two_phases = dataclasses.replace(spec, phase_computations=(process.next, process.next))
    assert worker_scaling.driver_bytes_per_round(process, two_phases, values, 2) == 2 * want
    assert worker_scaling.driver_bytes_per_round(process, two_phases, values, 1) == data + state
