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
* `remote_execution([target, target, ...], timeout_s=...)` shares each round's clients between
  several such workers, each with that same stack (`mfl_tff.training.multi_worker` says what can
  run that way and what cannot).

Secure sums. TFF's C++ runtime has no implementation of `tff.federated_secure_sum_bitwidth` and the
other secure intrinsics (`tff.learning.secure_aggregator`, the `secure` aggregator of
`mfl_tff.algorithms.aggregation`). `local_execution(simulate_secure_sums=True)` and
`remote_execution(target, ..., simulate_secure_sums=True)` (one worker) compile every computation
the way TFF's test context (`tff.backends.test.create_sync_test_cpp_execution_context`) does:
`tff.backends.test.replace_secure_intrinsics_with_bodies` first, which replaces each secure sum by
a plain `federated_aggregate` that checks each client's value against the sum's bound, then TFF's
native compiler. That is a simulation: no cryptography, and the worker sees every client's value.
Without the option, a computation holding a secure intrinsic raises `SecureSumsNotSimulatedError`
before it reaches the worker.

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
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Optional, Union

import grpc
import tensorflow_federated as tff
from tensorflow_federated.python.core.impl.compiler import building_blocks, tree_analysis

from mfl_tff.training import computation_cache, multi_worker, native_compiler
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
    "SecureSumsNotSimulatedError",
    "WorkerService",
    "create_execution_context",
    "create_multi_worker_context",
    "live_worker_pids",
    "local_execution",
    "remote_execution",
    "secure_intrinsics",
    "stop_all_workers",
    "wait_for_worker",
    "worker_binary_path",
]


# The URIs of TFF's secure intrinsics all start with this (`federated_secure_sum`,
# `federated_secure_sum_bitwidth`, `federated_secure_modular_sum`, `federated_secure_select`).
_SECURE_URI_PREFIX = "federated_secure_"
# A directory for compiled computations kept across processes (`computation_cache`); unset: off.
COMPILATION_CACHE_ENV = "MFL_TFF_COMPILATION_CACHE"


class SecureSumsNotSimulatedError(ValueError):
    """A computation with secure intrinsics was run without `simulate_secure_sums=True`."""


def secure_intrinsics(comp: tff.Computation) -> list[str]:
    """The URIs of the secure intrinsics (`tff.federated_secure_sum_bitwidth`, ...) in `comp`,
    sorted, each once; empty if it has none."""
    found = set()

    def record(block) -> None:
        if isinstance(block, building_blocks.Intrinsic) and block.uri.startswith(
            _SECURE_URI_PREFIX
        ):
            found.add(block.uri)

    tree_analysis.visit_postorder(comp.to_building_block(), record)
    return sorted(found)


def _compiler(simulate_secure_sums: bool) -> Callable[[tff.Computation], tff.Computation]:
    """The compiler of the runtime's executors: TFF's native compiler (run by
    `native_compiler.compile_to_native`, which optimizes each distinct graph once), after TFF's
    test backend's replacement of secure intrinsics with plain sums when `simulate_secure_sums`,
    else after a check that refuses secure intrinsics with a message naming the option."""

    def native(comp: tff.Computation) -> tff.Computation:
        # Looked up at each compilation, so a test can run the runtime with TFF's own compiler.
        return native_compiler.compile_to_native(comp)

    if simulate_secure_sums:
        # Exactly what TFF's test execution context compiles with (tensorflow_federated/python/
        # core/backends/test/execution_contexts.py, `_compile`).
        return lambda comp: native(tff.backends.test.replace_secure_intrinsics_with_bodies(comp))

    def compile_refusing_secure_sums(comp: tff.Computation) -> tff.Computation:
        found = secure_intrinsics(comp)
        if found:
            raise SecureSumsNotSimulatedError(
                f"This computation uses secure summation ({', '.join(found)}), which TFF's C++ "
                "runtime does not implement; run it under runtime.local_execution("
                "simulate_secure_sums=True) (or remote_execution with one worker and "
                "simulate_secure_sums=True), which simulates each secure sum as a plain sum."
            )
        return native(comp)

    return compile_refusing_secure_sums


def _executor_factory(
    target: str,
    compilations: computation_cache.CompilationCache,
    *,
    default_num_clients: int,
    connect_timeout_s: float,
    check_alive: Optional[Callable[[], None]] = None,
) -> tuple[tff.framework.ResourceManagingExecutorFactory, grpc.Channel]:
    """TFF's executor factory for the worker at `target`, and the gRPC channel it uses."""
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

    return tff.framework.ResourceManagingExecutorFactory(stack_fn), channel


def _build_context(
    target: str,
    *,
    default_num_clients: int,
    connect_timeout_s: float,
    check_alive: Optional[Callable[[], None]] = None,
    simulate_secure_sums: bool = False,
) -> tuple[tff.framework.SyncExecutionContext, grpc.Channel]:
    """Builds the context of `create_execution_context` and returns it with its channel."""
    # TFF's native compiler runs in the executors, once per computation, and each computation is
    # sent to the worker once (`mfl_tff.training.computation_cache`; TFF resends it every call).
    compilations = computation_cache.CompilationCache(
        _compiler(simulate_secure_sums),
        disk_dir=os.environ.get(COMPILATION_CACHE_ENV) or None,
        compiler_tag="native, secure sums simulated" if simulate_secure_sums else "native",
    )
    factory, channel = _executor_factory(
        target,
        compilations,
        default_num_clients=default_num_clients,
        connect_timeout_s=connect_timeout_s,
        check_alive=check_alive,
    )
    context = tff.framework.SyncExecutionContext(
        executor_fn=factory,
        compiler_fn=None,
        transform_args=tff.tensorflow.transform_args,
        transform_result=tff.tensorflow.transform_result,
    )
    return context, channel


def create_execution_context(
    target: str,
    *,
    default_num_clients: int = 0,
    connect_timeout_s: float = 60.0,
    simulate_secure_sums: bool = False,
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
        simulate_secure_sums: Replace secure sums by plain sums, as TFF's test context does (see
            the module docstring). Without it, a computation with secure sums raises
            `SecureSumsNotSimulatedError`.

    Returns:
        A `tff.framework.SyncExecutionContext`, to be installed with
        `tff.framework.get_context_stack().install(...)` or `set_default_context(...)`.
    """
    context, _ = _build_context(
        target,
        default_num_clients=default_num_clients,
        connect_timeout_s=connect_timeout_s,
        simulate_secure_sums=simulate_secure_sums,
    )
    return context


class _SharedCompilations(computation_cache.CompilationCache):
    """A `CompilationCache` that the workers' threads of a `MultiWorkerContext` share safely."""

    def __init__(self) -> None:
        # Secure sums are refused (not simulated) on several workers.
        super().__init__(_compiler(simulate_secure_sums=False))
        self._lock = threading.Lock()

    def compile(self, comp: tff.Computation) -> tff.Computation:
        with self._lock:
            return super().compile(comp)


def create_multi_worker_context(
    targets: Sequence[str], *, default_num_clients: int = 0, connect_timeout_s: float = 60.0
) -> multi_worker.MultiWorkerContext:
    """Returns a TFF context that shares each computation's clients between several workers.

    Each worker gets the stack of `create_execution_context`; `multi_worker.MultiWorkerContext`
    says which computations run on all workers and which on the first one. Creating the context
    does not connect. Close it with `close()` once it is no longer installed.

    Args:
        targets: gRPC targets of two or more running `worker_binary`s, "HOST:PORT" each.
        default_num_clients: See `create_execution_context`.
        connect_timeout_s: See `create_execution_context` (per worker).

    Raises:
        ValueError: Naming a target that is not "HOST:PORT", or one listed twice.
    """
    # One cache for all workers: each computation is compiled once, and sent once per worker.
    compilations = _SharedCompilations()
    return multi_worker.MultiWorkerContext(
        targets,
        lambda target: _executor_factory(
            target,
            compilations,
            default_num_clients=default_num_clients,
            connect_timeout_s=connect_timeout_s,
        ),
    )


@contextlib.contextmanager
def local_execution(
    *,
    log_path: Optional[PathLike] = None,
    default_num_clients: int = 0,
    startup_timeout_s: float = 60.0,
    stop_timeout_s: float = 10.0,
    simulate_secure_sums: bool = False,
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
        simulate_secure_sums: Run computations with secure sums (`tff.learning.secure_aggregator`)
            by replacing each secure sum with a plain sum, as TFF's test context does: a
            simulation without cryptography (see the module docstring).

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
            simulate_secure_sums=simulate_secure_sums,
        )
        try:
            with tff.framework.get_context_stack().install(context):
                yield service
        finally:
            channel.close()


@contextlib.contextmanager
def remote_execution(
    target: Union[str, Sequence[str]],
    *,
    timeout_s: float,
    default_num_clients: int = 0,
    simulate_secure_sums: bool = False,
) -> Iterator[tff.framework.SyncContext]:
    """Runs the TFF computations of the block on already running workers.

    The workers are neither started nor stopped here (start each with `worker_binary --port=N`,
    or a `WorkerService`). Note that `worker_binary` listens on all interfaces without
    authentication: only expose it on a trusted network.

    With one target (a string, or a sequence of one), every computation runs on that worker.
    With several, each round's clients are shared between them (`mfl_tff.training.multi_worker`):
    computations taking clients run on all workers when they compile to TFF's
    `MergeableCompForm`, and raise `multi_worker.NotMergeableError` when they do not (a round
    with two dependent aggregations, such as mfl's); the others run on the first worker.

    Args:
        target: gRPC target of the worker, "HOST:PORT", or a sequence of such targets.
        timeout_s: How long to wait for each worker to answer, on entry and whenever a
            computation needs a new connection.
        default_num_clients: See `create_execution_context`.
        simulate_secure_sums: See `local_execution`; one worker only.

    Yields:
        The installed execution context (a `multi_worker.MultiWorkerContext` for several
        workers).

    Raises:
        ValueError: Naming a target that is not "HOST:PORT", or one listed twice; or
            `simulate_secure_sums` with several workers.
        ConnectionError: Naming the first target where nothing answers gRPC within `timeout_s`.
    """
    targets = [target] if isinstance(target, str) else multi_worker.parse_targets(target)
    if simulate_secure_sums and len(targets) > 1:
        raise ValueError(
            "simulate_secure_sums runs on one worker only (secure sums are not simulated across "
            f"several workers); pass one target, not {len(targets)}."
        )
    if len(targets) == 1:
        # One worker: exactly the single-worker path, as for a plain string.
        (target,) = targets
        wait_for_worker(target, timeout_s)
        context, channel = _build_context(
            target,
            default_num_clients=default_num_clients,
            connect_timeout_s=timeout_s,
            simulate_secure_sums=simulate_secure_sums,
        )
        try:
            with tff.framework.get_context_stack().install(context):
                yield context
        finally:
            channel.close()
        return
    for each in targets:
        wait_for_worker(each, timeout_s)
    context = create_multi_worker_context(
        targets, default_num_clients=default_num_clients, connect_timeout_s=timeout_s
    )
    try:
        with tff.framework.get_context_stack().install(context):
            yield context
    finally:
        context.close()


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
