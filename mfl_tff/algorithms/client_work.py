"""Client work: the client result every client function returns, and TFF processes around it.

A client function is plain TensorFlow over one packed client. `build_client_computation` wraps it
in a `tff.tensorflow.computation` (mapped over the clients of a cohort: `cohorts.map_cohort`) and
`build_client_work` in a `tff.templates.MeasuredProcess` whose `next` maps it over CLIENTS and
returns a `tff.learning.templates.ClientResult` with the clients' metrics summed in one intrinsic.

Data built on the workers (`FederatedTask.example_source`): a packed client's `x` are int32 codes.
`example_sources.build_on_worker`, inside the client computation (and the personalization
evaluation's), turns them into the examples before the algorithm's client function runs, so it
runs on the worker and the driver sends only codes each round.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Sequence
from typing import Optional

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from mfl_tff.algorithms import cohorts
from mfl_tff.data import example_sources


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
    # Spelled out rather than tf.linalg.global_norm: its L2Loss op has no vectorized_map
    # converter, which would force a while_loop inside client cohorts.
    return tf.sqrt(tf.add_n([tf.reduce_sum(tf.square(t)) for t in tf.nest.flatten(structure)]))


def client_output(update, weight, metrics) -> collections.OrderedDict:
    """A client's result, with a non-finite update rejected: zeroed and given weight 0.

    Averaging in one NaN would poison the global model; TFF's own client works do the same. An
    update of finite values whose L2 norm overflows float32 is rejected too: clipping it (DP,
    robust aggregation) would turn it into NaN (`tf.clip_by_global_norm` of an infinite norm) and
    void the whole round.

    Args:
      update: The structure the server aggregates (a model delta or a meta-gradient).
      weight: The client's aggregation weight (its number of examples).
      metrics: `OrderedDict` of scalar float metrics; averaged over accepted clients by weight.
    """
    norm = global_norm(update)
    finite = tf.logical_and(
        tf.logical_and(all_finite(update), all_finite(metrics)), tf.math.is_finite(norm)
    )
    weight = tf.cast(weight, tf.float32)
    update = tf.nest.map_structure(lambda u: tf.where(finite, u, tf.zeros_like(u)), update)
    metrics = collections.OrderedDict(
        (k, tf.where(finite, tf.cast(v, tf.float32), 0.0)) for k, v in metrics.items()
    )
    metrics["update_norm"] = tf.where(finite, norm, 0.0)
    return collections.OrderedDict(
        update=update,
        update_weight=tf.where(finite, weight, 0.0),
        metrics=metrics,
        num_examples=weight,
        rejected=tf.cast(tf.logical_not(finite), tf.int32),
        # Padding clients of a cohort have no examples and are not counted.
        num_clients=tf.cast(weight > 0, tf.int32),
    )


def federated_client_metrics(out) -> tff.Value:
    """Server-side summary of `client_output`s mapped over CLIENTS: each metric averaged by
    update weight (rejected clients count 0), plus example and client counts.

    Computed as one `federated_sum` of a structure (weighted metrics, weights, counts) and one
    division at the server, not as a `federated_mean` or `federated_sum` per value: the TFF
    runtime charges every intrinsic a fixed cost each round (README, "Performance").
    """
    member = out.type_signature.member
    metric_names = tff.structure.name_list(member.metrics)

    @tff.tensorflow.computation(member)
    def weigh(client):
        weight = client["update_weight"]
        return collections.OrderedDict(
            weighted=collections.OrderedDict(
                (name, client["metrics"][name] * weight) for name in metric_names
            ),
            weight=weight,
            num_examples=client["num_examples"],
            num_clients=client["num_clients"],
            num_clients_rejected=client["rejected"],
        )

    sums = tff.federated_sum(tff.federated_map(weigh, out))

    @tff.tensorflow.computation(sums.type_signature.member)
    def divide(total):
        # A plain division, as `tff.federated_mean`'s: NaN when every weight is 0.
        summary = collections.OrderedDict(
            (name, total["weighted"][name] / total["weight"]) for name in metric_names
        )
        for name in ("num_examples", "num_clients", "num_clients_rejected"):
            summary[name] = total[name]
        return summary

    return tff.federated_map(divide, sums)


def build_client_computation(
    client_fn: Callable,
    server_arg_types: Sequence[tff.Type],
    client_data_type: tff.Type,
    *,
    cohort_size: Optional[int] = None,
    vectorize_cohorts: bool = False,
    example_source: Optional[example_sources.ExampleSource] = None,
) -> tff.Computation:
    """Wraps `client_fn(*server_args, data) -> client_output(...)` as a TFF computation.

    With `cohort_size`, the computation takes `cohort_size` stacked clients instead of one and
    returns their reduced output (see `mfl_tff.algorithms.cohorts`), its clients run in a loop or,
    with `vectorize_cohorts`, under `tf.vectorized_map`. With `example_source`, the
    clients' `x` are its codes (`client_data_type` says int32), and `client_fn` gets the examples
    built from them (`example_sources.build_on_worker`, computed on the worker).
    """
    if cohort_size is None:
        data_type = client_data_type
    else:
        data_type = cohorts.stacked_type(client_data_type, cohort_size)

    def run(server_args, data):
        data = example_sources.build_on_worker(data, example_source)
        if cohort_size is None:
            return client_fn(*server_args, data)
        return cohorts.map_cohort(client_fn, server_args, data, vectorize=vectorize_cohorts)

    # TFF computations take no *args, so the two arities the phases use are spelled out.
    if len(server_arg_types) == 1:

        @tff.tensorflow.computation(server_arg_types[0], data_type)
        def client_computation(weights, data):
            return run((weights,), data)

    elif len(server_arg_types) == 2:

        @tff.tensorflow.computation(server_arg_types[0], server_arg_types[1], data_type)
        def client_computation(weights, meta_params, data):
            return run((weights, meta_params), data)

    else:
        raise ValueError(f"Expected 1 or 2 server arguments, got {len(server_arg_types)}.")
    return client_computation


def build_client_work(
    client_fn: Callable,
    server_arg_types: Sequence[tff.Type],
    client_data_type: tff.Type,
    *,
    cohort_size: Optional[int] = None,
    vectorize_cohorts: bool = False,
    example_source: Optional[example_sources.ExampleSource] = None,
) -> tff.templates.MeasuredProcess:
    """A packed client work process: `client_fn` on every client (or cohort).

    `next(state@SERVER, *server_args@CLIENTS, data@CLIENTS)` (one server argument, the model
    weights, or two, the weights and the meta-parameters) returns a
    `tff.learning.templates.ClientResult(update, update_weight)` at CLIENTS and
    `federated_client_metrics` at SERVER; the state is empty. `cohort_size`,
    `vectorize_cohorts` and `example_source` are as in `build_client_computation`.
    """
    client_update = build_client_computation(
        client_fn,
        server_arg_types,
        client_data_type,
        cohort_size=cohort_size,
        vectorize_cohorts=vectorize_cohorts,
        example_source=example_source,
    )
    data_type = client_update.type_signature.parameter[len(server_arg_types)]

    @tff.federated_computation()
    def init_fn():
        return tff.federated_value((), tff.SERVER)

    def output(state, out):
        result = tff.federated_zip(
            tff.learning.templates.ClientResult(update=out.update, update_weight=out.update_weight)
        )
        return tff.templates.MeasuredProcessOutput(state, result, federated_client_metrics(out))

    state_type = init_fn.type_signature.result
    placed = [tff.FederatedType(t, tff.CLIENTS) for t in server_arg_types]
    data_at_clients = tff.FederatedType(data_type, tff.CLIENTS)
    if len(server_arg_types) == 1:

        @tff.federated_computation(state_type, placed[0], data_at_clients)
        def next_fn(state, weights, data):
            return output(state, tff.federated_map(client_update, (weights, data)))

    else:

        @tff.federated_computation(state_type, placed[0], placed[1], data_at_clients)
        def next_fn(state, weights, meta_params, data):
            return output(state, tff.federated_map(client_update, (weights, meta_params, data)))

    return tff.templates.MeasuredProcess(init_fn, next_fn)
