"""Tests of `mfl_tff.algorithms.meta_composer`: the alpha finalizer and the theta+alpha process.

The alpha finalizer is checked against closed-form optimizer steps in numpy. The process is built
with a round written here from TFF's public API: every client sends the model update `n_i * ones`
and the alpha meta-gradient `-n_i * ones` with weight n_i (its support examples), so a round's
result is known in closed form.
"""

from __future__ import annotations

import collections

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_federated as tff

from mfl_tff.algorithms import meta_composer
from mfl_tff.models import functional, keras_models

MIN_ALPHA = 0.01
SIZES = (2, 6)
STATE_FIELDS = (
    "global_model_weights",
    "alpha",
    "distributor",
    "model_aggregator",
    "meta_aggregator",
    "model_finalizer",
    "meta_finalizer",
)


pytestmark = pytest.mark.usefixtures("tff_local_execution")


ALPHA = (np.float32(0.1), np.array([0.05, 0.2, 0.3], np.float32))
ALPHA_TYPE = tff.types.to_type(((np.float32, ()), (np.float32, (3,))))


def test_alpha_type_of():
    assert meta_composer.alpha_type_of(ALPHA).is_equivalent_to(ALPHA_TYPE)
    per_layer = (np.float32(1.0),) * 4
    assert meta_composer.alpha_type_of(per_layer).is_equivalent_to(
        tff.types.to_type(((np.float32, ()),) * 4)
    )


def finalizer(optimizer, min_alpha):
    return meta_composer.build_alpha_finalizer(optimizer, ALPHA_TYPE, min_alpha=min_alpha)


@pytest.fixture(scope="module")
def sgd_finalizer():
    return finalizer(tff.learning.optimizers.build_sgdm(learning_rate=0.5), MIN_ALPHA)


def flat(values):
    return np.concatenate([np.ravel(np.asarray(v, np.float64)) for v in values])


def test_alpha_finalizer_steps_then_projects(sgd_finalizer):
    grad = (np.float32(-0.4), np.array([0.02, 0.5, -1.0], np.float32))
    output = sgd_finalizer.next(sgd_finalizer.initialize(), ALPHA, grad)
    expected = np.maximum(flat(ALPHA) - 0.5 * flat(grad), MIN_ALPHA)
    np.testing.assert_allclose(flat(output.result), expected, rtol=1e-6)
    assert flat(output.result)[2] == pytest.approx(MIN_ALPHA)  # 0.2 - 0.25 projected
    m = output.measurements
    assert m["meta_gradient_norm"] == pytest.approx(np.linalg.norm(flat(grad)), rel=1e-6)
    assert m["alpha_min"] == pytest.approx(expected.min())
    assert m["alpha_max"] == pytest.approx(expected.max())
    assert m["alpha_mean"] == pytest.approx(expected.mean(), rel=1e-6)


def test_alpha_finalizer_without_min_alpha_is_unconstrained():
    process = finalizer(tff.learning.optimizers.build_sgdm(learning_rate=0.5), None)
    grad = (np.float32(1.0), np.array([1.0, 1.0, 1.0], np.float32))
    output = process.next(process.initialize(), ALPHA, grad)
    np.testing.assert_allclose(flat(output.result), flat(ALPHA) - 0.5, rtol=1e-6)
    assert flat(output.result).min() < 0


def test_alpha_finalizer_threads_the_optimizer_state():
    """Heavy-ball momentum: the second step uses the first step's gradient too."""
    process = finalizer(tff.learning.optimizers.build_sgdm(learning_rate=0.1, momentum=0.9), None)
    g1 = (np.float32(1.0), np.array([1.0, -2.0, 0.5], np.float32))
    g2 = (np.float32(-0.5), np.array([0.0, 1.0, 1.0], np.float32))
    first = process.next(process.initialize(), ALPHA, g1)
    second = process.next(first.state, first.result, g2)
    a1 = flat(ALPHA) - 0.1 * flat(g1)
    a2 = a1 - 0.1 * (0.9 * flat(g1) + flat(g2))
    np.testing.assert_allclose(flat(second.result), a2, rtol=1e-5)


def test_alpha_finalizer_skips_a_non_finite_meta_gradient(sgd_finalizer):
    grad = (np.float32(np.nan), np.array([np.nan] * 3, np.float32))
    output = sgd_finalizer.next(sgd_finalizer.initialize(), ALPHA, grad)
    np.testing.assert_array_equal(flat(output.result), flat(ALPHA))


# ---------------------------------------------------------------------------------------------
# build_meta_process with a hand-written round.


@pytest.fixture(scope="module")
def model():
    return functional.functional_model(
        lambda: keras_models.softmax_regression(2, 2), x_shape=(2,), problem="classification"
    )


def client(n):
    mask = np.zeros((1, 8), np.float32)
    mask[0, :n] = 1.0
    return collections.OrderedDict(x=np.zeros((1, 8, 2), np.float32), mask=mask)


@pytest.fixture(scope="module")
def process(model):
    trainable = model.initial_weights[0]
    weights_type = tff.types.to_type(
        tff.learning.models.ModelWeights(
            trainable=tuple((np.float32, np.shape(w)) for w in trainable), non_trainable=()
        )
    )
    alpha0 = (np.float32(0.1),) * len(trainable)
    alpha_type = meta_composer.alpha_type_of(alpha0)
    data_type = tff.types.tensorflow_to_type(
        tf.nest.map_structure(lambda a: tf.TensorSpec(a.shape, tf.as_dtype(a.dtype)), client(1))
    )

    @tff.tensorflow.computation(weights_type, alpha_type, data_type)
    def client_fn(weights, alpha, data):
        n = tf.reduce_sum(data["mask"])
        update = tuple(tf.ones_like(w) * n for w in weights.trainable)
        meta_grad = tuple(-n * tf.ones_like(a) for a in alpha)
        return update, meta_grad, n

    def round_fn(parts, state, client_data):
        distributed = parts["distributor"].next(state.distributor, state.global_model_weights)
        update, meta_grad, weight = tff.federated_map(
            client_fn,
            (distributed.result, tff.federated_broadcast(state.alpha), client_data),
        )
        model_agg = parts["model_aggregator"].next(state.model_aggregator, update, weight)
        meta_agg = parts["meta_aggregator"].next(state.meta_aggregator, meta_grad, weight)
        model_fin = parts["model_finalizer"].next(
            state.model_finalizer, state.global_model_weights, model_agg.result
        )
        meta_fin = parts["meta_finalizer"].next(state.meta_finalizer, state.alpha, meta_agg.result)
        new_state = collections.OrderedDict(
            global_model_weights=model_fin.result,
            alpha=meta_fin.result,
            distributor=distributed.state,
            model_aggregator=model_agg.state,
            meta_aggregator=meta_agg.state,
            model_finalizer=model_fin.state,
            meta_finalizer=meta_fin.state,
        )
        return new_state, collections.OrderedDict(meta_update=meta_fin.measurements)

    return meta_composer.build_meta_process(
        model=model,
        initial_alpha=alpha0,
        round_fn=round_fn,
        client_data_type=data_type,
        model_aggregator=tff.aggregators.MeanFactory(),
        meta_aggregator=tff.aggregators.MeanFactory(),
        server_optimizer=tff.learning.optimizers.build_sgdm(learning_rate=0.5),
        meta_optimizer=tff.learning.optimizers.build_sgdm(learning_rate=0.01),
        min_alpha=MIN_ALPHA,
    )


def test_meta_process_state_and_round(process, model):
    state = process.initialize()
    assert list(state) == list(STATE_FIELDS)
    np.testing.assert_allclose(flat(process.get_hparams(state)["alpha"]), 0.1)
    output = process.next(state, [client(n) for n in SIZES])
    sizes = np.asarray(SIZES, np.float64)
    mean = np.sum(sizes * sizes) / np.sum(sizes)  # weighted mean of n_i (and of -n_i)
    for got, w0 in zip(process.get_model_weights(output.state).trainable, model.initial_weights[0]):
        np.testing.assert_allclose(got, np.asarray(w0) - 0.5 * mean, rtol=1e-6)
    np.testing.assert_allclose(
        flat(process.get_hparams(output.state)["alpha"]), 0.1 + 0.01 * mean, rtol=1e-6
    )
    assert output.metrics["meta_update"]["alpha_min"] == pytest.approx(0.1 + 0.01 * mean)


def test_meta_process_hparams_and_model_weights_round_trip(process, model):
    state = process.initialize()
    alpha = tuple(np.float32(v) for v in (0.3, 0.7))
    state = process.set_hparams(state, {"alpha": alpha})
    np.testing.assert_allclose(flat(process.get_hparams(state)["alpha"]), flat(alpha))
    start = tff.learning.models.ModelWeights(
        trainable=tuple(np.full(np.shape(w), 2.0, np.float32) for w in model.initial_weights[0]),
        non_trainable=(),
    )
    state = process.set_model_weights(state, start)
    for got in process.get_model_weights(state).trainable:
        np.testing.assert_array_equal(got, 2.0)
    np.testing.assert_allclose(flat(process.get_hparams(state)["alpha"]), flat(alpha))
    output = process.next(state, [client(4)])
    for got in process.get_model_weights(output.state).trainable:
        np.testing.assert_allclose(got, 2.0 - 0.5 * 4, rtol=1e-6)
    np.testing.assert_allclose(
        flat(process.get_hparams(output.state)["alpha"]), flat(alpha) + 0.01 * 4, rtol=1e-6
    )


def test_wrong_optimizer_or_aggregator_kinds_are_type_errors(model):
    common = dict(
        model=model,
        initial_alpha=(np.float32(0.1),),
        round_fn=None,
        client_data_type=tff.types.to_type(np.float32),
        model_aggregator=tff.aggregators.MeanFactory(),
        meta_aggregator=tff.aggregators.MeanFactory(),
        server_optimizer=tff.learning.optimizers.build_sgdm(1.0),
        meta_optimizer=tff.learning.optimizers.build_sgdm(1.0),
        min_alpha=None,
    )
    with pytest.raises(TypeError, match=r"meta_optimizer must be a tff\.learning\.optimizers"):
        meta_composer.build_meta_process(**{**common, "meta_optimizer": tf.keras.optimizers.SGD()})
    with pytest.raises(TypeError, match=r"meta_aggregator must be a tff\.aggregators\.Weighted"):
        meta_composer.build_meta_process(
            **{**common, "meta_aggregator": tff.aggregators.MeanFactory}
        )
