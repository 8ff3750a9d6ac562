"""Tests of `mfl_tff.meta.losses`: masked losses and metrics of a model on packed batches.

The losses are the FunctionalModel's own (`model.loss`, its metric functions), so the references
are numpy closed forms of the loss the model was built with: softmax cross-entropy and accuracy
for a softmax regression, mean squared error for a linear regression, and the Huber loss for a
model compiled with it. Padding rows hold values that would dominate any mean they leaked into.
Functional models predict only in a graph: each test builds one and runs it in a session (no TFF
worker).
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import tensorflow as tf

from mfl_tff.meta import losses
from mfl_tff.models import functional, keras_models


def np_cross_entropy(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """-log softmax(logits)[label], computed stably in float64."""
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    log_z = np.log(np.exp(shifted).sum(axis=-1))
    return log_z - shifted[np.arange(len(labels)), labels]


def np_huber(error: np.ndarray, delta: float = 1.0) -> np.ndarray:
    error = np.abs(error.astype(np.float64))
    return np.where(error <= delta, 0.5 * error**2, delta * (error - 0.5 * delta))


def run_in_graph(fn):
    """`fn()` built in a fresh graph and run in a session; numpy out."""
    with tf.Graph().as_default() as graph:
        outputs = fn()
        with tf.compat.v1.Session(graph=graph) as session:
            return session.run(outputs)


def test_masked_mean_weighs_by_the_mask_and_is_zero_not_nan_when_empty():
    values = tf.constant([1.0, 2.0, 4.0])
    assert losses.masked_mean(values, tf.constant([1.0, 0.5, 0.0])).numpy() == pytest.approx(
        (1.0 + 1.0) / 1.5
    )
    assert losses.masked_mean(values, tf.zeros([3])).numpy() == 0.0


def test_flatten_batches_merges_the_batch_axes_in_order():
    part = {
        "x": tf.reshape(tf.range(2 * 3 * 4, dtype=tf.float32), [2, 3, 4]),
        "y": tf.constant([[0, 1, 2], [3, 4, 5]]),
        "mask": tf.constant([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]]),
    }
    flat = losses.flatten_batches(part)
    np.testing.assert_array_equal(flat["x"].numpy(), np.arange(24).reshape(6, 4))
    np.testing.assert_array_equal(flat["y"].numpy(), np.arange(6))
    np.testing.assert_array_equal(flat["mask"].numpy(), [1, 1, 1, 1, 0, 0])


def padded_part(rng, y):
    """Two batches of 5 of 3 features; the second batch's last 3 rows are padding."""
    x = rng.normal(size=(2, 5, 3)).astype(np.float32)
    mask = np.ones((2, 5), np.float32)
    mask[1, 2:] = 0.0
    x[1, 2:] = 1e3  # padding that would dominate if it leaked
    return {"x": x, "y": y, "mask": mask}


@pytest.fixture(scope="module")
def classifier():
    return functional.functional_model(
        functools.partial(keras_models.softmax_regression, 3, 4),
        x_shape=(3,),
        problem="classification",
        seed=0,
    )


def test_part_loss_and_metric_of_a_classifier_match_numpy(classifier):
    (kernel, bias), _ = classifier.initial_weights
    rng = np.random.default_rng(2)
    part = padded_part(rng, rng.integers(0, 4, size=(2, 5)).astype(np.int32))
    x, y, mask = part["x"], part["y"], part["mask"]
    weights = classifier.initial_weights

    def library():
        batch = tf.nest.map_structure(tf.constant, (x[1], y[1], mask[1]))
        return (
            *losses.part_loss_and_metric(classifier, weights, part),
            losses.model_loss(classifier, weights, *batch),
            losses.model_loss(classifier, weights, *batch[:2], tf.zeros([5])),
        )

    loss, metric, batch_loss, empty_loss = run_in_graph(library)
    real = mask.reshape(-1) > 0
    logits = x.reshape(-1, 3)[real] @ kernel + bias
    labels = y.reshape(-1)[real]
    assert loss == pytest.approx(np_cross_entropy(logits, labels).mean(), rel=1e-5)
    assert metric == pytest.approx(np.mean(np.argmax(logits, axis=1) == labels))
    batch_logits = x[1, :2] @ kernel + bias
    assert batch_loss == pytest.approx(np_cross_entropy(batch_logits, y[1, :2]).mean(), rel=1e-5)
    assert empty_loss == 0.0  # an all-padding batch: 0, not NaN


def test_metric_value_is_the_models_metric_over_real_examples(classifier):
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(16, 4)).astype(np.float32)
    labels = rng.integers(0, 4, size=16).astype(np.int32)
    labels[:3] = np.argmax(logits[:3], axis=1)  # a few certain hits
    logits[9:] = 1e4 * rng.normal(size=(7, 4))  # padding
    mask = (np.arange(16) < 9).astype(np.float32)
    accuracy = losses.metric_value(
        classifier, tf.constant(logits), tf.constant(labels), tf.constant(mask)
    ).numpy()
    expected = np.mean(np.argmax(logits[:9], axis=1) == labels[:9])
    assert accuracy == pytest.approx(expected)
    assert 3 / 9 <= accuracy <= 1.0


@pytest.mark.parametrize("loss", [None, tf.keras.losses.Huber()])
def test_part_loss_and_metric_of_a_regressor_use_the_models_own_loss(loss):
    """The default loss is the mean squared error; a Huber-built model trains on Huber. The
    metric (mse) is the same for both."""
    model = functional.functional_model(
        lambda: keras_models.mlp((3,), (), 1),
        x_shape=(3,),
        problem="regression",
        loss=loss,
        seed=4,
    )
    (kernel, bias), _ = model.initial_weights
    rng = np.random.default_rng(3)
    part = padded_part(rng, (3.0 * rng.normal(size=(2, 5, 1))).astype(np.float32))
    got_loss, got_metric = run_in_graph(
        lambda: losses.part_loss_and_metric(model, model.initial_weights, part)
    )
    real = part["mask"].reshape(-1) > 0
    error = (part["x"].reshape(-1, 3)[real] @ kernel + bias) - part["y"].reshape(-1, 1)[real]
    mse = np.mean(np.square(error.astype(np.float64)))
    expected = mse if loss is None else np.mean(np_huber(error))
    assert got_loss == pytest.approx(expected, rel=1e-5)
    assert got_metric == pytest.approx(mse, rel=1e-5)
    assert np.mean(np_huber(error)) != pytest.approx(mse, rel=1e-2)  # the losses differ here
