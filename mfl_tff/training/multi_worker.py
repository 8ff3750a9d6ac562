"""Several TFF workers sharing each round's clients, through TFF's mergeable execution context.

TFF 0.87 runs a computation on several workers with its `MergeableCompExecutionContext`: it
compiles the computation to a `MergeableCompForm` (the work up to its aggregation, the merge of
two partial aggregates, the work after), splits the CLIENTS-placed argument into contiguous
slices, one per worker, runs the part up to the aggregation on every worker at once, merges the
partial aggregates, and runs the rest. Here each worker gets TFF's own single-worker stack (an
`AsyncExecutionContext` over a `RemoteExecutor` and a gRPC channel, as
`mfl_tff.training.runtime` builds it for one worker), and `MultiWorkerContext` sends each
computation where it can run:

* a computation with no CLIENTS-placed argument (`initialize`, `get_model_weights`, ...) has
  nothing to share: it runs whole on the first worker;
* one that returns per-client values (the personalization evaluation) also runs whole on the
  first worker, because TFF 0.87's mergeable context joins the workers' per-client results in
  the order the workers finish, not in client order;
* any other runs on all workers, if it compiles to `MergeableCompForm`. A computation in which
  one aggregation consumes another's result (a two-phase round such as mfl's, or several rounds
  in one call) does not, and `invoke` raises `NotMergeableError` instead of running it on one
  worker behind the caller's back. `check_mergeable` gives the same answer up front. The round
  loop (`mfl_tff.training.rounds.next_round`) therefore runs a two-phase round under this
  context as its phase computations, each one layer of aggregations, with the server's step
  between them.

Results equal one worker's up to float rounding (partial sums are added in another order).

Faults: each worker's context retries a failed call on THAT worker (TFF never moves a slice to
another worker), and the runtime's executor factory turns a worker that does not answer within
the timeout into a `ConnectionError` naming it. The whole call then fails: the other workers'
partial aggregates are dropped, never merged on their own.

Note: TFF's `RemoteExecutor` makes blocking gRPC calls inside its coroutines, so contexts sharing
one event loop would take turns. Each worker's context therefore runs on an event loop of its own
thread (the blocking calls release the GIL), and the workers compute at the same time.
"""

from __future__ import annotations

import asyncio
import collections
import math
import threading
from collections.abc import Callable, Sequence
from typing import Any, Optional, Union

import grpc
import tensorflow_federated as tff

from mfl_tff.training.worker import check_target

__all__ = [
    "MultiWorkerContext",
    "NotMergeableError",
    "check_mergeable",
    "cohort_size_for",
    "parse_targets",
]

# How long `close()` waits for a worker's event loop to stop.
_STOP_TIMEOUT_S = 10.0

# What `MultiWorkerContext` needs per worker: an executor factory and the channel it uses.
FactoryFn = Callable[[str], "tuple[tff.framework.ResourceManagingExecutorFactory, grpc.Channel]"]


class NotMergeableError(ValueError):
    """A computation cannot be split across workers (it does not compile to MergeableCompForm)."""


def parse_targets(targets: Union[str, Sequence[str]]) -> list[str]:
    """Returns the workers' gRPC targets from "HOST:PORT[,HOST:PORT...]" or a sequence of them.

    Raises:
        ValueError: Naming the first entry that is not "HOST:PORT", or one listed twice.
    """
    if isinstance(targets, str):
        targets = targets.split(",")
    parsed = [t.strip() if isinstance(t, str) else t for t in targets]
    if not parsed:
        raise ValueError("Expected at least one gRPC target 'HOST:PORT', got none.")
    for target in parsed:
        check_target(target)
    seen = set()
    for target in parsed:
        if target in seen:
            raise ValueError(f"Worker {target} is listed twice; list each worker once.")
        seen.add(target)
    return parsed


def cohort_size_for(
    cohort_size: Optional[int], clients_per_round: int, num_workers: int
) -> Optional[int]:
    """The cohort size that leaves every worker clients to train.

    The mergeable context shares federated clients, i.e. cohorts, between workers: a round of 20
    clients in one cohort of 25 would run on one worker. Cohorts are capped at an even share of
    the round per worker (cohorts change speed, not results).

    Args:
        cohort_size: The requested cohort size (None or 0: cohorts off).
        clients_per_round: Clients trained per round.
        num_workers: Workers sharing each round.

    Returns:
        The cohort size to use, or None for cohorts off.
    """
    if not cohort_size:
        return None
    return max(1, min(cohort_size, clients_per_round, math.ceil(clients_per_round / num_workers)))


# ---------------------------------------------------------------------------------------------
# Which computations can be split.
# ---------------------------------------------------------------------------------------------

_FORMS_LOCK = threading.Lock()
# id(computation) -> (computation, MergeableCompForm or why it cannot be one), least recently used
# first. An entry holds its computation, so the id cannot be reused while cached. A few per
# algorithm (its round; initialization and the like never get here).
_FORMS: collections.OrderedDict[int, tuple[Any, Any]] = collections.OrderedDict()
_MAX_FORMS = 64


def _mergeable_form(comp: tff.Computation) -> tff.framework.MergeableCompForm:
    """`comp` compiled to MergeableCompForm, once per computation object.

    Raises:
        NotMergeableError: If TFF cannot compile it (one aggregation depends on another).
    """
    with _FORMS_LOCK:
        hit = _FORMS.get(id(comp))
        if hit is not None and hit[0] is comp:
            _FORMS.move_to_end(id(comp))
        else:
            try:
                form: Any = tff.backends.native.compile_to_mergeable_comp_form(comp)
            except ValueError as e:
                # TFF's message prints whole type signatures; its first sentence is the reason.
                reason = str(e).split(". ")[0].strip().rstrip(".")
                form = (
                    "This computation cannot be split across several TFF workers: one of its "
                    f"aggregations consumes another's result (TFF: {reason}); run it on one worker."
                )
            hit = (comp, form)
            _FORMS[id(comp)] = hit
            if len(_FORMS) > _MAX_FORMS:
                _FORMS.popitem(last=False)
    if isinstance(hit[1], str):
        raise NotMergeableError(hit[1])
    return hit[1]


def check_mergeable(comp: tff.Computation) -> None:
    """Raises `NotMergeableError` if `comp` cannot run on several workers.

    The compiled form is kept, so a later call of `comp` under `MultiWorkerContext` does not
    compile it again.
    """
    _mergeable_form(comp)


def _has_clients_values(type_spec: Optional[tff.Type]) -> bool:
    """Whether `type_spec` holds a CLIENTS-placed value that differs per client."""
    if type_spec is None:
        return False
    return tff.types.contains(
        type_spec,
        lambda t: isinstance(t, tff.FederatedType)
        and t.placement is tff.CLIENTS
        and not t.all_equal,
    )


# ---------------------------------------------------------------------------------------------
# The workers.
# ---------------------------------------------------------------------------------------------


class _WorkerContext(tff.framework.AsyncContext):
    """One worker's TFF context (`AsyncExecutionContext`), run on its own event-loop thread.

    Attributes:
        target: The worker's gRPC target.
        calls: Calls made on this worker so far (subrounds and whole computations).
    """

    def __init__(self, target: str, factory_fn: FactoryFn) -> None:
        self.target = target
        self.calls = 0
        factory, self._channel = factory_fn(target)
        self._context = tff.framework.AsyncExecutionContext(
            executor_fn=factory,
            compiler_fn=None,  # The executors compile (`mfl_tff.training.computation_cache`).
            transform_args=tff.tensorflow.transform_args,
            transform_result=tff.tensorflow.transform_result,
        )
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name=f"tff-worker-{target}", daemon=True
        )
        self._thread.start()

    def _submit(self, comp: Any, arg: Any):
        self.calls += 1
        return asyncio.run_coroutine_threadsafe(self._context.invoke(comp, arg), self._loop)

    async def invoke(self, comp: Any, arg: Any) -> Any:
        """Runs `comp` on this worker (from another event loop)."""
        return await asyncio.wrap_future(self._submit(comp, arg))

    def invoke_sync(self, comp: Any, arg: Any) -> Any:
        """Runs `comp` on this worker and waits for the result."""
        return self._submit(comp, arg).result()

    def close(self) -> None:
        """Stops the event loop and closes the channel. Idempotent."""
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            # The loop stops between calls; a call stuck on a hung worker must not block the
            # caller (the thread is a daemon, so it does not block the interpreter's exit either).
            self._thread.join(_STOP_TIMEOUT_S)
        self._channel.close()


class MultiWorkerContext(tff.framework.SyncContext):
    """A synchronous TFF context that shares each computation's clients between workers.

    See the module docstring for what runs where. Install it on TFF's context stack
    (`tff.framework.get_context_stack().install(context)`), and `close()` it afterwards.

    Attributes:
        targets: The workers' gRPC targets; the first one also runs whatever cannot be split.
    """

    def __init__(self, targets: Sequence[str], factory_fn: FactoryFn) -> None:
        """Builds one context per worker (creating it does not connect).

        Args:
            targets: gRPC targets of two or more running workers.
            factory_fn: Returns a worker's executor factory and the gRPC channel it uses.
        """
        self.targets = parse_targets(targets)
        self._workers: list[_WorkerContext] = []
        try:
            for target in self.targets:
                self._workers.append(_WorkerContext(target, factory_fn))
        except BaseException:
            self.close()
            raise
        self._mergeable = tff.framework.MergeableCompExecutionContext(
            async_contexts=self._workers,
            # `invoke` passes computations already in MergeableCompForm (compiled once, here).
            compiler_fn=None,
        )

    @property
    def calls_per_worker(self) -> dict[str, int]:
        """Calls made on each worker so far, by target."""
        return {w.target: w.calls for w in self._workers}

    def invoke(self, comp: Any, arg: Any) -> Any:
        """Runs `comp` on `arg`: on all workers if its clients can be shared, else on the first.

        Raises:
            NotMergeableError: If `comp` takes clients but cannot be split across workers.
            ConnectionError: If a worker does not answer (from the runtime's executor factory).
        """
        signature = comp.type_signature
        if not _has_clients_values(signature.parameter) or _has_clients_values(signature.result):
            return self._workers[0].invoke_sync(comp, arg)
        return self._mergeable.invoke(_mergeable_form(comp), arg)

    def close(self) -> None:
        """Stops the workers' event loops and closes their channels (not the workers)."""
        for worker in self._workers:
            worker.close()
