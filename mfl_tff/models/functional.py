"""Keras models -> `tff.learning.models.FunctionalModel`s that carry their own loss and metric.

Functional models take their weights as tensors (`predict_on_batch(weights, x, training)`), which is
what lets second-order meta-gradients flow through inner SGD steps.

Every algorithm here trains with the model's own `loss(output, label, sample_weight)` and scores
with its own metric functions (TFF's `metrics_fns`), so a user's model compiled with, say, a Huber
loss is meta-trained with Huber. The contract the algorithms rely on: `loss` returns the
`sample_weight`-weighted mean of per-example losses (packed batches pass their padding mask as
`sample_weight`, so padding never counts), and the metric state finalizes to one value, the
weighted mean of a per-example metric. `functional_model` builds models that keep it.
"""

from __future__ import annotations

import collections
import random
from collections.abc import Callable, Sequence
from typing import Optional, Union

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

PROBLEMS = ("classification", "regression")
LossLike = Union[str, tf.keras.losses.Loss, Callable[[tf.Tensor, tf.Tensor], tf.Tensor]]


def masked_mean(values: tf.Tensor, mask: Optional[tf.Tensor]) -> tf.Tensor:
    """Mean of `values` where `mask` is 1 (all of them with no mask); 0 when the mask is empty."""
    if mask is None:
        return tf.reduce_mean(values)
    mask = tf.cast(mask, values.dtype)
    return tf.math.divide_no_nan(tf.reduce_sum(values * mask), tf.reduce_sum(mask))


def _match_label_rank(y: tf.Tensor, predictions: tf.Tensor) -> tf.Tensor:
    # Scalar targets [B] against one output per example [B, 1] would broadcast to [B, B].
    y, predictions = tf.convert_to_tensor(y), tf.convert_to_tensor(predictions)
    if y.shape.rank == predictions.shape.rank - 1 and predictions.shape[-1] == 1:
        return tf.expand_dims(y, -1)
    return y


def per_example_loss_fn(loss: LossLike) -> Callable[[tf.Tensor, tf.Tensor], tf.Tensor]:
    """`loss` (a Keras loss object, its name, or a function `(y_true, y_pred)`) as a function
    `(predictions, y) -> one loss per example` (Keras reductions are turned off)."""
    if isinstance(loss, str):
        loss = tf.keras.losses.get(loss)
    if isinstance(loss, tf.keras.losses.Loss):
        config = dict(loss.get_config(), reduction=tf.keras.losses.Reduction.NONE)
        loss = type(loss).from_config(config)
    elif not callable(loss):
        raise TypeError(
            f"loss must be a tf.keras.losses.Loss, its name or a function (y_true, y_pred); got "
            f"{type(loss).__name__}."
        )

    def per_example(predictions, y):
        predictions = tf.convert_to_tensor(predictions)
        y = _match_label_rank(y, predictions)
        if y.dtype.is_floating or not predictions.dtype.is_floating:
            y = tf.cast(y, predictions.dtype)
        return loss(y, predictions)

    return per_example


def accuracy(predictions: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
    """1.0 where the largest logit is the integer label, else 0.0 (one per example)."""
    predictions = tf.convert_to_tensor(predictions)
    hit = tf.equal(tf.argmax(predictions, axis=-1, output_type=tf.int32), tf.cast(y, tf.int32))
    return tf.cast(hit, tf.float32)


def squared_error(predictions: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
    """Squared error averaged over the output axis (one per example)."""
    predictions = tf.convert_to_tensor(predictions)
    y = tf.cast(_match_label_rank(y, predictions), predictions.dtype)
    return tf.reduce_mean(tf.square(predictions - y), axis=-1)


METRICS = {"accuracy": accuracy, "mse": squared_error}
_DEFAULTS = {
    "classification": (
        tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        "accuracy",
        tf.int32,
        [None],
    ),
    "regression": (tf.keras.losses.MeanSquaredError(), "mse", tf.float32, [None, 1]),
}


def masked_metric_fns(name: str, per_example: Callable[[tf.Tensor, tf.Tensor], tf.Tensor]):
    """TFF functional `metrics_fns` for the weighted mean of `per_example(predictions, y)`.

    The state is `(sum of weighted values, sum of weights)`, so states of several batches (or
    clients) add up, and the finalized value is `OrderedDict(name=mean)`.
    """

    def initialize():
        return collections.OrderedDict(total=tf.constant(0.0), count=tf.constant(0.0))

    def update(state, labels, batch_output, sample_weight=None):
        # TFF's training loops pass a `BatchOutput` (as its Keras metric functions expect).
        predictions = getattr(batch_output, "predictions", batch_output)
        values = tf.cast(per_example(predictions, labels), tf.float32)
        weights = (
            tf.ones_like(values) if sample_weight is None else tf.cast(sample_weight, tf.float32)
        )
        return collections.OrderedDict(
            total=state["total"] + tf.reduce_sum(values * weights),
            count=state["count"] + tf.reduce_sum(weights),
        )

    def finalize(state):
        return collections.OrderedDict(
            {name: tf.math.divide_no_nan(state["total"], state["count"])}
        )

    return initialize, update, finalize


def functional_model(
    keras_model_fn: Callable[[], tf.keras.Model],
    *,
    x_shape: Sequence[int],
    problem: str,
    loss: Optional[LossLike] = None,
    metric: Optional[str] = None,
    seed: int = 0,
) -> tff.learning.models.FunctionalModel:
    """Converts a Keras model builder into a FunctionalModel with seeded initial weights.

    Args:
      keras_model_fn: No-argument callable building a Keras model (compiled or not).
      x_shape: Shape of one example's features (without the batch axis).
      problem: 'classification' (integer labels, logits out; default loss cross-entropy, metric
        accuracy) or 'regression' (float targets; default loss and metric mean squared error).
      loss: The training loss: a `tf.keras.losses.Loss`, its name, or a function
        `(y_true, y_pred)`. None: the Keras model's compiled loss if it has one, else the
        problem's default.
      metric: 'accuracy' or 'mse' (None: the problem's).
      seed: Seeds Keras' initializers, so the initial weights are a function of the seed.

    Returns:
      A `tff.learning.models.FunctionalModel` whose input spec is `(x, y)` batches, whose `loss`
      is the masked mean of `loss` and whose metric is `metric` (see the module docstring).

    Raises:
      ValueError: For an unknown problem or metric.
      TypeError: For a loss that is not a loss.
    """
    if problem not in PROBLEMS:
        raise ValueError(f"problem must be one of {PROBLEMS}, got {problem!r}.")
    default_loss, default_metric, y_dtype, y_shape = _DEFAULTS[problem]
    metric = metric or default_metric
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {sorted(METRICS)}, got {metric!r}.")
    # Keras seeds Python's and NumPy's global generators too; restore them so that building a
    # model does not rewind the caller's random streams.
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        tf.keras.utils.set_random_seed(seed)
        keras_model = keras_model_fn()
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    if loss is None:
        loss = getattr(keras_model, "loss", None) or default_loss
    per_example = per_example_loss_fn(loss)
    x_spec = tf.TensorSpec([None] + list(x_shape), tf.float32)
    input_spec = (x_spec, tf.TensorSpec(y_shape, y_dtype))
    # TFF's converter reduces a Keras loss over the padded batch size; ours is a masked mean.
    converted = tff.learning.models.functional_model_from_keras(
        keras_model, loss_fn=tf.keras.losses.MeanSquaredError(), input_spec=input_spec
    )

    def masked_loss(output, label, sample_weight=None):
        return masked_mean(per_example(output, label), sample_weight)

    return tff.learning.models.FunctionalModel(
        initial_weights=converted.initial_weights,
        # The converter's own prediction function (a `tf.function`), not its bound method: the
        # method does not survive rebinding, and one less nested function call keeps
        # `tf.vectorized_map`'s conversion of second-order graphs shorter.
        predict_on_batch_fn=converted._predict_on_batch_fn,
        loss_fn=masked_loss,
        metrics_fns=masked_metric_fns(metric, METRICS[metric]),
        input_spec=input_spec,
    )


def metric_name(model: tff.learning.models.FunctionalModel) -> str:
    """The name of the model's (single) metric."""
    return next(iter(model.finalize_metrics(model.initialize_metrics_state())))


def initial_weights(model: tff.learning.models.FunctionalModel) -> tuple:
    """The model's initial (trainable, non_trainable) weights as numpy arrays."""
    return (
        tuple(np.asarray(w) for w in model.initial_weights[0]),
        tuple(np.asarray(w) for w in model.initial_weights[1]),
    )
