"""Tests of `mfl_tff.algorithms.composers`: composing parts into a LearningProcess.

The client work here is written in this file with TFF's public API (not mfl_tff's client code):
every client returns the update `n_i * ones` for each weight tensor, with weight n_i = its number
of support examples. The round's result is then known in closed form: with the mean aggregator and
server SGD(lr), theta <- theta - lr * sum(n_i^2) / sum(n_i), coordinate-wise.
"""

from __future__ import annotations

import collections

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_federated as tff

from mfl_tff.algorithms import composers
from mfl_tff.models import functional, keras_models

SIZES = (3, 5, 1)  # support examples of the three clients
STATE_FIELDS = ("global_model_weights", "distributor", "client_work", "aggregator", "finalizer")


pytestmark = pytest.mark.usefixtures("tff_local_execution")


@pytest.fixture(scope="module")
def model():
    return functional.functional_model(
        lambda: keras_models.softmax_regression(3, 2), x_shape=(3,), problem="classification"
    )


def packed_client(num_support):
    def part(n):
        mask = np.zeros((2, 4), np.float32)
        mask.reshape(-1)[:n] = 1.0
        return collections.OrderedDict(
            x=np.ones((2, 4, 3), np.float32), y=np.zeros((2, 4), np.int32), mask=mask
        )

    return collections.OrderedDict(support=part(num_support), query=part(2))


@pytest.fixture(scope="module")
def clients():
    return [packed_client(n) for n in SIZES]


def weights_type_of(model):
    return tff.types.to_type(
        tff.learning.models.ModelWeights(
            trainable=tuple((np.float32, np.shape(w)) for w in model.initial_weights[0]),
            non_trainable=tuple((np.float32, np.shape(w)) for w in model.initial_weights[1]),
        )
    )


def data_type_of(client):
    return tff.types.tensorflow_to_type(
        tf.nest.map_structure(lambda a: tf.TensorSpec(a.shape, tf.as_dtype(a.dtype)), client)
    )


def make_client_work(weights_type, data_type):
    """Hand-written packed client work: update n_i * ones, weight n_i, measurement sum(n_i)."""

    @tff.tensorflow.computation(weights_type, data_type)
    def client_update(weights, data):
        n = tf.reduce_sum(data["support"]["mask"])
        update = tuple(tf.ones_like(w) * n for w in weights.trainable)
        return update, n

    @tff.federated_computation()
    def init_fn():
        return tff.federated_value(0, tff.SERVER)

    @tff.federated_computation(
        init_fn.type_signature.result,
        tff.FederatedType(weights_type, tff.CLIENTS),
        tff.FederatedType(data_type, tff.CLIENTS),
    )
    def next_fn(state, weights, data):
        update, weight = tff.federated_map(client_update, (weights, data))
        result = tff.federated_zip(
            tff.learning.templates.ClientResult(update=update, update_weight=weight)
        )
        return tff.templates.MeasuredProcessOutput(state, result, tff.federated_sum(weight))

    return tff.templates.MeasuredProcess(init_fn, next_fn)


@pytest.fixture(scope="module")
def process(model, clients):
    weights_type = weights_type_of(model)
    return composers.compose_model_update_process(
        model,
        make_client_work(weights_type, data_type_of(clients[0])),
        server_optimizer=tff.learning.optimizers.build_sgdm(learning_rate=1.0),
        model_aggregator=tff.aggregators.MeanFactory(),
    )


def expected_step(weights, lr, sizes=SIZES):
    sizes = np.asarray(sizes, np.float64)
    mean = np.sum(sizes * sizes) / np.sum(sizes)
    return [np.asarray(w, np.float64) - lr * mean for w in weights]


def assert_weights(actual, expected):
    for a, e in zip(actual, expected):
        np.testing.assert_allclose(a, e, rtol=1e-6, atol=1e-6)


def test_initial_state_holds_the_models_initial_weights(process, model):
    state = process.initialize()
    assert tuple(state._fields) == STATE_FIELDS  # tff.learning.templates.LearningAlgorithmState
    assert_weights(process.get_model_weights(state).trainable, model.initial_weights[0])


def test_one_round_is_broadcast_work_weighted_mean_and_server_step(process, clients, model):
    state = process.initialize()
    output = process.next(state, clients)
    assert_weights(
        process.get_model_weights(output.state).trainable,
        expected_step(model.initial_weights[0], 1.0),
    )
    metrics = output.metrics
    assert list(metrics) == ["distributor", "client_work", "aggregator", "finalizer"]
    assert metrics["client_work"] == sum(SIZES)
    assert metrics["finalizer"]["update_non_finite"] == 0


def test_set_model_weights_is_what_the_next_round_starts_from(process, clients, model):
    state = process.initialize()
    start = tff.learning.models.ModelWeights(
        trainable=tuple(np.full(np.shape(w), 0.25, np.float32) for w in model.initial_weights[0]),
        non_trainable=(),
    )
    state = process.set_model_weights(state, start)
    assert_weights(process.get_model_weights(state).trainable, start.trainable)
    output = process.next(state, clients[:2])
    assert_weights(
        process.get_model_weights(output.state).trainable,
        expected_step(start.trainable, 1.0, SIZES[:2]),
    )


def test_server_learning_rate_is_a_hyperparameter_of_the_state(process, clients, model):
    state = process.initialize()
    hparams = process.get_hparams(state)
    assert hparams["finalizer"]["learning_rate"] == pytest.approx(1.0)
    hparams["finalizer"]["learning_rate"] = np.float32(0.125)
    state = process.set_hparams(state, hparams)
    assert process.get_hparams(state)["finalizer"]["learning_rate"] == pytest.approx(0.125)
    output = process.next(state, clients)
    assert_weights(
        process.get_model_weights(output.state).trainable,
        expected_step(model.initial_weights[0], 0.125),
    )


def test_model_aggregator_is_the_one_given(model, clients):
    """A clipping aggregator (clip each client's update to norm C, then mean) changes the result."""
    clip = 0.5
    weights_type = weights_type_of(model)
    process = composers.compose_model_update_process(
        model,
        make_client_work(weights_type, data_type_of(clients[0])),
        server_optimizer=tff.learning.optimizers.build_sgdm(learning_rate=1.0),
        model_aggregator=tff.aggregators.clipping_factory(clip, tff.aggregators.MeanFactory()),
    )
    output = process.next(process.initialize(), clients)
    num_params = sum(np.size(w) for w in model.initial_weights[0])
    sizes = np.asarray(SIZES, np.float64)
    norms = sizes * np.sqrt(num_params)
    clipped = sizes * np.minimum(1.0, clip / norms)
    mean = np.sum(sizes * clipped) / np.sum(sizes)
    assert_weights(
        process.get_model_weights(output.state).trainable,
        [np.asarray(w, np.float64) - mean for w in model.initial_weights[0]],
    )


def test_unweighted_aggregator_counts_every_client_the_same(model, clients):
    """An unweighted factory is created with the value type only and called without weights,
    as TFF's unweighted FedAvg does: the plain mean of n_i, not the weighted one."""
    process = composers.compose_model_update_process(
        model,
        make_client_work(weights_type_of(model), data_type_of(clients[0])),
        server_optimizer=tff.learning.optimizers.build_sgdm(learning_rate=1.0),
        model_aggregator=tff.aggregators.UnweightedMeanFactory(),
    )
    output = process.next(process.initialize(), clients)
    plain_mean = np.mean(np.asarray(SIZES, np.float64))
    assert plain_mean != pytest.approx(np.sum(np.square(SIZES)) / np.sum(SIZES))
    assert_weights(
        process.get_model_weights(output.state).trainable,
        [np.asarray(w, np.float64) - plain_mean for w in model.initial_weights[0]],
    )


def test_create_aggregator_always_takes_weights():
    value_type = tff.types.to_type((np.float32, (2,)))
    for factory in (tff.aggregators.MeanFactory(), tff.aggregators.SumFactory()):
        process = composers.create_aggregator(factory, value_type)
        assert process.is_weighted
        output = process.next(
            process.initialize(),
            [np.array([1.0, 2.0], np.float32), np.array([3.0, 6.0], np.float32)],
            [np.float32(1.0), np.float32(3.0)],
        )
        expected = [2.5, 5.0] if isinstance(factory, tff.aggregators.MeanFactory) else [4.0, 8.0]
        np.testing.assert_allclose(output.result, expected)


def test_initial_model_weights_computation(model):
    weights = composers.initial_model_weights_computation(model)()
    assert_weights(weights.trainable, model.initial_weights[0])


def test_client_work_of_the_wrong_shape_is_a_type_error(model, clients):
    weights_type = weights_type_of(model)
    with pytest.raises(TypeError, match="MeasuredProcess"):
        composers.check_client_work(lambda state, weights, data: None)

    @tff.federated_computation()
    def init_fn():
        return tff.federated_value(0, tff.SERVER)

    @tff.federated_computation(
        init_fn.type_signature.result, tff.FederatedType(weights_type, tff.SERVER)
    )
    def next_fn(state, weights):
        return tff.templates.MeasuredProcessOutput(state, weights, state)

    with pytest.raises(TypeError, match=r"state@SERVER, model_weights@CLIENTS, data@CLIENTS"):
        composers.check_client_work(tff.templates.MeasuredProcess(init_fn, next_fn))


def test_bad_optimizer_or_aggregator_is_a_type_error(model, clients):
    work = make_client_work(weights_type_of(model), data_type_of(clients[0]))
    with pytest.raises(TypeError, match=r"tff\.learning\.optimizers"):
        composers.compose_model_update_process(
            model,
            work,
            server_optimizer=tf.keras.optimizers.SGD(),
            model_aggregator=tff.aggregators.MeanFactory(),
        )
    with pytest.raises(TypeError, match="WeightedAggregationFactory"):
        composers.compose_model_update_process(
            model,
            work,
            server_optimizer=tff.learning.optimizers.build_sgdm(1.0),
            model_aggregator=tff.aggregators.MeanFactory,
        )
