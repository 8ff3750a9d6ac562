"""A round as TFF's MapReduceForm: the same math in a few steps of TFF's executor.

A composed round (`mfl_tff.algorithms.composer`) is a federated computation of named parts:
broadcast, client work, one `tff.aggregators` process per stream, finalizers, metrics. TFF's
native runtime walks it step by step, and each step (an intrinsic call: a `federated_map`, a
`federated_apply`, a zip) costs the worker a fixed fraction of a millisecond whatever its math.
Meta-SGD's round on sinusoid has 71 such steps and 24 TensorFlow functions; at 25 clients of 20
points, those steps, not the math, are most of the worker's time.

TFF ships a compiler for exactly this: `tff.backends.mapreduce.get_map_reduce_form_for_computation`
turns any round with one layer of broadcast and aggregation into a `MapReduceForm`: one `prepare`
function at the server, one client `work` function, one `federated_aggregate` (zero, accumulate,
merge, report) and one `update` function at the server, each a single TensorFlow graph that
contains every part the round was composed of. `fuse` runs that compiler and calls the parts
with one broadcast, one `federated_map`, one aggregate and one server map: 8 steps a round in
place of 71. The parts are unchanged (DP, robust and compressed aggregation compile into
`accumulate`, `report` and `update` like any other aggregator), and so are the numbers: the
compiler only regroups TensorFlow ops; it is run without Grappler, which TFF's native compiler
applies afterwards as it does to the unfused round.

A round of several phases (mfl's two-phase round, whose second broadcast consumes the first
aggregate) is not one MapReduceForm; each of its phase computations is, and the fused round runs
them one after the other in one call.

Where it does not apply: a round with secure sums (`tff.learning.secure_aggregator`) keeps TFF's
own call of the secure intrinsics (`tff.backends.mapreduce.get_computation_for_map_reduce_form`);
several workers (`mfl_tff.training.multi_worker`) split TFF's `MergeableCompForm` instead, so the
round loop fuses only on one worker.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attrs
import tensorflow as tf
import tensorflow_federated as tff

__all__ = ["FusedRound", "fuse"]


def _no_grappler() -> tf.compat.v1.ConfigProto:
    # TFF's native compiler runs Grappler on every graph when the runtime compiles the call, as
    # it does for the unfused round; running it here as well would only cost time.
    config = tf.compat.v1.ConfigProto()
    config.graph_options.rewrite_options.disable_meta_optimizer = True
    return config


def _is_empty(type_spec: tff.Type) -> bool:
    return isinstance(type_spec, tff.StructType) and all(_is_empty(m) for m in type_spec)


def _round_of(form: tff.backends.mapreduce.MapReduceForm) -> tff.Computation:
    """The federated computation of `form`'s round in the fewest intrinsic calls."""
    secure_inputs = form.work.type_signature.result[1:]
    if not all(_is_empty(t) for t in secure_inputs):
        return tff.backends.mapreduce.get_computation_for_map_reduce_form(form)

    # `work` also returns the (here empty) inputs of the secure sums; the call keeps only the
    # aggregate's input, so the round does not select from a CLIENTS-placed tuple.
    @tff.tensorflow.computation(form.work.type_signature.parameter)
    def work(arg):
        return form.work(arg)[0]

    @tff.federated_computation(form.type_signature.parameter)
    def fused_round(state, client_data):
        broadcast = tff.federated_broadcast(tff.federated_map(form.prepare, state))
        client_outputs = tff.federated_map(work, tff.federated_zip([client_data, broadcast]))
        aggregate = tff.federated_aggregate(
            client_outputs, form.zero(), form.accumulate, form.merge, form.report
        )
        nothing = tff.federated_value((), tff.SERVER)
        return tff.federated_map(
            form.update, tff.federated_zip((state, (aggregate, nothing, nothing, nothing)))
        )

    return fused_round


class FusedRound:
    """One round of `process` (or its phases, in order) compiled to MapReduceForms.

    Attributes:
      computation: `(state@SERVER, client_data@CLIENTS) -> (state@SERVER, (metrics@SERVER per
        phase))`, the round `process.next` runs, on the same client values.
      phases: How many MapReduceForms the round runs (1, or mfl's 2).
      compile_s: Seconds the MapReduceForm compiler took.
    """

    def __init__(self, process: tff.learning.templates.LearningProcess, phase_computations=()):
        begin = time.perf_counter()
        forms = [
            tff.backends.mapreduce.get_map_reduce_form_for_computation(
                computation, grappler_config=_no_grappler()
            )
            for computation in (tuple(phase_computations) or (process.next,))
        ]
        rounds = [_round_of(form) for form in forms]
        self.phases = len(rounds)
        state_type, data_type = process.next.type_signature.parameter

        @tff.federated_computation(state_type, data_type)
        def fused(state, client_data):
            metrics = []
            for round_ in rounds:
                state, phase_metrics = round_(state, client_data)
                metrics.append(phase_metrics)
            return state, tuple(metrics)

        self.computation = fused
        self.compile_s = time.perf_counter() - begin
        self._as_state = python_containers(process.next.type_signature.result.state.member)
        self._as_metrics = python_containers(process.next.type_signature.result.metrics.member)

    def state(self, value: Any) -> Any:
        """The state as `process.next` returns it (its Python containers), from a fused result."""
        return self._as_state(value)

    def metrics(self, per_phase: Sequence[Mapping]) -> Any:
        """The round's metrics as `process.next` returns them, from the fused per-phase metrics."""
        joined = collections.OrderedDict()
        for phase_metrics in per_phase:
            joined.update(phase_metrics)
        return self._as_metrics(joined)

    def __call__(self, state: Any, client_values: list) -> tuple[Any, Any]:
        """One round: `(state, metrics)`, equal to `process.next(state, client_values)`'s."""
        new_state, per_phase = self.computation(state, client_values)
        return self.state(new_state), self.metrics(per_phase)


def python_containers(type_spec: tff.Type) -> Callable[[Any], Any]:
    """A function giving a value of `type_spec` the Python containers `type_spec` names.

    It does what `tff.types.type_to_py_container` does for values as TFF's execution context
    returns them (named structures as mappings, unnamed ones as sequences), but walks the type
    once, here, rather than on every call: the generic conversion costs milliseconds a round,
    which is what fusing saves.
    """
    if isinstance(type_spec, tff.FederatedType):
        type_spec = type_spec.member
    if not isinstance(type_spec, tff.StructType):
        return lambda value: value
    elements = list(tff.structure.iter_elements(type_spec))
    names = [name for name, _ in elements]
    convert = [python_containers(element) for _, element in elements]
    named = any(name is not None for name in names)
    container = type_spec.python_container or (collections.OrderedDict if named else tuple)

    def fields(value) -> list:
        if isinstance(value, Mapping):
            return [value[name] for name in names]
        if isinstance(value, tff.structure.Struct):
            return [value[i] for i in range(len(names))]
        if named and (hasattr(value, "_fields") or attrs.has(type(value))):
            return [getattr(value, name) for name in names]
        return list(value)

    if not named:
        return lambda value: container([c(v) for c, v in zip(convert, fields(value))])
    if hasattr(container, "_fields") or attrs.has(container):
        return lambda value: container(
            **{n: c(v) for n, c, v in zip(names, convert, fields(value))}
        )
    return lambda value: container([(n, c(v)) for n, c, v in zip(names, convert, fields(value))])


def fuse(process: tff.learning.templates.LearningProcess, phase_computations=()) -> FusedRound:
    """`process`'s round compiled by TFF's MapReduceForm compiler (module docstring).

    Args:
      process: A `LearningProcess` whose round has one layer of broadcast and aggregation, or
        whose `phase_computations` each have.
      phase_computations: The round's phases (`AlgorithmSpec.phase_computations`), if several.

    Raises:
      ValueError: If TFF's compiler cannot put the round (or a phase) in MapReduceForm.
    """
    try:
        return FusedRound(process, phase_computations)
    except (TypeError, ValueError) as error:
        raise ValueError(
            f"This round cannot be fused into TFF's MapReduceForm ({error}); run it unfused "
            "(--fuse_rounds=false)."
        ) from error
