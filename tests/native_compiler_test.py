"""Tests of `mfl_tff.training.native_compiler`: TFF's native compiler, Grappler once per graph.

The references are TFF's own: `GraphSpec.to_meta_graph_def` for what Grappler reads, and
`tff.backends.native.desugar_and_transform_to_native` for the numbers a compiled round gives.
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_federated as tff
from tensorflow_federated.python.core.backends.native import compiler as native_backend_compiler
from tensorflow_federated.python.core.environments.tensorflow_backend import (
    compiled_computation_transformations,
    tensorflow_tree_transformations,
)
from tensorflow_federated.python.core.impl.compiler import building_blocks, transformations

from mfl_tff.algorithms import builders
from mfl_tff.data import digits
from mfl_tff.training import fused_rounds, native_compiler, rounds, runtime

CLIENTS = 4
TOLERANCE = 1e-6


@pytest.fixture(scope="module")
def task():
    return digits.build_digits_fewshot(num_eval_clients=2, seed=1)


@pytest.fixture(scope="module")
def built(task):
    """meta_sgd on one cohort (second order under `tf.vectorized_map`), and its fused round."""
    options = builders.AlgorithmOptions(inner_lr=0.4, inner_steps=1, cohort_size=CLIENTS)
    process, spec = builders.build_algorithm("meta_sgd", task, options)
    return process, spec, fused_rounds.fuse(process, spec.phase_computations)


def _graphs_in(tree) -> list:
    """The TensorFlow computations in the building block `tree`, in post-order."""
    found = []

    def visit(block):
        if isinstance(block, building_blocks.CompiledComputation):
            if block.proto.WhichOneof("computation") == "tensorflow":
                found.append(block)
        return block, False

    tff.framework.transform_postorder(tree, visit)
    return found


def _tensorflow_blocks(comp: tff.Computation) -> list:
    """The TensorFlow computations Grappler sees: those of the desugared call-dominant form."""
    desugared, _ = tensorflow_tree_transformations.replace_intrinsics_with_bodies(
        comp.to_building_block()
    )
    return _graphs_in(transformations.to_call_dominant(desugared))


def test_meta_graph_defs_are_the_ones_tff_builds(built):
    process, _, fused = built
    blocks = _tensorflow_blocks(process.next) + _tensorflow_blocks(fused.computation)
    assert len(blocks) > 20
    for block in blocks:
        ours = native_compiler.meta_graph_def(block)
        spec = compiled_computation_transformations._unpack_proto_into_graph_spec(block.proto)
        tffs = spec.to_meta_graph_def()
        assert ours is not None
        assert ours.SerializeToString(deterministic=True) == tffs.SerializeToString(
            deterministic=True
        )


def test_a_repeated_graph_is_optimized_once_and_built_once(built, monkeypatch):
    process, _, _ = built
    computation = rounds.MultiRound(process, 3).computation
    blocks = _tensorflow_blocks(computation)
    distinct = {b.proto.SerializeToString(deterministic=True) for b in blocks}
    assert len(distinct) < len(blocks) / 2  # three copies of the round
    calls = []
    optimize = native_compiler.tf_optimizer.OptimizeGraph
    monkeypatch.setattr(
        native_compiler.tf_optimizer,
        "OptimizeGraph",
        lambda config, graph: calls.append(1) or optimize(config, graph),
    )
    compiled = native_compiler.compile_to_native(computation)
    assert len(calls) == len(distinct)
    ids = [b.proto.tensorflow.cache_key.id for b in _graphs_in(compiled.to_building_block())]
    # The copies share one id, so the worker builds each graph once.
    assert len(ids) == len(blocks) and len(set(ids)) == len(distinct)


def _max_diff(a, b) -> float:
    tf.nest.assert_same_structure(a, b, check_types=True)
    pairs = zip(tf.nest.flatten(a), tf.nest.flatten(b))
    return max(float(np.max(np.abs(np.asarray(x, np.float64) - y))) for x, y in pairs)


def _two_rounds(built, task) -> tuple:
    process, spec, fused = built
    values = [
        spec.client_values(task.train_clients(task.sample_train_ids(CLIENTS, r), r)) for r in (1, 2)
    ]
    composed = process.next(process.initialize(), values[0])
    fused_state, fused_metrics = rounds.MultiRound(process, 2, fused=fused)(
        process.initialize(), values
    )
    return composed.state, composed.metrics, fused_state, fused_metrics


def test_rounds_compiled_here_equal_rounds_compiled_by_tff(built, task, monkeypatch):
    before = set(runtime.live_worker_pids())
    with runtime.local_execution():
        ours = _two_rounds(built, task)
    with monkeypatch.context() as patch:
        # The runtime's compiler calls `native_compiler.compile_to_native`; TFF's own instead:
        patch.setattr(
            native_compiler,
            "compile_to_native",
            tff.backends.native.desugar_and_transform_to_native,
        )
        with runtime.local_execution():
            reference = _two_rounds(built, task)
    for mine, theirs in zip(ours, reference):
        assert _max_diff(mine, theirs) <= TOLERANCE
    assert set(runtime.live_worker_pids()) <= before


def test_graphs_of_datasets_take_tffs_own_path():
    @tff.tensorflow.computation(tff.SequenceType(np.int32))
    def total(dataset):
        return dataset.reduce(np.int32(0), lambda a, x: a + x)

    (block,) = _tensorflow_blocks(total)
    assert native_compiler.meta_graph_def(block) is None
    with runtime.local_execution():
        assert total([1, 2, 3, 4]) == 10


def test_grappler_configuration_is_tffs(monkeypatch):
    seen = []
    transform = native_backend_compiler.transform_to_native_form

    def recording(comp, **kwargs):
        seen.append(kwargs["grappler_config"])
        return transform(comp, **kwargs)

    monkeypatch.setattr(native_backend_compiler, "transform_to_native_form", recording)

    @tff.tensorflow.computation(tff.TensorType(np.float32))
    def double(x):
        return x * 2.0

    tff.backends.native.desugar_and_transform_to_native(double)
    (tffs,) = seen
    ours = native_compiler.grappler_config()
    assert ours.SerializeToString(deterministic=True) == tffs.SerializeToString(deterministic=True)
