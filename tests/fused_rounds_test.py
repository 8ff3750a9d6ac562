"""Tests of `mfl_tff.training.fused_rounds`: a round compiled to TFF's MapReduceForm.

The reference is the round as composed, `process.next`, run by the same runtime: the fused round
must give the same state and metrics (to 1e-6; in practice bit for bit), with the same Python
containers, in fewer intrinsic calls. Rounds of two phases (mfl), per-client aggregators (robust)
and secure sums (simulated) each take another path through the compiler.
"""

from __future__ import annotations

import collections
import dataclasses

import attrs
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_federated as tff

from experiments import round_anatomy
from mfl_tff.algorithms import aggregation, builders
from mfl_tff.data import digits
from mfl_tff.training import fused_rounds, rounds, runtime

CLIENTS = 4
TOLERANCE = 1e-6


@pytest.fixture(scope="module", autouse=True)
def execution():
    """A worker of our own (secure sums simulated, for the secure case), stopped after."""
    before = set(runtime.live_worker_pids())
    with runtime.local_execution(simulate_secure_sums=True):
        yield
    assert set(runtime.live_worker_pids()) <= before


@pytest.fixture(scope="module")
def task():
    return digits.build_digits_fewshot(num_eval_clients=2, seed=1)


def _options(**kwargs) -> builders.AlgorithmOptions:
    return dataclasses.replace(builders.AlgorithmOptions(inner_lr=0.4, inner_steps=1), **kwargs)


def _aggregators(kind: str, learns_alpha: bool) -> dict:
    made = aggregation.build_aggregators(kind, learns_alpha=learns_alpha)
    return dict(model_aggregator=made.model, meta_aggregator=made.meta)


# One-phase rounds with the mean are also fused in test_run_rounds_with_a_fused_round_... (fedavg).
CASES = {
    "mfl_two_phases": ("mfl", {}),
    "meta_sgd_conditioned_robust": (
        "meta_sgd",
        dict(meta_model="conditioned", inner_steps=2, **_aggregators("robust", True)),
    ),
    "fedavg_secure": ("fedavg", _aggregators("secure", False)),
}


@pytest.fixture(scope="module")
def builds(task):
    """Each case's (process, spec, fused round), built once for the module (builds take seconds)."""
    made = {}

    def build(case: str) -> tuple:
        if case not in made:
            name, options = CASES[case]
            process, spec = builders.build_algorithm(name, task, _options(**options))
            made[case] = (process, spec, fused_rounds.fuse(process, spec.phase_computations))
        return made[case]

    return build


@pytest.fixture(scope="module", params=sorted(CASES))
def built(request, builds):
    return builds(request.param)


def _values(task, spec, round_num: int) -> list:
    return spec.client_values(
        task.train_clients(task.sample_train_ids(CLIENTS, round_num), round_num)
    )


def _max_diff(a, b) -> float:
    tf.nest.assert_same_structure(a, b, check_types=True)
    pairs = zip(tf.nest.flatten(a), tf.nest.flatten(b))
    return max(float(np.max(np.abs(np.asarray(x, np.float64) - y))) for x, y in pairs)


def test_fused_rounds_equal_the_composed_rounds(built, task):
    process, spec, fused = built
    state = fused_state = process.initialize()
    for round_num in (1, 2):
        values = _values(task, spec, round_num)
        output = process.next(state, values)
        fused_state, fused_metrics = fused(fused_state, values)
        assert _max_diff(output.metrics, fused_metrics) <= TOLERANCE
        assert _max_diff(output.state, fused_state) <= TOLERANCE
        state = output.state
    # The fused state is a state of the process: its own computations take it.
    weights = process.get_model_weights(fused_state)
    assert _max_diff(process.get_model_weights(state), weights) <= TOLERANCE


def test_fused_rounds_take_fewer_steps_of_the_executor(built):
    process, _, fused = built
    fused_calls = round_anatomy.intrinsic_calls(fused.computation)["intrinsic_calls"]
    composed_calls = round_anatomy.intrinsic_calls(process.next)["intrinsic_calls"]
    assert fused_calls < composed_calls / 2
    if not runtime.secure_intrinsics(process.next):
        # Per phase: value, map (prepare), broadcast, zip, map (work), aggregate, zips and the
        # update map. (Secure sums keep TFF's own calls of the secure intrinsics.)
        assert fused_calls <= 12 * fused.phases


def test_several_fused_rounds_per_call_equal_separate_rounds(task, builds):
    process, spec, fused = builds("mfl_two_phases")
    multi = rounds.MultiRound(process, 2, fused=fused)
    values = [_values(task, spec, r) for r in (1, 2)]
    state, metrics = multi(process.initialize(), values)
    reference, reference_metrics = process.initialize(), []
    for round_values in values:
        output = process.next(reference, round_values)
        reference = output.state
        reference_metrics.append(output.metrics)
    assert _max_diff(reference, state) <= TOLERANCE
    assert _max_diff(reference_metrics, metrics) <= TOLERANCE


def test_run_rounds_with_a_fused_round_trains_the_same_rounds(task):
    process, spec = builders.build_algorithm("fedavg", task, _options())
    fused = fused_rounds.fuse(process, spec.phase_computations)
    common = dict(clients_per_round=CLIENTS, rounds=range(1, 4))
    state = rounds.run_rounds(process, spec, task, **common)
    fused_state = rounds.run_rounds(process, spec, task, fused=fused, **common)
    assert _max_diff(state, fused_state) <= TOLERANCE


def test_a_round_of_two_aggregation_layers_is_refused_with_the_fix(builds):
    process, _, _ = builds("mfl_two_phases")
    # mfl's whole round broadcasts the first aggregate again: not one MapReduceForm.
    with pytest.raises(ValueError, match="--fuse_rounds=false"):
        fused_rounds.fuse(process)


Pair = collections.namedtuple("Pair", ["left", "right"])


@attrs.define
class Record:
    weights: list
    pair: Pair


def test_python_containers_match_tff_conversion():
    type_spec = tff.types.to_type(
        Record(
            weights=[np.float32, tff.TensorType(np.int32, [2])],
            pair=Pair(left=collections.OrderedDict(a=np.float32, b=()), right=(np.float32,)),
        )
    )
    # As TFF's execution context hands back a value of a type without containers.
    value = collections.OrderedDict(
        weights=[np.float32(1.5), np.array([1, 2], np.int32)],
        pair=collections.OrderedDict(
            left=collections.OrderedDict(a=np.float32(2.0), b=()), right=(np.float32(3.0),)
        ),
    )
    expected = tff.types.type_to_py_container(
        tff.structure.from_container(value, recursive=True), type_spec
    )
    converted = fused_rounds.python_containers(type_spec)(value)
    assert isinstance(converted, Record) and isinstance(converted.pair, Pair)
    assert _max_diff(expected, converted) == 0.0
