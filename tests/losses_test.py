"""Tests of `mfl_tff.meta.losses`: masked losses and metrics against numpy closed forms."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import tensorflow as tf

from mfl_tff.meta import losses
from mfl_tff.models import functional, keras_models


def _np_cross_entropy(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """-log softmax(logits)[label], computed stably in float64."""
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    log_z = np.log(np.exp(shifted).sum(axis=-1))
    return log_z - shifted[np.arange(len(labels)), labels]


def _padded_batch(rng, num_real, capacity, num_classes):
    """Logits and labels with `num_real` real rows followed by garbage padding rows."""
    logits = rng.normal(size=(capacity, num_classes)).astype(np.float32)
    labels = rng.integers(0, num_classes, size=capacity).astype(np.int32)
    # Padding rows get extreme values: any leak into the mean would show.
    logits[num_real:] = 1e4 * rng.normal(size=(capacity - num_real, num_classes))
    mask = (np.arange(capacity) < num_real).astype(np.float32)
    return logits, labels, mask


def test_masked_cross_entropy_equals_the_plain_mean_over_real_examples():
    rng = np.random.default_rng(0)
    for num_real in (1, 5, 11, 12):
        logits, labels, mask = _padded_batch(rng, num_real, 12, 5)
        per_example = losses.per_example_loss("classification", tf.constant(logits), labels)
        got = losses.masked_mean(per_example, tf.constant(mask)).numpy()
        expected = _np_cross_entropy(logits[:num_real], labels[:num_real]).mean()
        assert got == pytest.approx(expected, rel=1e-5)


def test_cross_entropy_closed_form_for_uniform_logits():
    per_example = losses.per_example_loss("classification", tf.zeros([3, 7]), [0, 3, 6])
    np.testing.assert_allclose(per_example.numpy(), np.full(3, np.log(7.0)), rtol=1e-6)


def test_an_all_padding_mask_gives_zero_not_nan():
    values = tf.constant([2.0, -3.0])
    for problem, predictions, y in (
        ("classification", tf.constant([[1.0, 2.0], [3.0, 0.0]]), tf.constant([0, 1])),
        ("regression", tf.constant([[1.0], [2.0]]), tf.constant([[0.5], [4.0]])),
    ):
        mask = tf.zeros([2])
        loss = losses.masked_mean(losses.per_example_loss(problem, predictions, y), mask)
        metric = losses.masked_mean(losses.per_example_metric(problem, predictions, y), mask)
        assert loss.numpy() == 0.0 and metric.numpy() == 0.0
    assert losses.masked_mean(values, tf.zeros([2])).numpy() == 0.0


def test_regression_squared_error_closed_form():
    predictions = np.array([[1.0], [2.5], [-1.0], [100.0]], np.float32)
    y = np.array([[3.0], [2.0], [-1.0], [0.0]], np.float32)
    per_example = losses.per_example_loss("regression", tf.constant(predictions), tf.constant(y))
    np.testing.assert_allclose(per_example.numpy(), [4.0, 0.25, 0.0, 10000.0])
    mask = tf.constant([1.0, 1.0, 1.0, 0.0])
    assert losses.masked_mean(per_example, mask).numpy() == pytest.approx((4.0 + 0.25) / 3)
    metric = losses.per_example_metric("regression", tf.constant(predictions), tf.constant(y))
    np.testing.assert_allclose(metric.numpy(), per_example.numpy())


def test_regression_with_several_outputs_averages_over_them():
    predictions = tf.constant([[1.0, 2.0], [0.0, 0.0]])
    y = tf.constant([[0.0, 0.0], [1.0, 3.0]])
    per_example = losses.per_example_loss("regression", predictions, y)
    np.testing.assert_allclose(per_example.numpy(), [(1 + 4) / 2, (1 + 9) / 2])


def test_regression_with_scalar_targets_is_per_example_or_rejected():
    predictions = tf.constant([[1.0], [2.0], [4.0]])
    y = tf.constant([1.0, 0.0, 1.0])
    try:
        per_example = losses.per_example_loss("regression", predictions, y)
    except (ValueError, tf.errors.InvalidArgumentError):
        return  # rejecting the mismatch is a fix too
    np.testing.assert_allclose(per_example.numpy(), [0.0, 4.0, 9.0])


def test_accuracy_metric_is_the_masked_fraction_of_correct_argmax():
    rng = np.random.default_rng(1)
    logits, labels, mask = _padded_batch(rng, 9, 16, 4)
    labels[:3] = np.argmax(logits[:3], axis=1)  # a few certain hits
    hits = losses.per_example_metric("classification", tf.constant(logits), tf.constant(labels))
    expected_hits = (np.argmax(logits, axis=1) == labels).astype(np.float32)
    np.testing.assert_array_equal(hits.numpy(), expected_hits)
    accuracy = losses.masked_mean(hits, tf.constant(mask)).numpy()
    assert accuracy == pytest.approx(expected_hits[:9].mean())
    assert 3 / 9 <= accuracy <= 1.0


def test_a_fractional_mask_weights_the_mean():
    values = tf.constant([1.0, 2.0, 4.0])
    assert losses.masked_mean(values, tf.constant([1.0, 0.5, 0.0])).numpy() == pytest.approx(
        (1.0 + 1.0) / 1.5
    )


def test_unknown_problem_raises():
    with pytest.raises(ValueError, match="problem"):
        losses.per_example_loss("ranking", tf.zeros([2, 2]), tf.zeros([2]))


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


def test_part_loss_and_metric_of_a_functional_model_match_numpy():
    model = functional.functional_model(
        functools.partial(keras_models.softmax_regression, 3, 4),
        x_shape=(3,),
        problem="classification",
        seed=0,
    )
    (kernel, bias), _ = model.initial_weights
    rng = np.random.default_rng(2)
    x = rng.normal(size=(2, 5, 3)).astype(np.float32)
    y = rng.integers(0, 4, size=(2, 5)).astype(np.int32)
    mask = np.ones((2, 5), np.float32)
    mask[1, 2:] = 0.0
    x[1, 2:] = 1e3  # padding that would dominate if it leaked
    part = {"x": x, "y": y, "mask": mask}
    with tf.Graph().as_default() as graph:  # functional models need a graph context
        loss, metric = losses.part_loss_and_metric(
            model, "classification", model.initial_weights, part
        )
        batch_loss = losses.model_loss(
            model, "classification", model.initial_weights, x[1], y[1], mask[1]
        )
        with tf.compat.v1.Session(graph=graph) as session:
            loss, metric, batch_loss = session.run([loss, metric, batch_loss])
    real = mask.reshape(-1) > 0
    logits = x.reshape(-1, 3)[real] @ kernel + bias
    labels = y.reshape(-1)[real]
    assert loss == pytest.approx(_np_cross_entropy(logits, labels).mean(), rel=1e-5)
    assert metric == pytest.approx(np.mean(np.argmax(logits, axis=1) == labels))
    batch_logits = x[1, :2] @ kernel + bias
    assert batch_loss == pytest.approx(_np_cross_entropy(batch_logits, y[1, :2]).mean(), rel=1e-5)
