"""Keras architectures for the built-in tasks (uncompiled; converted to functional models)."""

from __future__ import annotations

from collections.abc import Sequence

import tensorflow as tf


def mlp(input_shape: Sequence[int], hidden: Sequence[int], num_outputs: int) -> tf.keras.Model:
    """A ReLU multilayer perceptron with a linear output layer (logits or a regression value)."""
    layers = [tf.keras.layers.InputLayer(input_shape=tuple(input_shape))]
    if len(input_shape) > 1:
        layers.append(tf.keras.layers.Flatten())
    layers += [tf.keras.layers.Dense(units, activation="relu") for units in hidden]
    layers.append(tf.keras.layers.Dense(num_outputs))
    return tf.keras.Sequential(layers)


def small_cnn(
    input_shape: Sequence[int], num_classes: int, filters: Sequence[int] = (16, 32)
) -> tf.keras.Model:
    """Two 3x3 conv + 2x2 max-pool blocks and a linear classifier (for 8x8 and 28x28 images)."""
    layers = [tf.keras.layers.InputLayer(input_shape=tuple(input_shape))]
    if len(input_shape) == 2:
        layers.append(tf.keras.layers.Reshape(tuple(input_shape) + (1,)))
    for f in filters:
        layers.append(tf.keras.layers.Conv2D(f, 3, padding="same", activation="relu"))
        layers.append(tf.keras.layers.MaxPool2D(2))
    layers += [tf.keras.layers.Flatten(), tf.keras.layers.Dense(num_classes)]
    return tf.keras.Sequential(layers)


def softmax_regression(input_dim: int, num_classes: int) -> tf.keras.Model:
    """Multinomial logistic regression: one dense layer producing logits."""
    return tf.keras.Sequential(
        [tf.keras.layers.InputLayer(input_shape=(input_dim,)), tf.keras.layers.Dense(num_classes)]
    )
