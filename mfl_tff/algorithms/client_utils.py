"""Pieces shared by every algorithm's client work: types, the client result, input checks."""

from __future__ import annotations

import collections

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff


def model_weights_type(model: tff.learning.models.FunctionalModel) -> tff.Type:
    """The TFF type of a FunctionalModel's weights as `tff.learning.models.ModelWeights`."""
    trainable, non_trainable = model.initial_weights
    return tff.types.to_type(
        tff.learning.models.ModelWeights(
            trainable=tuple((np.asarray(w).dtype, np.asarray(w).shape) for w in trainable),
            non_trainable=tuple((np.asarray(w).dtype, np.asarray(w).shape) for w in non_trainable),
        )
    )


def initial_model_weights(
    model: tff.learning.models.FunctionalModel,
) -> tff.learning.models.ModelWeights:
    """A FunctionalModel's initial weights as numpy `tff.learning.models.ModelWeights`."""
    trainable, non_trainable = model.initial_weights
    return tff.learning.models.ModelWeights(
        trainable=tuple(np.asarray(w) for w in trainable),
        non_trainable=tuple(np.asarray(w) for w in non_trainable),
    )


def all_finite(structure) -> tf.Tensor:
    """True when every element of every tensor in `structure` is finite."""
    return tf.reduce_all([tf.reduce_all(tf.math.is_finite(t)) for t in tf.nest.flatten(structure)])


def global_norm(structure) -> tf.Tensor:
    """L2 norm of all tensors in `structure` together."""
    return tf.linalg.global_norm(tf.nest.flatten(structure))


def client_output(update, weight, metrics) -> collections.OrderedDict:
    """A client's result, with a non-finite update rejected: zeroed and given weight 0.

    Averaging in one NaN would poison the global model; TFF's own client works do the same.

    Args:
      update: The structure the server aggregates (a model delta or a meta-gradient).
      weight: The client's aggregation weight (its number of examples).
      metrics: `OrderedDict` of scalar float metrics; averaged over accepted clients by weight.
    """
    finite = tf.logical_and(all_finite(update), all_finite(metrics))
    weight = tf.cast(weight, tf.float32)
    update = tf.nest.map_structure(lambda u: tf.where(finite, u, tf.zeros_like(u)), update)
    metrics = collections.OrderedDict(
        (k, tf.where(finite, tf.cast(v, tf.float32), 0.0)) for k, v in metrics.items()
    )
    metrics["update_norm"] = tf.where(finite, global_norm(update), 0.0)
    return collections.OrderedDict(
        update=update,
        update_weight=tf.where(finite, weight, 0.0),
        metrics=metrics,
        num_examples=weight,
        rejected=tf.cast(tf.logical_not(finite), tf.int32),
    )


def federated_client_metrics(out) -> tff.Value:
    """Server-side summary of `client_output`s mapped over CLIENTS: each metric averaged by
    update weight (rejected clients count 0), plus example and client counts."""
    metric_names = tff.structure.name_list(out.metrics.type_signature.member)
    summary = collections.OrderedDict(
        (name, tff.federated_mean(out.metrics[name], weight=out.update_weight))
        for name in metric_names
    )
    summary["num_examples"] = tff.federated_sum(out.num_examples)
    summary["num_clients"] = tff.federated_sum(tff.federated_value(1, tff.CLIENTS))
    summary["num_clients_rejected"] = tff.federated_sum(out.rejected)
    return tff.federated_zip(summary)


def build_client_work(
    client_update: tff.Computation, client_data_type: tff.Type
) -> tff.templates.MeasuredProcess:
    """Wraps a per-client `tff.tensorflow.computation(weights, data) -> client_output(...)` as a
    packed client work process with stateless server state (see `federated_client_metrics`)."""
    weights_type = client_update.type_signature.parameter[0]

    @tff.federated_computation()
    def init_fn():
        return tff.federated_value((), tff.SERVER)

    @tff.federated_computation(
        init_fn.type_signature.result,
        tff.FederatedType(weights_type, tff.CLIENTS),
        tff.FederatedType(client_data_type, tff.CLIENTS),
    )
    def next_fn(state, weights, data):
        out = tff.federated_map(client_update, (weights, data))
        result = tff.federated_zip(
            tff.learning.templates.ClientResult(update=out.update, update_weight=out.update_weight)
        )
        return tff.templates.MeasuredProcessOutput(state, result, federated_client_metrics(out))

    return tff.templates.MeasuredProcess(init_fn, next_fn)


def check_positive_rate(name: str, value: float) -> None:
    """Raises ValueError unless `value` is a finite number > 0."""
    if not isinstance(value, (int, float)) or not np.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}.")


def check_optimizer(name: str, optimizer) -> None:
    """Raises TypeError unless `optimizer` is a `tff.learning.optimizers.Optimizer`."""
    if not isinstance(optimizer, tff.learning.optimizers.Optimizer):
        raise TypeError(
            f"{name} must be a tff.learning.optimizers.Optimizer (e.g. "
            f"tff.learning.optimizers.build_adam(1e-3)), got {type(optimizer).__name__}."
        )


def check_weighted_aggregator(name: str, factory) -> None:
    """Raises TypeError unless `factory` is a weighted `tff.aggregators` factory."""
    if not isinstance(factory, tff.aggregators.WeightedAggregationFactory):
        raise TypeError(
            f"{name} must be a tff.aggregators.WeightedAggregationFactory (e.g. "
            f"tff.aggregators.MeanFactory()), got {type(factory).__name__}."
        )


def check_positive_int(name: str, value: int) -> None:
    """Raises ValueError unless `value` is an int >= 1."""
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}.")
