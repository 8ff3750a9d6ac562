"""Tests of `mfl_tff.models.functional`: Keras builders as seeded `FunctionalModel`s.

Functional models only run in a graph: inside a `tff.tensorflow.computation` (whose type signature
gives the output shape without executing anything) or a `tf.Graph` run by a session (for values).
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_federated as tff

from mfl_tff.data import registry
from mfl_tff.models import functional, keras_models

BATCH = 4


def _digits_mlp(seed):
    return functional.functional_model(
        functools.partial(keras_models.mlp, (8, 8), (64, 64), 10),
        x_shape=(8, 8),
        problem="classification",
        seed=seed,
    )


def _flat(weights):
    trainable, non_trainable = functional.initial_weights(weights)
    return list(trainable) + list(non_trainable)


@pytest.fixture(scope="module")
def seed3_weights():
    return _flat(_digits_mlp(seed=3))


def test_same_seed_gives_identical_initial_weights(seed3_weights):
    first = seed3_weights
    tf.random.uniform([5])  # unrelated random ops in between must not matter
    np.random.default_rng().random()
    second = _flat(_digits_mlp(seed=3))
    assert [w.shape for w in first] == [(64, 64), (64,), (64, 64), (64,), (64, 10), (10,)]
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)


def test_different_seeds_give_different_initial_weights(seed3_weights):
    first, second = seed3_weights, _flat(_digits_mlp(seed=4))
    kernels = [(a, b) for a, b in zip(first, second) if a.ndim == 2]
    assert all(not np.array_equal(a, b) for a, b in kernels)


def test_initial_weights_are_numpy_and_non_trivial():
    trainable, non_trainable = functional.initial_weights(_digits_mlp(seed=0))
    assert non_trainable == ()
    assert all(isinstance(w, np.ndarray) for w in trainable)
    assert np.std(trainable[0]) > 0.01  # Glorot-initialised, not zeros


@pytest.mark.parametrize(
    "problem, y_shape, y_dtype",
    [("classification", [None], tf.int32), ("regression", [None, 1], tf.float32)],
)
def test_input_spec_follows_the_problem(problem, y_shape, y_dtype):
    model = functional.functional_model(
        functools.partial(keras_models.mlp, (3,), (4,), 1), x_shape=(3,), problem=problem
    )
    x_spec, y_spec = model.input_spec
    assert x_spec.shape.as_list() == [None, 3] and x_spec.dtype == tf.float32
    assert y_spec.shape.as_list() == y_shape and y_spec.dtype == y_dtype


def test_unknown_problem_raises():
    with pytest.raises(ValueError, match="problem"):
        functional.functional_model(
            functools.partial(keras_models.softmax_regression, 3, 2), x_shape=(3,), problem="rank"
        )


BUILTIN_MODELS = [
    ("digits", dict(num_train_clients=5, num_eval_clients=2), (8, 8), 10),
    ("digits", dict(num_train_clients=5, num_eval_clients=2, model="cnn"), (8, 8), 10),
    ("digits_fewshot", dict(ways=5, num_train_clients=5), (8, 8), 5),
    ("digits_fewshot", dict(ways=3, model="cnn", num_train_clients=5), (8, 8), 3),
    ("sinusoid", dict(num_train_clients=5), (1,), 1),
    ("synthetic", dict(num_train_clients=5), (60,), 10),
]


@pytest.mark.parametrize("name, options, x_shape, outputs", BUILTIN_MODELS)
def test_builtin_models_predict_inside_a_tff_computation(name, options, x_shape, outputs):
    task = registry.get_task(name, **options)
    model = task.model_fn()

    @tff.tensorflow.computation
    def predict():
        x = tf.zeros([BATCH, *x_shape])
        return model.predict_on_batch(model.initial_weights, x, training=False)

    result = predict.type_signature.result
    assert tuple(result.shape) == (BATCH, outputs)
    assert result.dtype == np.float32
    # The packed data of the task fits the model's input spec.
    (packed,) = task.train_clients(task.train_data.client_ids[:1])
    assert packed["support"]["x"].shape[2:] == x_shape
    x_spec, y_spec = model.input_spec
    assert packed["support"]["y"].shape[2:] == tuple(y_spec.shape[1:])


def test_predictions_match_a_numpy_forward_pass():
    model = _digits_mlp(seed=1)
    (w1, b1, w2, b2, w3, b3), _ = functional.initial_weights(model)
    x = np.random.default_rng(0).random((BATCH, 8, 8)).astype(np.float32)
    with tf.Graph().as_default() as graph:
        out = model.predict_on_batch(model.initial_weights, tf.constant(x), training=False)
        with tf.compat.v1.Session(graph=graph) as session:
            got = session.run(out)
    h = np.maximum(x.reshape(BATCH, 64) @ w1 + b1, 0.0)
    h = np.maximum(h @ w2 + b2, 0.0)
    np.testing.assert_allclose(got, h @ w3 + b3, rtol=1e-5, atol=1e-5)


def test_predictions_follow_the_weights_passed_in():
    # Weights are inputs, not captured variables: that is what lets meta-gradients flow.
    model = functional.functional_model(
        functools.partial(keras_models.softmax_regression, 3, 2),
        x_shape=(3,),
        problem="classification",
    )
    kernel = np.arange(6, dtype=np.float32).reshape(3, 2)
    bias = np.array([1.0, -1.0], np.float32)
    x = np.array([[1.0, 0.0, 2.0]], np.float32)
    with tf.Graph().as_default() as graph:
        out = model.predict_on_batch(((kernel, bias), ()), tf.constant(x), training=False)
        with tf.compat.v1.Session(graph=graph) as session:
            got = session.run(out)
    np.testing.assert_allclose(got, [[0.0 + 8.0 + 1.0, 1.0 + 10.0 - 1.0]])


def test_building_a_model_leaves_numpy_global_random_state_alone():
    np.random.seed(12345)
    expected = np.random.random(3)
    np.random.seed(12345)
    _digits_mlp(seed=0)
    np.testing.assert_array_equal(np.random.random(3), expected)
