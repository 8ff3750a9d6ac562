"""Tests of the `secure` aggregator and of the runtime's simulated secure sums.

TFF's C++ runtime has no secure summation. `runtime.local_execution(simulate_secure_sums=True)`
compiles computations as TFF's test context does (each secure sum becomes a plain sum), so a
process built with `tff.learning.secure_aggregator` runs on our own worker. Checked here:
- without the option a computation with a secure sum fails with an error naming it, and with it
  the computation runs;
- the rounds of fedavg and mfl built with `secure` aggregate the client updates (and mfl's alpha
  meta-gradients) with secure sums only;
- two rounds of fedavg with `secure` end where two rounds with `mean` do, within the secure
  sum's quantization error.

Task, clients and options are aggregation_test.py's (conftest.py, `testing.with_aggregators`).
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow_federated as tff
from tensorflow_federated.python.core.impl.compiler import intrinsic_defs, tree_analysis

from mfl_tff.training import progress, runtime
from tests import testing

NUM_CLIENTS = testing.AGGREGATOR_TEST_CLIENTS


@pytest.fixture(scope="module")
def secure_execution():
    """A worker of our own whose context simulates secure sums, stopped (and checked gone) after
    the module."""
    before = set(runtime.live_worker_pids())
    with runtime.local_execution(simulate_secure_sums=True):
        yield
    assert set(runtime.live_worker_pids()) <= before


@tff.federated_computation(tff.FederatedType(np.int32, tff.CLIENTS))
def _secure_sum(values):
    return tff.federated_secure_sum_bitwidth(values, 8)


def test_secure_sums_need_the_simulation_option(secure_execution):
    assert runtime.secure_intrinsics(_secure_sum) == ["federated_secure_sum_bitwidth"]
    # Under the module's simulating context.
    assert _secure_sum([1, 2, 250]) == 253
    # A context without the option refuses, naming the option, before the worker sees it.
    with runtime.local_execution():
        with pytest.raises(runtime.SecureSumsNotSimulatedError, match="simulate_secure_sums=True"):
            _secure_sum([1, 2, 3])
    # Not simulated across several workers (refused before connecting to any).
    with pytest.raises(ValueError, match="one worker only"):
        with runtime.remote_execution(
            ["localhost:1", "localhost:2"], timeout_s=1, simulate_secure_sums=True
        ):
            pass


def _leaves(type_spec) -> tuple:
    """(dtype, shape) of every tensor of `type_spec`, in order (placements looked through)."""
    if isinstance(type_spec, tff.TensorType):
        return ((np.dtype(type_spec.dtype), tuple(type_spec.shape)),)
    if isinstance(type_spec, tff.FederatedType):
        return _leaves(type_spec.member)
    if isinstance(type_spec, tff.StructType):
        return tuple(leaf for element in type_spec for leaf in _leaves(element))
    return ()


def _clients_values(type_spec):
    """The member types of the CLIENTS-placed values in an intrinsic's argument type (the values
    it takes from clients; not its functions' or zeros' types)."""
    if isinstance(type_spec, tff.FederatedType):
        if type_spec.placement is tff.CLIENTS:
            yield type_spec.member
    elif isinstance(type_spec, tff.StructType):
        for element in type_spec:
            yield from _clients_values(element)


def _structs(type_spec):
    """`type_spec` and every struct inside it."""
    if isinstance(type_spec, tff.StructType):
        yield type_spec
        for element in type_spec:
            yield from _structs(element)


def _plain_aggregations_of(comp, streams) -> list[str]:
    """The plain (not secure) aggregations in `comp` whose clients' value holds a stream's value:
    a struct with the tensors of a stream (the model update, alpha), or a tensor of one of the
    streams' non-scalar shapes. `federated_sum`, `federated_mean`, `federated_weighted_mean` and
    `federated_aggregate` are TFF's plain aggregation intrinsics (`AggregationKind.DEFAULT`), as
    `tff.test.assert_not_contains_unsecure_aggregation` finds them."""
    calls = tree_analysis.find_aggregations_in_tree(
        comp.to_building_block(), lambda kind: kind == intrinsic_defs.AggregationKind.DEFAULT
    )
    shapes = {leaf for stream in streams for leaf in stream if leaf[1]}
    found = []
    for call in calls:
        for member in _clients_values(call.argument.type_signature):
            holds_stream = any(_leaves(struct) in streams for struct in _structs(member))
            if holds_stream or shapes & set(_leaves(member)):
                found.append(f"{call.function.uri}({member})")
    return found


def _streams(process) -> list[tuple]:
    """The tensors of the model update and (for mfl) alpha, as `_leaves` gives them, read from
    the types of `get_model_weights` and `get_hparams` (updates and meta-gradients have the types
    of what they update)."""
    streams = [_leaves(process.get_model_weights.type_signature.result.trainable)]
    if process.get_hparams is not None:
        hparams = process.get_hparams.type_signature.result
        if "alpha" in tff.structure.name_list(hparams):
            streams.append(_leaves(hparams.alpha))
    return streams


@pytest.mark.parametrize("algorithm", ["fedavg", "mfl"])
def test_secure_rounds_aggregate_updates_and_alpha_only_securely(
    fewshot_task, secure_execution, algorithm
):
    """`process.next` contains secure aggregation, and no plain aggregation takes the model
    updates or mfl's alpha meta-gradients. TFF's strict
    `tff.test.assert_not_contains_unsecure_aggregation` fails on these rounds, because the client
    metrics (losses, norms, example and client counts) are still plain `federated_sum`s; the
    exact weaker property is checked instead, on the same walk of the computation
    (`find_aggregations_in_tree`, which `tff.test` uses)."""
    process = testing.with_aggregators(fewshot_task, algorithm, "secure", NUM_CLIENTS)
    tff.test.assert_contains_secure_aggregation(process.next)
    with pytest.raises(AssertionError):  # The metrics' plain sums.
        tff.test.assert_not_contains_unsecure_aggregation(process.next)
    streams = _streams(process)
    assert len(streams) == (2 if algorithm == "mfl" else 1)
    assert _plain_aggregations_of(process.next, streams) == []
    if algorithm == "fedavg":
        # The walk does find the updates under the plain mean.
        mean = testing.with_aggregators(fewshot_task, algorithm, "mean", NUM_CLIENTS)
        assert _plain_aggregations_of(mean.next, streams)


def test_two_secure_fedavg_rounds_equal_the_mean_within_quantization(
    fewshot_task, fewshot_clients, secure_execution
):
    """The updates of these clients stay under the adaptive clip (initial 1) and zeroing
    threshold (initial 21), so secure and mean aggregate the same values, and only the secure
    sum's encoding differs (the aggregator's clipped and zeroed counts are read to make sure)."""
    clients_of_round = [
        fewshot_clients,
        fewshot_task.train_clients(fewshot_task.train_data.client_ids[:NUM_CLIENTS], 2),
    ]
    runs = {}
    for kind in ("mean", "secure"):
        process = testing.with_aggregators(fewshot_task, "fedavg", kind, NUM_CLIENTS)
        state, metrics = process.initialize(), []
        for clients in clients_of_round:
            output = process.next(state, clients)
            state = output.state
            metrics.append(progress.flat_metrics(output.metrics))
        runs[kind] = (testing.model_and_meta(process, state)[0], metrics)
    (mean_theta, _), (secure_theta, secure_metrics) = runs["mean"], runs["secure"]
    # Bound. Each client's weighted update w*x is clipped to the secure range [-B, B] (B is the
    # `secure_upper_threshold` metric: 100 in round 1, adapted after) and quantized to 32 bits,
    # a step of 2B / (2**32 - 1), about 5e-8 for B = 100; TFF decodes the integer sum in float32,
    # accurate to about 2**-24 of the range of the sum, NUM_CLIENTS * 2B (its docs: errors up to
    # 1e-4 for a range of +/- 1000). The mean divides the sum by the total weight W, and server
    # SGD at rate 1 moves theta by exactly the mean: per round, at most NUM_CLIENTS * 2B * 2**-23
    # / W per coordinate (twice TFF's figure). Round 1's error reaches round 2's updates through
    # two SGD steps from a model that differs by less than that; a factor 4 over the two rounds'
    # sum covers it and float32 rounding of theta itself.
    bound = 0.0
    for m in secure_metrics:
        assert m["aggregator/zeroed_count"] == 0 and m["aggregator/zeroing/clipped_count"] == 0
        for side in ("upper", "lower"):
            assert m[f"aggregator/zeroing/clipping/mean_value/secure_{side}_clipped_count"] == 0
        upper = float(m["aggregator/zeroing/clipping/mean_value/secure_upper_threshold"])
        bound += NUM_CLIENTS * 2 * upper * 2.0**-23 / float(m["client_work/num_examples"])
    difference = float(np.max(np.abs(secure_theta - mean_theta)))
    MEASURED["fedavg secure - mean, 2 rounds"] = (difference, 4 * bound)
    assert np.max(np.abs(mean_theta)) > 1e-3
    assert difference <= 4 * bound


MEASURED: dict = {}


def test_report_measured_values():
    """Prints what the tests above measured (pytest -s), for the record."""
    for name, (got, reference) in MEASURED.items():
        print(f"{name}: {got:.6g} (bound {reference:.6g})")
