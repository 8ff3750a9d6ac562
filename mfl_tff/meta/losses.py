"""Masked losses and metrics on packed batches: means over real examples only, padding ignored.

Pure TensorFlow: works inside any `tf.function` or `tff.tensorflow.computation`, knows nothing of
placements.
"""

from __future__ import annotations

import tensorflow as tf


def per_example_loss(problem: str, predictions: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
    """Cross-entropy on logits (classification) or squared error (regression), one per example."""
    if problem == "classification":
        return tf.nn.sparse_softmax_cross_entropy_with_logits(
            labels=tf.cast(y, tf.int32), logits=predictions
        )
    if problem == "regression":
        y = tf.cast(y, predictions.dtype)
        if y.shape.rank == predictions.shape.rank - 1:
            # Scalar targets [B] against [B, 1] outputs would broadcast to [B, B].
            y = tf.expand_dims(y, -1)
        return tf.reduce_mean(tf.square(predictions - y), axis=-1)
    raise ValueError(f"problem must be 'classification' or 'regression', got {problem!r}.")


def per_example_metric(problem: str, predictions: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
    """1.0/0.0 correctness (classification) or squared error (regression), one per example."""
    if problem == "classification":
        hit = tf.equal(tf.argmax(predictions, axis=-1, output_type=tf.int32), tf.cast(y, tf.int32))
        return tf.cast(hit, tf.float32)
    return per_example_loss(problem, predictions, y)


def masked_mean(values: tf.Tensor, mask: tf.Tensor) -> tf.Tensor:
    """Mean of `values` where `mask` is 1; 0 when the mask is empty (never NaN)."""
    mask = tf.cast(mask, values.dtype)
    return tf.math.divide_no_nan(tf.reduce_sum(values * mask), tf.reduce_sum(mask))


def flatten_batches(part):
    """[S, B, ...] packed tensors -> [S * B, ...], to evaluate a whole support or query set."""
    return {k: tf.reshape(v, tf.concat([[-1], tf.shape(v)[2:]], axis=0)) for k, v in part.items()}


def model_loss(model, problem: str, weights, x, y, mask) -> tf.Tensor:
    """Masked mean loss of a FunctionalModel with `weights` = (trainable, non_trainable)."""
    predictions = model.predict_on_batch(weights, x, training=True)
    return masked_mean(per_example_loss(problem, predictions, y), mask)


def part_loss_and_metric(model, problem: str, weights, part) -> tuple[tf.Tensor, tf.Tensor]:
    """Masked mean loss and metric of `weights` on a whole packed part (all its batches)."""
    flat = flatten_batches(part)
    predictions = model.predict_on_batch(weights, flat["x"], training=False)
    loss = masked_mean(per_example_loss(problem, predictions, flat["y"]), flat["mask"])
    metric = masked_mean(per_example_metric(problem, predictions, flat["y"]), flat["mask"])
    return loss, metric
