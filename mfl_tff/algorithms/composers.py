"""Composing named parts into a `tff.learning.templates.LearningProcess` over packed client data.

TFF's `compose_learning_process` and `ClientWorkProcess` require client data to be `tf.data`
sequences; ours is packed tensors (see `mfl_tff.data.packing` for why), so this module composes the
same four parts (distributor, client work, aggregator, finalizer) with the same state layout
(`tff.learning.templates.LearningAlgorithmState`) and the same metrics layout, minus that check.
"""

from __future__ import annotations

import collections

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from mfl_tff.algorithms import client_utils


def check_client_work(client_work: tff.templates.MeasuredProcess) -> None:
    """Validates a packed client work: next(state@SERVER, weights@CLIENTS, data@CLIENTS).

    Raises:
      TypeError: If the process does not have that shape.
    """
    if not isinstance(client_work, tff.templates.MeasuredProcess):
        raise TypeError(f"client_work must be a tff.templates.MeasuredProcess, got {client_work}.")
    params = client_work.next.type_signature.parameter
    if len(params) != 3 or any(p.placement != tff.CLIENTS for p in (params[1], params[2])):
        raise TypeError(
            "client_work.next must take (state@SERVER, model_weights@CLIENTS, data@CLIENTS); got "
            f"{client_work.next.type_signature}."
        )


def compose_packed_learning_process(
    *,
    initial_model_weights_fn: tff.Computation,
    model_weights_distributor: tff.templates.MeasuredProcess,
    client_work: tff.templates.MeasuredProcess,
    model_update_aggregator: tff.templates.AggregationProcess,
    model_finalizer: tff.templates.MeasuredProcess,
) -> tff.learning.templates.LearningProcess:
    """Composes the four parts of a one-pass federated algorithm into a LearningProcess.

    Args:
      initial_model_weights_fn: A no-argument `tff.Computation` returning the initial
        `tff.learning.models.ModelWeights`.
      model_weights_distributor: Broadcasts the weights, e.g.
        `tff.learning.templates.build_broadcast_process`.
      client_work: A packed client work (see `check_client_work`) whose result is a
        `tff.learning.templates.ClientResult`.
      model_update_aggregator: Aggregates the clients' updates with their weights.
      model_finalizer: Applies the aggregate at the server, e.g.
        `tff.learning.templates.build_apply_optimizer_finalizer`.

    Returns:
      A `tff.learning.templates.LearningProcess`; its metrics are
      `OrderedDict(distributor, client_work, aggregator, finalizer)` as in TFF's own composer.
    """
    check_client_work(client_work)
    state_fn = tff.learning.templates.LearningAlgorithmState
    client_data_type = client_work.next.type_signature.parameter[2]

    @tff.federated_computation()
    def init_fn():
        weights = tff.federated_eval(initial_model_weights_fn, tff.SERVER)
        return tff.federated_zip(
            state_fn(
                weights,
                model_weights_distributor.initialize(),
                client_work.initialize(),
                model_update_aggregator.initialize(),
                model_finalizer.initialize(),
            )
        )

    @tff.federated_computation(init_fn.type_signature.result, client_data_type)
    def next_fn(state, client_data):
        distributed = model_weights_distributor.next(state.distributor, state.global_model_weights)
        work = client_work.next(state.client_work, distributed.result, client_data)
        aggregated = model_update_aggregator.next(
            state.aggregator, work.result.update, work.result.update_weight
        )
        finalized = model_finalizer.next(
            state.finalizer, state.global_model_weights, aggregated.result
        )
        new_state = tff.federated_zip(
            state_fn(
                finalized.result,
                distributed.state,
                work.state,
                aggregated.state,
                finalized.state,
            )
        )
        metrics = tff.federated_zip(
            collections.OrderedDict(
                distributor=distributed.measurements,
                client_work=work.measurements,
                aggregator=aggregated.measurements,
                finalizer=finalized.measurements,
            )
        )
        return tff.learning.templates.LearningProcessOutput(new_state, metrics)

    state_type = init_fn.type_signature.result.member

    @tff.tensorflow.computation(state_type)
    def get_model_weights(state):
        return state.global_model_weights

    @tff.tensorflow.computation(state_type, state_type.global_model_weights)
    def set_model_weights(state, weights):
        return state_fn(
            weights, state.distributor, state.client_work, state.aggregator, state.finalizer
        )

    @tff.tensorflow.computation(state_type)
    def get_hparams(state):
        return collections.OrderedDict(finalizer=model_finalizer.get_hparams(state.finalizer))

    @tff.tensorflow.computation(state_type, get_hparams.type_signature.result)
    def set_hparams(state, hparams):
        return state_fn(
            state.global_model_weights,
            state.distributor,
            state.client_work,
            state.aggregator,
            model_finalizer.set_hparams(state.finalizer, hparams["finalizer"]),
        )

    return tff.learning.templates.LearningProcess(
        init_fn,
        next_fn,
        get_model_weights,
        set_model_weights,
        get_hparams_fn=get_hparams,
        set_hparams_fn=set_hparams,
    )


def initial_model_weights_computation(model) -> tff.Computation:
    """A no-argument computation returning the FunctionalModel's initial `ModelWeights`."""
    initial = client_utils.initial_model_weights(model)

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
    rejected (`client_utils.client_output` zeroes it) counts as a zero update.
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


def compose_model_update_process(
    model: tff.learning.models.FunctionalModel,
    client_work: tff.templates.MeasuredProcess,
    *,
    server_optimizer: tff.learning.optimizers.Optimizer,
    model_aggregator: tff.aggregators.AggregationFactory,
) -> tff.learning.templates.LearningProcess:
    """The usual one-pass composition: broadcast the model, run `client_work`, aggregate its
    updates with `model_aggregator` (a weighted or unweighted `tff.aggregators` factory, see
    `create_aggregator`), and apply them with `server_optimizer` (TFF's finalizer)."""
    client_utils.check_optimizer("server_optimizer", server_optimizer)
    client_utils.check_aggregator("model_aggregator", model_aggregator)
    weights_type = client_utils.model_weights_type(model)
    return compose_packed_learning_process(
        initial_model_weights_fn=initial_model_weights_computation(model),
        model_weights_distributor=tff.learning.templates.build_broadcast_process(weights_type),
        client_work=client_work,
        model_update_aggregator=create_aggregator(model_aggregator, weights_type.trainable),
        model_finalizer=tff.learning.templates.build_apply_optimizer_finalizer(
            server_optimizer, weights_type
        ),
    )
