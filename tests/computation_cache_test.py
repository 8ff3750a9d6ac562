"""Tests of `mfl_tff.training.computation_cache`: each computation is compiled once and sent to
the worker once per executor, results are unchanged, and the runtime's context uses it."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_federated as tff
from tensorflow_federated.proto.v0 import executor_pb2

from mfl_tff.training import computation_cache, runtime


class CountingCompiler:
    def __init__(self):
        self.calls = 0

    def __call__(self, comp):
        self.calls += 1
        return tff.backends.native.desugar_and_transform_to_native(comp)


@pytest.fixture
def context():
    """A context like the runtime's, on a worker of our own; yields (compiler, executors)."""
    before = set(runtime.live_worker_pids())  # background jobs may run workers of their own
    compiler = CountingCompiler()
    cache = computation_cache.CompilationCache(compiler, max_size=4)
    executors = []
    with runtime.WorkerService() as service:
        channel = grpc.insecure_channel(service.target, options=runtime.GRPC_CHANNEL_OPTIONS)
        stub = tff.framework.RemoteExecutorGrpcStub(channel)

        def stack_fn(cardinalities):
            if cardinalities.get(tff.CLIENTS) is None:
                cardinalities[tff.CLIENTS] = 0
            executor = computation_cache.CachingRemoteExecutor(stub, cache, max_computations=4)
            executor.set_cardinalities(cardinalities)
            executors.append(executor)
            return executor

        ctx = tff.framework.SyncExecutionContext(
            executor_fn=tff.framework.ResourceManagingExecutorFactory(stack_fn),
            compiler_fn=None,
            transform_args=tff.tensorflow.transform_args,
            transform_result=tff.tensorflow.transform_result,
        )
        try:
            with tff.framework.get_context_stack().install(ctx):
                yield compiler, executors
        finally:
            channel.close()
    assert set(runtime.live_worker_pids()) <= before


def _add_one():
    @tff.tensorflow.computation(np.float32)
    def add_one(x):
        return x + 1.0

    return add_one


def _federated_sum():
    @tff.federated_computation(tff.FederatedType(np.float32, tff.CLIENTS))
    def total(values):
        return tff.federated_sum(values)

    return total


def test_repeated_calls_compile_once_and_send_once(context):
    compiler, executors = context
    add_one = _add_one()
    assert [float(add_one(np.float32(i))) for i in range(5)] == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert compiler.calls == 1
    assert sum(e.computations_sent for e in executors) == 1


def test_equal_computation_built_anew_is_not_compiled_again(context):
    compiler, executors = context
    assert float(_add_one()(np.float32(1))) == 2.0
    assert float(_add_one()(np.float32(2))) == 3.0
    assert compiler.calls == 1  # found by proto equality
    assert sum(e.computations_sent for e in executors) == 2  # a new object is sent once


def _proto_bytes(comp) -> bytes:
    return comp.to_building_block().proto.SerializeToString(deterministic=True)


def test_a_disk_cache_compiles_once_across_caches_and_survives_a_damaged_file(tmp_path):
    # Each cache stands for another process: only the directory is shared.
    def fresh(tag="native"):
        compiler = CountingCompiler()
        return compiler, computation_cache.CompilationCache(
            compiler, disk_dir=str(tmp_path), compiler_tag=tag
        )

    compiler, first = fresh()
    compiled = first.compile(_federated_sum())
    assert compiler.calls == 1 and first.compilations == 1
    (path,) = tmp_path.glob("*.pb")

    compiler, second = fresh()
    again = second.compile(_federated_sum())  # built anew, as by a rerun
    assert compiler.calls == 0 and second.disk_hits == 1
    assert _proto_bytes(again) == _proto_bytes(compiled)
    with runtime.local_execution():
        assert float(again([1.0, 2.0, 3.5])) == 6.5

    # Another compiler (e.g. secure sums simulated) is another key.
    compiler, other = fresh("other compiler")
    other.compile(_federated_sum())
    assert compiler.calls == 1 and len(list(tmp_path.glob("*.pb"))) == 2

    # A damaged file is compiled again and rewritten, not used.
    path.write_bytes(b"not a computation")
    compiler, third = fresh()
    recompiled = third.compile(_federated_sum())
    assert compiler.calls == 1 and path.read_bytes() == _proto_bytes(recompiled)


def test_each_cardinality_gets_its_own_executor_and_values(context):
    compiler, executors = context
    total = _federated_sum()
    for _ in range(3):
        assert float(total([1.0, 2.0])) == 3.0
        assert float(total([1.0, 2.0, 4.0])) == 7.0
    assert compiler.calls == 1
    assert len(executors) == 2
    assert [e.computations_sent for e in executors] == [1, 1]


def test_eviction_keeps_results_right(context):
    compiler, _ = context

    # max_size=4: six distinct computations evict the first ones, which then compile again.
    def make(k):
        @tff.tensorflow.computation(np.float32)
        def add_k(x):
            return x + tf.constant(float(k))

        return add_k

    comps = [make(k) for k in range(6)]
    for _ in range(2):
        assert [float(c(np.float32(1))) for c in comps] == [1.0 + k for k in range(6)]
    assert compiler.calls == 12


def test_runtime_context_uses_the_cache():
    before = set(runtime.live_worker_pids())
    with runtime.local_execution():
        add_one = _add_one()
        assert [float(add_one(np.float32(i))) for i in range(3)] == [1.0, 2.0, 3.0]
        context = tff.framework.get_context_stack().current
        executor = context.executor_factory.create_executor({})
        assert isinstance(executor, computation_cache.CachingRemoteExecutor)
        assert executor.computations_sent == 1
    assert set(runtime.live_worker_pids()) <= before


class ClosedChannelStub:
    """A stub whose channel has been closed after the executor was set up."""

    def get_executor(self, request):
        return executor_pb2.GetExecutorResponse(executor=executor_pb2.ExecutorId(id="e"))

    def dispose(self, request):
        raise ValueError("Cannot invoke RPC on closed channel!")  # what grpc raises


def test_disposing_after_the_channel_closed_does_not_raise():
    # Remote values dispose themselves from finalizers, in batches of 20 requests; cached
    # computations can outlive the channel (at exit), and a finalizer must not raise then.
    executor = computation_cache.CachingRemoteExecutor(
        ClosedChannelStub(), computation_cache.CompilationCache()
    )
    executor.set_cardinalities({tff.CLIENTS: 1})
    for i in range(45):
        executor._dispose(executor_pb2.ValueRef(id=str(i)), executor._executor_id)
