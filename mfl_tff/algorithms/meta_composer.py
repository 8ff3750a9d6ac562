"""Parts shared by the algorithms that learn rates alpha next to the model (mfl, meta_sgd).

Their server state is `OrderedDict(global_model_weights, alpha, distributor, model_aggregator,
meta_aggregator, model_finalizer, meta_finalizer)`: the model half is exactly TFF's (broadcast,
a `tff.aggregators` factory, `build_apply_optimizer_finalizer`); the alpha half mirrors it with its
own aggregator and a finalizer that steps a `tff.learning.optimizers.Optimizer` on alpha.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from typing import Optional

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from mfl_tff.algorithms import client_utils, composers
from mfl_tff.meta import hparams

STATE_FIELDS = (
    "global_model_weights",
    "alpha",
    "distributor",
    "model_aggregator",
    "meta_aggregator",
    "model_finalizer",
    "meta_finalizer",
)


def next_state(*, weights, alpha, distributed, model_agg, meta_agg, model_fin, meta_fin):
    """The state after a round, from the round's outputs of each part (see `STATE_FIELDS`)."""
    return collections.OrderedDict(
        global_model_weights=weights,
        alpha=alpha,
        distributor=distributed.state,
        model_aggregator=model_agg.state,
        meta_aggregator=meta_agg.state,
        model_finalizer=model_fin.state,
        meta_finalizer=meta_fin.state,
    )


def build_alpha_finalizer(
    optimizer: tff.learning.optimizers.Optimizer,
    alpha_type: tff.Type,
    *,
    min_alpha: Optional[float],
) -> tff.templates.MeasuredProcess:
    """Steps `optimizer` on alpha with the aggregated meta-gradient, then (if `min_alpha` is set)
    projects alpha onto [min_alpha, inf), which is how alpha stays positive.

    next(state@SERVER, alpha@SERVER, meta_gradient@SERVER) -> new alpha, with measurements
    `meta_gradient_norm`, `alpha_mean`, `alpha_min`, `alpha_max` (of the new alpha).
    """
    specs = tf.nest.map_structure(
        lambda t: tf.TensorSpec(t.shape, tf.as_dtype(t.dtype)),
        tff.types.type_to_tf_tensor_specs(alpha_type),
    )

    @tff.tensorflow.computation
    def init_tf():
        return optimizer.initialize(specs)

    opt_state_type = init_tf.type_signature.result

    @tff.tensorflow.computation(opt_state_type, alpha_type, alpha_type)
    def step_tf(opt_state, alpha, grad):
        # A round whose clients were all rejected aggregates to 0/0 = NaN; like TFF's model
        # finalizer, skip the step rather than let NaN into alpha for good.
        finite = client_utils.all_finite(grad)
        stepped_state, new_alpha = optimizer.next(opt_state, tuple(alpha), tuple(grad))
        if min_alpha is not None:
            new_alpha = hparams.project_positive(new_alpha, min_alpha)
        new_alpha = tuple(tf.where(finite, n, a) for n, a in zip(new_alpha, alpha))
        opt_state = tf.nest.map_structure(
            lambda n, o: tf.where(finite, n, o), stepped_state, opt_state
        )
        measurements = collections.OrderedDict(
            meta_gradient_norm=client_utils.global_norm(grad),
            update_non_finite=tf.cast(tf.logical_not(finite), tf.int32),
            **hparams.summary(new_alpha),
        )
        return opt_state, new_alpha, measurements

    @tff.federated_computation()
    def init_fn():
        return tff.federated_eval(init_tf, tff.SERVER)

    @tff.federated_computation(
        init_fn.type_signature.result,
        tff.FederatedType(alpha_type, tff.SERVER),
        tff.FederatedType(alpha_type, tff.SERVER),
    )
    def next_fn(state, alpha, grad):
        opt_state, new_alpha, measurements = tff.federated_map(step_tf, (state, alpha, grad))
        return tff.templates.MeasuredProcessOutput(opt_state, new_alpha, measurements)

    return tff.templates.MeasuredProcess(init_fn, next_fn)


def alpha_type_of(alpha: tuple) -> tff.Type:
    """TFF type of an alpha tuple of numpy arrays."""
    return tff.types.to_type(tuple((np.float32, np.shape(a)) for a in alpha))


def build_meta_process(
    *,
    model: tff.learning.models.FunctionalModel,
    initial_alpha: tuple,
    round_fn: Callable,
    client_data_type: tff.Type,
    model_aggregator: tff.aggregators.AggregationFactory,
    meta_aggregator: tff.aggregators.AggregationFactory,
    server_optimizer: tff.learning.optimizers.Optimizer,
    meta_optimizer: tff.learning.optimizers.Optimizer,
    min_alpha: Optional[float],
) -> tff.learning.templates.LearningProcess:
    """A LearningProcess whose state carries theta and alpha.

    Args:
      model: The FunctionalModel.
      initial_alpha: Initial meta-parameters (`mfl_tff.meta.hparams.initial_alpha`).
      round_fn: `round_fn(parts, state, client_data) -> (new_state_fields, metrics)`, traced in a
        `tff.federated_computation`; `parts` is an OrderedDict of the built processes
        (distributor, model_aggregator, meta_aggregator, model_finalizer, meta_finalizer).
      client_data_type: TFF type of one packed client.
      model_aggregator: `tff.aggregators` factory for the model updates, weighted or unweighted
        (`composers.create_aggregator`: either way its process takes (state, value, weight)).
      meta_aggregator: `tff.aggregators` factory for the alpha meta-gradients, likewise.
      server_optimizer: Optimizer applied to theta.
      meta_optimizer: Optimizer applied to alpha.
      min_alpha: Lower bound projected onto after each alpha step (None: unconstrained).

    Returns:
      A `tff.learning.templates.LearningProcess`; `get_hparams` / `set_hparams` read and write
      `OrderedDict(alpha=...)`, the learned meta-parameters.
    """
    for name, opt in (("server_optimizer", server_optimizer), ("meta_optimizer", meta_optimizer)):
        client_utils.check_optimizer(name, opt)
    for name, agg in (("model_aggregator", model_aggregator), ("meta_aggregator", meta_aggregator)):
        client_utils.check_aggregator(name, agg)
    weights_type = client_utils.model_weights_type(model)
    alpha_type = alpha_type_of(initial_alpha)
    parts = collections.OrderedDict(
        distributor=tff.learning.templates.build_broadcast_process(weights_type),
        model_aggregator=composers.create_aggregator(model_aggregator, weights_type.trainable),
        meta_aggregator=composers.create_aggregator(meta_aggregator, alpha_type),
        model_finalizer=tff.learning.templates.build_apply_optimizer_finalizer(
            server_optimizer, weights_type
        ),
        meta_finalizer=build_alpha_finalizer(meta_optimizer, alpha_type, min_alpha=min_alpha),
    )
    initial_weights_fn = composers.initial_model_weights_computation(model)

    @tff.tensorflow.computation
    def initial_alpha_fn():
        return tuple(tf.constant(a, tf.float32) for a in initial_alpha)

    @tff.federated_computation()
    def init_fn():
        return tff.federated_zip(
            collections.OrderedDict(
                global_model_weights=tff.federated_eval(initial_weights_fn, tff.SERVER),
                alpha=tff.federated_eval(initial_alpha_fn, tff.SERVER),
                **{name: process.initialize() for name, process in parts.items()},
            )
        )

    @tff.federated_computation(
        init_fn.type_signature.result, tff.FederatedType(client_data_type, tff.CLIENTS)
    )
    def next_fn(state, client_data):
        new_state, metrics = round_fn(parts, state, client_data)
        return tff.learning.templates.LearningProcessOutput(
            tff.federated_zip(new_state), tff.federated_zip(metrics)
        )

    state_type = init_fn.type_signature.result.member

    def replace(state, **fields):
        return collections.OrderedDict(
            (name, fields.get(name, state[name])) for name in STATE_FIELDS
        )

    @tff.tensorflow.computation(state_type)
    def get_model_weights(state):
        return state["global_model_weights"]

    @tff.tensorflow.computation(state_type, state_type.global_model_weights)
    def set_model_weights(state, weights):
        return replace(state, global_model_weights=weights)

    @tff.tensorflow.computation(state_type)
    def get_hparams(state):
        return collections.OrderedDict(alpha=state["alpha"])

    @tff.tensorflow.computation(state_type, get_hparams.type_signature.result)
    def set_hparams(state, new_hparams):
        return replace(state, alpha=new_hparams["alpha"])

    return tff.learning.templates.LearningProcess(
        init_fn,
        next_fn,
        get_model_weights,
        set_model_weights,
        get_hparams_fn=get_hparams,
        set_hparams_fn=set_hparams,
    )
