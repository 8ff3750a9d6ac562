"""TFF execution contexts that run computations on a TFF worker: started here or remote.

TFF's default runtime (`tff.backends.native.set_sync_local_cpp_execution_context`) runs its
`worker_binary` as a child it never reliably stops. This module builds the same client-side stack
(`RemoteExecutor` over gRPC, TFF's native compiler) on workers we control
(`mfl_tff.training.worker`):

* `local_execution()` starts a worker, makes it TFF's execution context for the block, and always
  stops it on the way out (normal exit, exception, Ctrl-C; SIGTERM and exit through the worker
  registry).
* `remote_execution(target, timeout_s=...)` uses a worker that somebody else runs (for example
  `worker_binary --port=N` on another host) through the same code path, and fails fast with a
  `ConnectionError` if nothing answers, at the start or when the worker dies mid-run.

Typical use::

    with runtime.local_execution(log_path="output/worker.log"):
        state = process.initialize()
        ...

Note: TFF's context stack is thread-local: the context installed here applies to the thread that
entered the `with` block (TFF's own import-time default context is likewise set only in the thread
that imported TFF).
"""

from __future__ import annotations

import atexit
import contextlib
from collections.abc import Callable, Iterator
from typing import Optional

import grpc
import tensorflow_federated as tff

from mfl_tff.training import computation_cache
from mfl_tff.training.worker import (  # noqa: F401  (re-exported: the runtime's public API)
    GRPC_CHANNEL_OPTIONS,
    WORKER_BINARY_NAME,
    PathLike,
    WorkerExitedError,
    WorkerService,
    channel_ready,
    check_target,
    live_worker_pids,
    stop_all_workers,
    wait_for_worker,
    worker_binary_path,
)

__all__ = [
    "WorkerService",
    "create_execution_context",
    "live_worker_pids",
    "local_execution",
    "remote_execution",
    "stop_all_workers",
    "wait_for_worker",
    "worker_binary_path",
]


def _build_context(
    target: str,
    *,
    default_num_clients: int,
    connect_timeout_s: float,
    check_alive: Optional[Callable[[], None]] = None,
) -> tuple[tff.framework.SyncExecutionContext, grpc.Channel]:
    """Builds the context of `create_execution_context` and returns it with its channel."""
    check_target(target)
    channel = grpc.insecure_channel(target, options=GRPC_CHANNEL_OPTIONS)
    stub = tff.framework.RemoteExecutorGrpcStub(channel)

    def stack_fn(cardinalities: dict) -> tff.framework.RemoteExecutor:
        # As in TFF's `local_cpp_executor_factory`: computations whose arguments do not fix the
        # number of clients get the default.
        if cardinalities.get(tff.CLIENTS) is None:
            cardinalities[tff.CLIENTS] = default_num_clients
        # TFF's `invoke` retries UNAVAILABLE forever (backing off to 30 s), and after each failure
        # it drops the cached executor and comes back here. Failing here with a non-retryable
        # error turns a dead or unreachable worker into an exception instead of a silent hang.
        if check_alive is not None:
            check_alive()
        if not channel_ready(target, connect_timeout_s):
            raise ConnectionError(
                f"No TFF worker answered at {target} within {connect_timeout_s} s."
            )
        executor = computation_cache.CachingRemoteExecutor(stub, compilations)
        executor.set_cardinalities(cardinalities)
        return executor

    # TFF's native compiler runs in the executors, once per computation, and each computation is
    # sent to the worker once (`mfl_tff.training.computation_cache`; TFF resends it every call).
    compilations = computation_cache.CompilationCache(
        tff.backends.native.desugar_and_transform_to_native
    )
    context = tff.framework.SyncExecutionContext(
        executor_fn=tff.framework.ResourceManagingExecutorFactory(stack_fn),
        compiler_fn=None,
        transform_args=tff.tensorflow.transform_args,
        transform_result=tff.tensorflow.transform_result,
    )
    return context, channel


def create_execution_context(
    target: str, *, default_num_clients: int = 0, connect_timeout_s: float = 60.0
) -> tff.framework.SyncExecutionContext:
    """Returns a synchronous TFF execution context that runs computations on a worker at `target`.

    Built like TFF's `create_sync_local_cpp_execution_context` (native compiler, TensorFlow
    argument and result transforms, one `RemoteExecutor` per cardinality over a shared gRPC
    channel with TFF's channel options), but for a worker that the caller runs. Creating the
    context does not connect; the first computation does.

    Args:
        target: gRPC target of a running `worker_binary`, e.g. "localhost:8000".
        default_num_clients: Number of clients for computations whose arguments do not determine
            it (as TFF's `default_num_clients`).
        connect_timeout_s: How long a computation waits for the worker to be reachable before
            raising `ConnectionError` (instead of TFF's endless retries).

    Returns:
        A `tff.framework.SyncExecutionContext`, to be installed with
        `tff.framework.get_context_stack().install(...)` or `set_default_context(...)`.
    """
    context, _ = _build_context(
        target, default_num_clients=default_num_clients, connect_timeout_s=connect_timeout_s
    )
    return context


@contextlib.contextmanager
def local_execution(
    *,
    log_path: Optional[PathLike] = None,
    default_num_clients: int = 0,
    startup_timeout_s: float = 60.0,
    stop_timeout_s: float = 10.0,
) -> Iterator[WorkerService]:
    """Runs the TFF computations of the block on a worker started for it, and stops it after.

    The worker is stopped however the block ends: normally, by an exception, or by Ctrl-C
    (KeyboardInterrupt). The context is pushed on TFF's context stack rather than replacing its
    default, so it wins over any default set inside the block (for example a stray
    `tff.backends.native.set_sync_local_cpp_execution_context()`), and whatever was in effect
    before is back afterwards, not a context pointing at a stopped worker.

    Args:
        log_path: File for the worker's stdout and stderr; None discards them.
        default_num_clients: See `create_execution_context`.
        startup_timeout_s: See `WorkerService`.
        stop_timeout_s: See `WorkerService`.

    Yields:
        The running `WorkerService`.
    """
    with WorkerService(
        log_path=log_path, startup_timeout_s=startup_timeout_s, stop_timeout_s=stop_timeout_s
    ) as service:
        context, channel = _build_context(
            service.target,
            default_num_clients=default_num_clients,
            # The worker is local and already serving; if it stops answering, it has died.
            connect_timeout_s=startup_timeout_s,
            check_alive=service.check_alive,
        )
        try:
            with tff.framework.get_context_stack().install(context):
                yield service
        finally:
            channel.close()


@contextlib.contextmanager
def remote_execution(
    target: str, *, timeout_s: float, default_num_clients: int = 0
) -> Iterator[tff.framework.SyncExecutionContext]:
    """Runs the TFF computations of the block on an already running worker at `target`.

    The worker is neither started nor stopped here (start it with `worker_binary --port=N`, or a
    `WorkerService`). Note that `worker_binary` listens on all interfaces without
    authentication: only expose it on a trusted network.

    Args:
        target: gRPC target of the worker, "HOST:PORT".
        timeout_s: How long to wait for the worker to answer, on entry and whenever a computation
            needs a new connection.
        default_num_clients: See `create_execution_context`.

    Yields:
        The installed execution context.

    Raises:
        ConnectionError: If nothing answers gRPC at `target` within `timeout_s`.
    """
    wait_for_worker(target, timeout_s)
    context, channel = _build_context(
        target, default_num_clients=default_num_clients, connect_timeout_s=timeout_s
    )
    try:
        with tff.framework.get_context_stack().install(context):
            yield context
    finally:
        channel.close()


def _release_tff_default_context() -> None:
    """Replaces TFF's import-time default context while the interpreter is still whole.

    That context owns a service manager (with no worker, as we never use it) whose `__del__`
    otherwise runs during interpreter teardown, after `subprocess` is gone, and prints
    "Exception ignored in ... 'NoneType' object has no attribute 'Popen'" at every exit.
    """
    from tensorflow_federated.python.core.impl.context_stack import (
        context_stack_impl,
        runtime_error_context,
    )

    context_stack_impl.context_stack.set_default_context(
        runtime_error_context.RuntimeErrorContext()
    )


atexit.register(_release_tff_default_context)
