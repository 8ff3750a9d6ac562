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


# ---------------------------------------------------------------------------------------------
# The model's own loss and metric: per-example functions, masked means, metric states.


def np_cross_entropy(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """-log softmax(logits)[label], computed stably in float64."""
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return np.log(np.exp(shifted).sum(axis=-1)) - shifted[np.arange(len(labels)), labels]


def padded_logits(rng, num_real, capacity, num_classes):
    """Logits and labels with `num_real` real rows followed by garbage padding rows."""
    logits = rng.normal(size=(capacity, num_classes)).astype(np.float32)
    labels = rng.integers(0, num_classes, size=capacity).astype(np.int32)
    # Padding rows get extreme values: any leak into the mean would show.
    logits[num_real:] = 1e4 * rng.normal(size=(capacity - num_real, num_classes))
    mask = (np.arange(capacity) < num_real).astype(np.float32)
    return logits, labels, mask


@pytest.fixture(scope="module")
def softmax_classifier():
    return functional.functional_model(
        functools.partial(keras_models.softmax_regression, 3, 5),
        x_shape=(3,),
        problem="classification",
    )


def test_classifier_loss_is_the_masked_mean_cross_entropy(softmax_classifier):
    rng = np.random.default_rng(0)
    for num_real in (1, 5, 11, 12):
        logits, labels, mask = padded_logits(rng, num_real, 12, 5)
        got = softmax_classifier.loss(tf.constant(logits), tf.constant(labels), tf.constant(mask))
        expected = np_cross_entropy(logits[:num_real], labels[:num_real]).mean()
        assert float(got) == pytest.approx(expected, rel=1e-5)
    # No mask: the plain mean. An all-padding mask: 0, not NaN.
    logits, labels, _ = padded_logits(rng, 4, 4, 5)
    plain = softmax_classifier.loss(tf.constant(logits), tf.constant(labels))
    assert float(plain) == pytest.approx(np_cross_entropy(logits, labels).mean(), rel=1e-5)
    empty = softmax_classifier.loss(tf.constant(logits), tf.constant(labels), tf.zeros([4]))
    assert float(empty) == 0.0


def test_cross_entropy_closed_form_for_uniform_logits():
    per_example = functional.per_example_loss_fn(
        tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    got = per_example(tf.zeros([3, 7]), tf.constant([0, 3, 6]))
    np.testing.assert_allclose(got.numpy(), np.full(3, np.log(7.0)), rtol=1e-6)


def test_a_keras_loss_is_made_per_example_whatever_its_reduction():
    predictions = tf.constant([[1.0], [2.5], [-1.0], [100.0]])
    y = tf.constant([[3.0], [2.0], [-1.0], [0.0]])
    for loss in (
        tf.keras.losses.MeanSquaredError(reduction=tf.keras.losses.Reduction.SUM),
        "mse",
        "mean_squared_error",
    ):
        got = functional.per_example_loss_fn(loss)(predictions, y)
        np.testing.assert_allclose(got.numpy(), [4.0, 0.25, 0.0, 10000.0])


def test_a_loss_function_of_y_true_and_y_pred_is_used_as_given():
    def absolute_error(y_true, y_pred):
        return tf.reduce_sum(tf.abs(y_true - y_pred), axis=-1)

    got = functional.per_example_loss_fn(absolute_error)(
        tf.constant([[1.0, 2.0], [0.0, 0.0]]), tf.constant([[0.0, 0.0], [1.0, -3.0]])
    )
    np.testing.assert_allclose(got.numpy(), [3.0, 4.0])


def test_something_that_is_not_a_loss_is_a_type_error_naming_it():
    with pytest.raises(TypeError, match="loss must be .*got int"):
        functional.per_example_loss_fn(3)


def test_squared_error_averages_over_outputs_and_matches_scalar_targets_per_example():
    several = functional.squared_error(
        tf.constant([[1.0, 2.0], [0.0, 0.0]]), tf.constant([[0.0, 0.0], [1.0, 3.0]])
    )
    np.testing.assert_allclose(several.numpy(), [(1 + 4) / 2, (1 + 9) / 2])
    # Targets [B] against outputs [B, 1]: one error per example, not a [B, B] broadcast.
    predictions, y = tf.constant([[1.0], [2.0], [4.0]]), tf.constant([1.0, 0.0, 1.0])
    np.testing.assert_allclose(functional.squared_error(predictions, y).numpy(), [0.0, 4.0, 9.0])
    mse = functional.per_example_loss_fn("mse")(predictions, y)
    np.testing.assert_allclose(mse.numpy(), [0.0, 4.0, 9.0])


def test_accuracy_is_one_where_the_largest_logit_is_the_label():
    rng = np.random.default_rng(1)
    logits, labels, _ = padded_logits(rng, 16, 16, 4)
    labels[:3] = np.argmax(logits[:3], axis=1)  # a few certain hits
    hits = functional.accuracy(tf.constant(logits), tf.constant(labels))
    np.testing.assert_array_equal(hits.numpy(), np.argmax(logits, axis=1) == labels)


def test_masked_metric_states_add_up_over_batches_to_the_weighted_mean():
    initialize, update, finalize = functional.masked_metric_fns("mse", functional.squared_error)
    predictions = tf.constant([[1.0], [3.0], [0.0], [10.0]])
    y = tf.constant([[0.0], [1.0], [2.0], [0.0]])  # squared errors 1, 4, 4, 100
    state = update(initialize(), y[:2], predictions[:2], tf.constant([1.0, 0.5]))
    state = update(state, y[2:], predictions[2:], tf.constant([1.0, 0.0]))
    result = finalize(state)
    assert list(result) == ["mse"]
    assert float(result["mse"]) == pytest.approx((1.0 + 0.5 * 4.0 + 4.0) / 2.5)
    assert float(finalize(initialize())["mse"]) == 0.0  # no examples: 0, not NaN
    unweighted = finalize(update(initialize(), y, predictions))
    assert float(unweighted["mse"]) == pytest.approx((1 + 4 + 4 + 100) / 4)


def test_a_model_trains_the_loss_it_is_given_or_was_compiled_with():
    def huber_model(**kwargs):
        return functional.functional_model(
            functools.partial(keras_models.mlp, (3,), (4,), 1),
            x_shape=(3,),
            problem="regression",
            **kwargs,
        )

    def compiled():
        model = keras_models.mlp((3,), (4,), 1)
        model.compile(loss=tf.keras.losses.Huber(delta=0.5))
        return model

    predictions = tf.constant([[0.0], [0.2], [3.0]])
    y, mask = tf.constant([[0.0], [0.0], [0.0]]), tf.constant([1.0, 1.0, 0.0])
    mse = (0.0 + 0.04) / 2
    huber_half = (0.0 + 0.5 * 0.04) / 2  # |e| <= delta: e^2 / 2
    by_default = huber_model().loss(predictions, y, mask)
    assert float(by_default) == pytest.approx(mse)
    given = huber_model(loss=tf.keras.losses.Huber(delta=0.5)).loss(predictions, y, mask)
    assert float(given) == pytest.approx(huber_half)
    model = functional.functional_model(compiled, x_shape=(3,), problem="regression", metric="mse")
    assert float(model.loss(predictions, y, mask)) == pytest.approx(huber_half)
    assert functional.metric_name(model) == "mse"


def test_metric_follows_the_problem_or_the_choice():
    def build(problem, metric=None):
        return functional.functional_model(
            functools.partial(keras_models.mlp, (3,), (4,), 2),
            x_shape=(3,),
            problem=problem,
            metric=metric,
        )

    assert functional.metric_name(build("classification")) == "accuracy"
    assert functional.metric_name(build("regression")) == "mse"
    assert functional.metric_name(build("classification", metric="mse")) == "mse"
    with pytest.raises(ValueError, match=r"metric must be one of \['accuracy', 'mse'\]"):
        build("classification", metric="auc")


def test_the_loss_takes_numpy_labels(softmax_classifier):
    logits, labels, mask = padded_logits(np.random.default_rng(2), 3, 4, 5)
    got = softmax_classifier.loss(tf.constant(logits), labels, mask)
    assert float(got) == pytest.approx(np_cross_entropy(logits[:3], labels[:3]).mean(), rel=1e-5)
