"""Keras models -> `tff.learning.models.FunctionalModel`, with a loss that matches the task.

Functional models take their weights as tensors (`predict_on_batch(weights, x, training)`), which is
what lets second-order meta-gradients flow through inner SGD steps.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff


def functional_model(
    keras_model_fn: Callable[[], tf.keras.Model],
    *,
    x_shape: Sequence[int],
    problem: str,
    seed: int = 0,
) -> tff.learning.models.FunctionalModel:
    """Converts a Keras model builder into a FunctionalModel with seeded initial weights.

    Args:
      keras_model_fn: No-argument callable building an uncompiled Keras model.
      x_shape: Shape of one example's features (without the batch axis).
      problem: 'classification' (integer labels, logits out) or 'regression' (float targets).
      seed: Seeds Keras' initializers, so the initial weights are a function of the seed.

    Returns:
      A `tff.learning.models.FunctionalModel` whose input spec is `(x, y)` batches.
    """
    if problem == "classification":
        loss = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        y_spec = tf.TensorSpec([None], tf.int32)
    elif problem == "regression":
        loss = tf.keras.losses.MeanSquaredError()
        y_spec = tf.TensorSpec([None, 1], tf.float32)
    else:
        raise ValueError(f"problem must be 'classification' or 'regression', got {problem!r}.")
    # Keras seeds Python's and NumPy's global generators too; restore them so that building a
    # model does not rewind the caller's random streams.
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        tf.keras.utils.set_random_seed(seed)
        keras_model = keras_model_fn()
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    x_spec = tf.TensorSpec([None] + list(x_shape), tf.float32)
    return tff.learning.models.functional_model_from_keras(
        keras_model, loss_fn=loss, input_spec=(x_spec, y_spec)
    )


def initial_weights(model: tff.learning.models.FunctionalModel) -> tuple:
    """The model's initial (trainable, non_trainable) weights as numpy arrays."""
    return (
        tuple(np.asarray(w) for w in model.initial_weights[0]),
        tuple(np.asarray(w) for w in model.initial_weights[1]),
    )
