"""Masked losses and metrics on packed batches, from the model's own loss and metric.

The model is a `tff.learning.models.FunctionalModel` whose `loss(output, label, sample_weight)` is
the weighted mean of its per-example loss and whose metric state finalizes to one value
(`mfl_tff.models.functional` builds such models). Packed batches pass their padding mask as the
weight, so padding never counts. Pure TensorFlow: works inside any `tf.function` or
`tff.tensorflow.computation`, knows nothing of placements.
"""

from __future__ import annotations

import collections

import tensorflow as tf

# The shape of TFF's `BatchOutput` that metric update functions read (`.predictions`), so that
# models whose metrics come from `tff.learning.metrics.create_functional_metric_fns` work too.
BatchOutput = collections.namedtuple("BatchOutput", ["predictions", "loss", "num_examples"])


def masked_mean(values: tf.Tensor, mask: tf.Tensor) -> tf.Tensor:
    """Mean of `values` where `mask` is 1; 0 when the mask is empty (never NaN)."""
    mask = tf.cast(mask, values.dtype)
    return tf.math.divide_no_nan(tf.reduce_sum(values * mask), tf.reduce_sum(mask))


def flatten_batches(part):
    """[S, B, ...] packed tensors -> [S * B, ...], to evaluate a whole support or query set."""
    return {k: tf.reshape(v, tf.concat([[-1], tf.shape(v)[2:]], axis=0)) for k, v in part.items()}


def model_loss(model, weights, x, y, mask) -> tf.Tensor:
    """The model's masked mean loss with `weights` = (trainable, non_trainable)."""
    predictions = model.predict_on_batch(weights, x, training=True)
    return model.loss(predictions, y, mask)


def metric_value(model, predictions, y, mask) -> tf.Tensor:
    """The model's (single) metric of `predictions`, a masked mean over the batch."""
    output = BatchOutput(predictions=predictions, loss=None, num_examples=None)
    state = model.update_metrics_state(model.initialize_metrics_state(), y, output, mask)
    return tf.nest.flatten(model.finalize_metrics(state))[0]


def part_loss_and_metric(model, weights, part) -> tuple[tf.Tensor, tf.Tensor]:
    """Masked mean loss and metric of `weights` on a whole packed part (all its batches)."""
    flat = flatten_batches(part)
    predictions = model.predict_on_batch(weights, flat["x"], training=False)
    loss = model.loss(predictions, flat["y"], flat["mask"])
    return loss, metric_value(model, predictions, flat["y"], flat["mask"])
