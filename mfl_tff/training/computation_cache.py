"""Computations compiled once and sent to the TFF worker once, instead of on every call.

On every call of a computation, TFF's execution context (i) looks its compiled form up in a cache
keyed on the computation's serialized proto, serializing the whole proto to hash it, and (ii) sends
the whole compiled proto to the worker (`RemoteExecutor.create_value`), which parses and copies it
again. Both scale with the size of the TensorFlow graphs inside, and a round whose client work is a
cohort under `tf.vectorized_map`, or second-order meta-gradients, carries hundreds of KB to a few
MB of them. Measured on digits, 20 clients in one cohort, per round: FedAvg 50 -> 32 ms of CPU
(driver + worker), MFL 150 -> 80 ms, with results unchanged.

Here a computation object seen before reuses its compiled form (an identity lookup, falling back
to TFF's equality of protos, so an equal computation built anew is not compiled again) and the
value the worker already holds for it. The runtime (`mfl_tff.training.runtime`) builds its context
with `compiler_fn=None` and these executors, which compile on first use instead.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from typing import Optional

import tensorflow_federated as tff

# Computations kept compiled, and kept on each worker executor: a few per algorithm (initialize,
# next, get/set weights and hparams, evaluation), so this holds dozens of algorithms.
DEFAULT_MAX_COMPUTATIONS = 128


class CompilationCache:
    """Compiles each computation once with `compiler_fn` (TFF's native compiler by default).

    Looked up by identity first (no hashing of the proto), then by TFF's own equality of
    computations (the proto), then compiled. Least recently used entries are dropped beyond
    `max_size`.
    """

    def __init__(
        self,
        compiler_fn: Optional[Callable[[tff.Computation], tff.Computation]] = None,
        *,
        max_size: int = DEFAULT_MAX_COMPUTATIONS,
    ):
        self._compiler_fn = compiler_fn or tff.backends.native.desugar_and_transform_to_native
        self._max_size = max_size
        self._by_id: collections.OrderedDict = collections.OrderedDict()
        self._by_proto: collections.OrderedDict = collections.OrderedDict()
        self.compilations = 0

    def compile(self, comp: tff.Computation) -> tff.Computation:
        """The compiled form of `comp`."""
        hit = self._by_id.get(id(comp))
        if hit is not None and hit[0] is comp:
            self._by_id.move_to_end(id(comp))
            return hit[1]
        compiled = self._by_proto.get(comp)
        if compiled is None:
            compiled = self._compiler_fn(comp)
            self.compilations += 1
            self._by_proto[comp] = compiled
            if len(self._by_proto) > self._max_size:
                self._by_proto.popitem(last=False)
        # The entry holds `comp` itself, so its id cannot be reused while it is cached.
        self._by_id[id(comp)] = (comp, compiled)
        if len(self._by_id) > self._max_size:
            self._by_id.popitem(last=False)
        return compiled


class CachingRemoteExecutor(tff.framework.RemoteExecutor):
    """A `RemoteExecutor` that compiles computations (through a shared `CompilationCache`) and
    creates each one on the worker once, reusing its remote value on later calls.

    Values other than computations (arguments, results) are handled exactly as by
    `tff.framework.RemoteExecutor`. A computation value evicted from the cache is disposed on the
    worker when its last user drops it, like any other remote value.
    """

    def __init__(
        self,
        stub,
        compilation_cache: CompilationCache,
        *,
        max_computations: int = DEFAULT_MAX_COMPUTATIONS,
    ):
        super().__init__(stub)
        self._compilation_cache = compilation_cache
        self._max_computations = max_computations
        self._values: collections.OrderedDict = collections.OrderedDict()
        self.computations_sent = 0

    def set_cardinalities(self, cardinalities) -> None:
        # A new executor on the worker: values of the old one are gone with it.
        self._values.clear()
        super().set_cardinalities(cardinalities)

    def close(self) -> None:
        self._values.clear()
        super().close()

    def _dispose(self, value_ref, value_executor_id) -> None:
        # Called from the finalizers of remote values. Cached computations live until their
        # executor goes, which may be after the channel closed or the worker stopped (at exit, for
        # instance); then there is nothing left to free, and a finalizer must not raise.
        try:
            super()._dispose(value_ref, value_executor_id)
        except Exception:  # noqa: BLE001
            pass

    async def create_value(self, value, type_spec=None):
        if not isinstance(value, tff.Computation):
            return await super().create_value(value, type_spec)
        hit = self._values.get(id(value))
        if hit is not None and hit[0] is value:
            self._values.move_to_end(id(value))
            return hit[1]
        compiled = self._compilation_cache.compile(value)
        remote = await super().create_value(compiled, compiled.type_signature)
        self.computations_sent += 1
        self._values[id(value)] = (value, remote)
        if len(self._values) > self._max_computations:
            self._values.popitem(last=False)
        return remote
