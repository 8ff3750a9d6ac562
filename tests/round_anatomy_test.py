"""Tests of `experiments.round_anatomy`: counts against computations written out by hand."""

from __future__ import annotations

import numpy as np
import tensorflow_federated as tff

from experiments import round_anatomy


@tff.tensorflow.computation(np.float32)
def _double(x):
    return x * 2.0


def test_counts_a_map_and_a_broadcast_written_out():
    @tff.federated_computation(tff.FederatedType(np.float32, tff.SERVER))
    def comp(x):
        doubled = tff.federated_map(_double, tff.federated_broadcast(x))
        return tff.federated_map(_double, doubled)

    counts = round_anatomy.intrinsic_calls(comp)
    assert counts["by_intrinsic"] == {"federated_broadcast": 1, "federated_map": 2}
    assert counts["intrinsic_calls"] == 3
    assert counts["tensorflow_functions"] >= 1


def test_a_mean_is_counted_as_the_aggregate_it_runs_as():
    @tff.federated_computation(tff.FederatedType(np.float32, tff.CLIENTS))
    def comp(x):
        return tff.federated_mean(x)

    counts = round_anatomy.intrinsic_calls(comp)
    assert "federated_mean" not in counts["by_intrinsic"]
    assert counts["by_intrinsic"]["federated_aggregate"] == 1
