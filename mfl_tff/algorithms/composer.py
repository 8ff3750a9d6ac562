"""One composer for every algorithm: `Algorithm` record -> `tff.learning.templates.LearningProcess`.

TFF's `compose_learning_process` and `ClientWorkProcess` require client data to be `tf.data`
sequences; ours is packed tensors (see `mfl_tff.data.packing` for why), so this module composes the
same named parts itself, with TFF's state layout (`tff.learning.templates.LearningAlgorithmState`):

* distributor: `tff.learning.templates.build_broadcast_process` of the model weights;
* client work: one `tff.templates.MeasuredProcess` per phase (`client_work.build_client_work`);
* aggregator: a `tff.aggregators` process per stream (`model`, and `meta` for algorithms that
  learn meta-parameters);
* finalizer: TFF's `build_apply_optimizer_finalizer` on theta, and for `meta` a finalizer whose
  state holds the meta-parameters alpha and their optimizer state (`build_meta_finalizer`).

Algorithms without meta-parameters have exactly TFF's state (`aggregator` and `finalizer` hold
the model stream's states); with them, `aggregator` and `finalizer` are
`OrderedDict(model=..., meta=...)`. A round runs the record's phases in order; a phase's `meta`
update is applied before the next phase broadcasts alpha (the two-phase MFL round).

Metrics: `distributor`, then per phase `client_work` (or `<phase>_client_work`), and per stream
`aggregator`/`finalizer` (model only) or `model_aggregator`, `meta_aggregator`, `finalizer`
(theta) and `meta_update` (alpha); with meta-gradient clipping (`AlgorithmOptions.clip_norms`),
`model_clipping`/`meta_clipping` (the aggregate's norm before clipping, and whether it was).
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Optional

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from mfl_tff.algorithms import checks, client_work
from mfl_tff.algorithms.algorithm import Algorithm, AlgorithmOptions
from mfl_tff.data import example_sources
from mfl_tff.meta import meta_model

State = tff.learning.templates.LearningAlgorithmState


@dataclasses.dataclass(frozen=True)
class RoundParts:
    """How a composed round aggregates, beside its `LearningProcess`.

    Attributes:
      stream_aggregators: `{stream: (aggregation process, times aggregated per round)}` for the
        round's streams ('model', and 'meta' for algorithms that learn meta-parameters): what
        `mfl_tff.algorithms.communication.measure` counts by stream.
      phase_computations: For a round of several phases (mfl's), one federated computation per
        phase, `(state, client_data) -> (state after the phase, its metrics)`: called in order
        on the same clients they are the round (the metrics, joined in order, are `next`'s).
        Empty for one-phase rounds.
    """

    stream_aggregators: dict
    phase_computations: tuple = ()


def initial_model_weights_computation(model) -> tff.Computation:
    """A no-argument computation returning the FunctionalModel's initial `ModelWeights`."""
    initial = client_work.initial_model_weights(model)

    @tff.tensorflow.computation
    def initial_model_weights_fn():
        return tf.nest.map_structure(tf.constant, initial)

    return initial_model_weights_fn


def create_aggregator(factory, value_type: tff.Type) -> tff.templates.AggregationProcess:
    """`factory`'s aggregation process for `value_type`, always taking (state, value, weight).

    A weighted factory is created for float32 weights. An unweighted one (for example
    `tff.aggregators.DifferentiallyPrivateFactory`, or a `tff.learning.robust_aggregator(
    weighted=False)`) is created with the value type only and called without the weights, as
    TFF's unweighted FedAvg does: every client counts the same, and a client whose update was
    rejected (`client_work.client_output` zeroes it) counts as a zero update.
    """
    if isinstance(factory, tff.aggregators.WeightedAggregationFactory):
        return factory.create(value_type, tff.TensorType(np.float32))
    process = factory.create(value_type)

    @tff.federated_computation(
        process.initialize.type_signature.result,
        tff.FederatedType(value_type, tff.CLIENTS),
        tff.FederatedType(np.float32, tff.CLIENTS),
    )
    def next_fn(state, value, weight):
        del weight  # Unweighted: every client counts the same.
        return process.next(state, value)

    return tff.templates.AggregationProcess(process.initialize, next_fn)


def meta_type_of(meta) -> tff.Type:
    """TFF type of float32 meta-parameters: alpha's tuple, or the meta-model's OrderedDict."""
    if isinstance(meta, collections.abc.Mapping):
        return tff.types.to_type(
            collections.OrderedDict((k, meta_type_of(v)) for k, v in meta.items())
        )
    if isinstance(meta, (tuple, list)):
        return tff.types.to_type(tuple(meta_type_of(a) for a in meta))
    return tff.TensorType(np.float32, np.shape(meta))


def python_meta(meta):
    """Meta-parameters as Python containers (tuples and OrderedDicts), whichever TFF passed."""
    if isinstance(meta, collections.abc.Mapping):
        return collections.OrderedDict((k, python_meta(v)) for k, v in meta.items())
    if isinstance(meta, tff.structure.Struct):
        return python_meta(tff.structure.to_odict_or_tuple(meta))
    if isinstance(meta, (tuple, list)):
        return tuple(python_meta(a) for a in meta)
    return meta


def build_clip_step(value_type: tff.Type, clip_norm: float) -> tff.Computation:
    """A computation clipping an aggregate to global norm `clip_norm`, with its measurements.

    The meta-gradients' clipping acts on the aggregate at the server (per stream), as central
    meta-learning clips its meta-batch gradient: it caps what reaches the meta-optimizer, so
    one exploding client cannot send the optimizer's state to inf.
    """

    @tff.tensorflow.computation(value_type)
    def clip(value):
        norm = client_work.global_norm(value)
        scale = clip_norm / tf.maximum(norm, clip_norm)
        clipped = tf.nest.map_structure(lambda t: t * scale, value)
        return clipped, collections.OrderedDict(
            norm_before_clipping=norm, clipped=tf.cast(norm > clip_norm, tf.int32)
        )

    return clip


def build_meta_finalizer(
    optimizer: tff.learning.optimizers.Optimizer,
    initial_meta: tuple,
    *,
    min_meta: Optional[float],
) -> tff.templates.MeasuredProcess:
    """The finalizer of the meta stream; its state holds the meta-parameters.

    `next(state@SERVER, meta_gradient@SERVER)` steps `optimizer` on the meta-parameters, then
    (with `min_meta`) projects them onto [min_meta, inf), which is how learned rates stay
    positive (alpha only: a meta-model's own parameters are unconstrained). A non-finite
    aggregate (every client rejected: 0/0) skips the step, as TFF's model finalizer does. The
    state is `OrderedDict(meta=..., optimizer=...)`, the result the new meta-parameters;
    measurements: `meta_gradient_norm`, `update_non_finite`, `alpha_mean`, `alpha_min`,
    `alpha_max` (and `momentum_mean` with a learned momentum).
    """
    meta_type = meta_type_of(initial_meta)
    specs = tf.nest.map_structure(lambda a: tf.TensorSpec(np.shape(a), tf.float32), initial_meta)

    @tff.tensorflow.computation
    def init_tf():
        return collections.OrderedDict(
            meta=tf.nest.map_structure(lambda a: tf.constant(a, tf.float32), initial_meta),
            optimizer=optimizer.initialize(specs),
        )

    state_type = init_tf.type_signature.result

    @tff.tensorflow.computation(state_type, meta_type)
    def step_tf(state, grad):
        meta, grad = python_meta(state["meta"]), python_meta(grad)
        finite = client_work.all_finite(grad)
        stepped_state, new_meta = optimizer.next(state["optimizer"], meta, grad)
        if min_meta is not None:
            new_meta = meta_model.project(new_meta, min_meta)
        new_meta = tf.nest.map_structure(lambda n, a: tf.where(finite, n, a), new_meta, meta)
        opt_state = tf.nest.map_structure(
            lambda n, o: tf.where(finite, n, o), stepped_state, state["optimizer"]
        )
        measurements = collections.OrderedDict(
            meta_gradient_norm=client_work.global_norm(grad),
            update_non_finite=tf.cast(tf.logical_not(finite), tf.int32),
            **meta_model.summary(new_meta),
        )
        return collections.OrderedDict(meta=new_meta, optimizer=opt_state), measurements

    @tff.federated_computation()
    def init_fn():
        return tff.federated_eval(init_tf, tff.SERVER)

    @tff.federated_computation(
        init_fn.type_signature.result, tff.FederatedType(meta_type, tff.SERVER)
    )
    def next_fn(state, grad):
        new_state, measurements = tff.federated_map(step_tf, (state, grad))
        return tff.templates.MeasuredProcessOutput(new_state, new_state.meta, measurements)

    return tff.templates.MeasuredProcess(init_fn, next_fn)


def _metric_names(phase_name: str, learns_meta: bool) -> dict[str, str]:
    prefix = f"{phase_name}_" if phase_name else ""
    return {
        "client_work": f"{prefix}client_work",
        "model_aggregator": "model_aggregator" if learns_meta else "aggregator",
        "meta_aggregator": "meta_aggregator",
        "model_finalizer": "finalizer",
        "meta_finalizer": "meta_update",
    }


def compose(
    algorithm: Algorithm,
    model_fn,
    client_data_type: tff.Type,
    options: Optional[AlgorithmOptions] = None,
    *,
    example_source: Optional[example_sources.ExampleSource] = None,
) -> tff.learning.templates.LearningProcess:
    """Builds `algorithm` as a LearningProcess over packed clients of `client_data_type`.

    The same as `compose_with_parts(...)[0]`; its arguments, result and errors are those.
    """
    return compose_with_parts(
        algorithm, model_fn, client_data_type, options, example_source=example_source
    )[0]


def compose_with_parts(
    algorithm: Algorithm,
    model_fn,
    client_data_type: tff.Type,
    options: Optional[AlgorithmOptions] = None,
    *,
    example_source: Optional[example_sources.ExampleSource] = None,
) -> tuple[tff.learning.templates.LearningProcess, dict]:
    """Builds `algorithm` as a LearningProcess, with the parts that measure and split its round.

    Args:
      algorithm: The record (`mfl_tff.algorithms.catalog.get(name)`).
      model_fn: No-argument callable returning a `tff.learning.models.FunctionalModel` (its own
        `loss` and metric are what clients train and report).
      client_data_type: TFF type of one packed client (`FederatedTask.client_data_type()`).
      options: `AlgorithmOptions` (None: the defaults).
      example_source: The task's `example_source` when its data is built on the workers
        (clients' `x` are codes, built into examples in the client work on the worker;
        `example_sources.build_on_worker`), or None.

    Returns:
      `(process, parts)`: a `tff.learning.templates.LearningProcess` and its `RoundParts`.
      `get_hparams(state)` is
      `OrderedDict(alpha=...)` for algorithms that learn rates, `OrderedDict(alpha=...,
      meta_model=...)` with a meta-model (`set_hparams` writes it), else the model
      optimizer's hyperparameters `OrderedDict(finalizer=...)`.

    Raises:
      TypeError: For an optimizer or aggregator of the wrong kind.
      ValueError: For an option out of range.
    """
    options = algorithm.resolve(options or AlgorithmOptions())
    algorithm.check(options)
    model = model_fn()
    phases = algorithm.phases(model, options)
    learns_meta = algorithm.learns_meta
    weights_type = client_work.model_weights_type(model)
    # Every record's options are checked before any TFF part is made from them, so a wrong kind
    # of factory is a TypeError naming the option, not an error from inside TFF.
    for name in ("model_aggregator", "meta_aggregator"):
        if getattr(options, name) is not None:
            checks.check_aggregator(name, getattr(options, name))
    optimizers = {"model": algorithm.optimizer("model", options)}
    factories = {"model": options.model_aggregator or tff.aggregators.MeanFactory()}
    aggregators = {"model": create_aggregator(factories["model"], weights_type.trainable)}
    finalizers = {
        "model": tff.learning.templates.build_apply_optimizer_finalizer(
            optimizers["model"], weights_type
        )
    }
    meta_type = None
    if learns_meta:
        initial_meta = algorithm.initial_meta(model, options)
        if not isinstance(initial_meta, collections.abc.Mapping):
            initial_meta = tuple(initial_meta)
        meta_type = meta_type_of(initial_meta)
        optimizers["meta"] = algorithm.optimizer("meta", options)
        factories["meta"] = options.meta_aggregator or tff.aggregators.MeanFactory()
        aggregators["meta"] = create_aggregator(factories["meta"], meta_type)
        min_meta = algorithm.min_meta(options) if algorithm.min_meta else None
        finalizers["meta"] = build_meta_finalizer(
            optimizers["meta"], initial_meta, min_meta=min_meta
        )
    _, meta_clip_norm = options.clip_norms()
    value_types = {"model": weights_type.trainable, "meta": meta_type}
    clip_steps = {
        stream: build_clip_step(value_types[stream], meta_clip_norm)
        for stream in (algorithm.gradient_streams(options) if meta_clip_norm else ())
    }
    works = tuple(
        client_work.build_client_work(
            phase.client_fn,
            (weights_type, meta_type) if phase.takes_meta else (weights_type,),
            client_data_type,
            cohort_size=options.cohort_size,
            vectorize_cohorts=options.vectorize_cohorts,
            example_source=example_source,
        )
        for phase in phases
    )
    data_type = (
        works[0]
        .next.type_signature.parameter[len(works[0].next.type_signature.parameter) - 1]
        .member
    )
    distributor = tff.learning.templates.build_broadcast_process(weights_type)
    initial_weights_fn = initial_model_weights_computation(model)

    def by_stream(values: dict):
        """The aggregator/finalizer state entry: the model's alone, or one per stream."""
        return collections.OrderedDict(values) if learns_meta else values["model"]

    @tff.federated_computation()
    def init_fn():
        return tff.federated_zip(
            State(
                tff.federated_eval(initial_weights_fn, tff.SERVER),
                distributor.initialize(),
                tuple(work.initialize() for work in works),
                by_stream({s: p.initialize() for s, p in aggregators.items()}),
                by_stream({s: p.initialize() for s, p in finalizers.items()}),
            )
        )

    def run_phases(state, client_data, indices):
        """Phases `indices` of a round from `state`: (state after them, their metrics)."""
        if not learns_meta:
            agg_states = {"model": state.aggregator}
            fin_states = {"model": state.finalizer}
        else:
            agg_states = {s: state.aggregator[s] for s in aggregators}
            fin_states = {s: state.finalizer[s] for s in finalizers}
        weights = state.global_model_weights
        meta = fin_states["meta"].meta if learns_meta else None
        # Every phase of a round trains from the weights the round started with.
        distributed = distributor.next(state.distributor, weights)
        metrics = collections.OrderedDict()
        distributor_state = state.distributor
        if indices[0] == 0:
            distributor_state = distributed.state
            metrics["distributor"] = distributed.measurements
        work_states = [state.client_work[i] for i in range(len(works))]
        for index in indices:
            phase, work = phases[index], works[index]
            names = _metric_names(phase.name, learns_meta)
            server_args = [distributed.result]
            if phase.takes_meta:
                server_args.append(tff.federated_broadcast(meta))
            output = work.next(work_states[index], *server_args, client_data)
            work_states[index] = output.state
            metrics[names["client_work"]] = output.measurements
            for stream in phase.streams:
                update = output.result.update
                if len(phase.streams) > 1:
                    update = update[stream]
                aggregated = aggregators[stream].next(
                    agg_states[stream], update, output.result.update_weight
                )
                agg_states[stream] = aggregated.state
                metrics[names[f"{stream}_aggregator"]] = aggregated.measurements
                result = aggregated.result
                if stream in clip_steps:
                    result, clipping = tff.federated_map(clip_steps[stream], result)
                    metrics[f"{stream}_clipping"] = clipping
                if stream == "model":
                    finalized = finalizers["model"].next(fin_states["model"], weights, result)
                    weights = finalized.result
                else:
                    finalized = finalizers["meta"].next(fin_states["meta"], result)
                    meta = finalized.result
                fin_states[stream] = finalized.state
                metrics[names[f"{stream}_finalizer"]] = finalized.measurements
        new_state = State(
            weights,
            distributor_state,
            tuple(work_states),
            by_stream(agg_states),
            by_stream(fin_states),
        )
        return tff.federated_zip(new_state), tff.federated_zip(metrics)

    round_types = (init_fn.type_signature.result, tff.FederatedType(data_type, tff.CLIENTS))

    @tff.federated_computation(*round_types)
    def next_fn(state, client_data):
        new_state, metrics = run_phases(state, client_data, range(len(phases)))
        return tff.learning.templates.LearningProcessOutput(new_state, metrics)

    def phase_computation(index):
        @tff.federated_computation(*round_types)
        def phase_fn(state, client_data):
            return run_phases(state, client_data, [index])

        return phase_fn

    # A round whose phases aggregate one after the other, as separate computations, each with
    # one layer of aggregations: what several workers can run (`mfl_tff.training.multi_worker`).
    phase_computations = (
        tuple(phase_computation(i) for i in range(len(phases))) if len(phases) > 1 else ()
    )

    state_type = init_fn.type_signature.result.member

    def replace(state, *, weights=None, finalizer=None):
        return State(
            state.global_model_weights if weights is None else weights,
            state.distributor,
            state.client_work,
            state.aggregator,
            state.finalizer if finalizer is None else finalizer,
        )

    @tff.tensorflow.computation(state_type)
    def get_model_weights(state):
        return state.global_model_weights

    @tff.tensorflow.computation(state_type, state_type.global_model_weights)
    def set_model_weights(state, weights):
        return replace(state, weights=weights)

    if learns_meta:
        # Rates alone are `OrderedDict(alpha=...)`; a meta-model's hparams are its meta-parameters
        # `OrderedDict(alpha=..., meta_model=...)`, everything a new client needs to adapt.
        structured = isinstance(initial_meta, collections.abc.Mapping)

        @tff.tensorflow.computation(state_type)
        def get_hparams(state):
            meta = python_meta(state.finalizer["meta"]["meta"])
            return meta if structured else collections.OrderedDict(alpha=meta)

        @tff.tensorflow.computation(state_type, get_hparams.type_signature.result)
        def set_hparams(state, new_hparams):
            new_hparams = python_meta(new_hparams)
            finalizer = collections.OrderedDict(
                model=state.finalizer["model"],
                meta=collections.OrderedDict(
                    meta=new_hparams if structured else new_hparams["alpha"],
                    optimizer=state.finalizer["meta"]["optimizer"],
                ),
            )
            return replace(state, finalizer=finalizer)

    else:

        @tff.tensorflow.computation(state_type)
        def get_hparams(state):
            return collections.OrderedDict(
                finalizer=finalizers["model"].get_hparams(state.finalizer)
            )

        @tff.tensorflow.computation(state_type, get_hparams.type_signature.result)
        def set_hparams(state, new_hparams):
            return replace(
                state,
                finalizer=finalizers["model"].set_hparams(
                    state.finalizer, new_hparams["finalizer"]
                ),
            )

    process = tff.learning.templates.LearningProcess(
        init_fn,
        next_fn,
        get_model_weights,
        set_model_weights,
        get_hparams_fn=get_hparams,
        set_hparams_fn=set_hparams,
    )
    stream_aggregators = {
        stream: (aggregator, sum(stream in phase.streams for phase in phases))
        for stream, aggregator in aggregators.items()
    }
    return process, RoundParts(stream_aggregators, phase_computations)
