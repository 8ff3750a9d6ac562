"""Tests of `mfl_tff.models.keras_models`: layer sizes, output shapes and the forward pass."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from mfl_tff.models import keras_models


def _dense_units(model):
    return [layer.units for layer in model.layers if isinstance(layer, tf.keras.layers.Dense)]


def _kernel_shapes(model):
    return [tuple(w.shape) for w in model.trainable_weights if len(w.shape) > 1]


@pytest.mark.parametrize(
    "input_shape, hidden, outputs",
    [((8, 8), (64, 64), 10), ((1,), (40, 40), 1), ((28, 28), (200, 200), 62), ((5,), (), 3)],
)
def test_mlp_sizes(input_shape, hidden, outputs):
    model = keras_models.mlp(input_shape, hidden, outputs)
    assert model.output_shape == (None, outputs)
    assert _dense_units(model) == list(hidden) + [outputs]
    widths = [int(np.prod(input_shape))] + list(hidden) + [outputs]
    assert _kernel_shapes(model) == list(zip(widths[:-1], widths[1:]))
    assert model.count_params() == sum((a + 1) * b for a, b in zip(widths[:-1], widths[1:]))
    flattens = [layer for layer in model.layers if isinstance(layer, tf.keras.layers.Flatten)]
    assert len(flattens) == (1 if len(input_shape) > 1 else 0)


def test_mlp_parameter_counts_of_the_builtin_tasks():
    # digits: 64*64+64 + 64*64+64 + 64*10+10; sinusoid: the papers' 1-40-40-1 network.
    assert keras_models.mlp((8, 8), (64, 64), 10).count_params() == 8970
    assert keras_models.mlp((1,), (40, 40), 1).count_params() == 1761


def test_mlp_is_relu_hidden_layers_and_a_linear_output():
    tf.keras.utils.set_random_seed(0)
    model = keras_models.mlp((2, 3), (4, 5), 2)
    x = np.random.default_rng(0).normal(size=(7, 2, 3)).astype(np.float32)
    w1, b1, w2, b2, w3, b3 = (w.numpy().astype(np.float64) for w in model.weights)
    h = np.maximum(x.reshape(7, 6) @ w1 + b1, 0.0)
    h = np.maximum(h @ w2 + b2, 0.0)
    expected = h @ w3 + b3  # no activation: logits may be negative
    got = model(x).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "input_shape, filters, classes, flat",
    [
        ((8, 8), (16, 32), 10, 2 * 2 * 32),
        ((28, 28), (32, 64), 62, 7 * 7 * 64),
        ((28, 28, 1), (16, 32), 10, 7 * 7 * 32),
    ],
)
def test_small_cnn_sizes(input_shape, filters, classes, flat):
    model = keras_models.small_cnn(input_shape, classes, filters=filters)
    assert model.output_shape == (None, classes)
    kernels = _kernel_shapes(model)
    channels = input_shape[2] if len(input_shape) == 3 else 1
    assert kernels[0] == (3, 3, channels, filters[0])
    assert kernels[1] == (3, 3, filters[0], filters[1])
    # Two 2x2 max-pools halve each side twice before the linear classifier.
    assert kernels[2] == (flat, classes)
    convs = [layer for layer in model.layers if isinstance(layer, tf.keras.layers.Conv2D)]
    assert [layer.padding for layer in convs] == ["same", "same"]


def test_small_cnn_default_filters_are_16_and_32():
    model = keras_models.small_cnn((8, 8), 10)
    assert _kernel_shapes(model)[:2] == [(3, 3, 1, 16), (3, 3, 16, 32)]
    assert model(np.zeros((3, 8, 8), np.float32)).shape == (3, 10)


def test_softmax_regression_is_one_dense_layer():
    model = keras_models.softmax_regression(60, 10)
    assert model.output_shape == (None, 10)
    assert _kernel_shapes(model) == [(60, 10)]
    assert model.count_params() == 610
    x = np.random.default_rng(1).normal(size=(4, 60)).astype(np.float32)
    kernel, bias = (w.numpy() for w in model.weights)
    np.testing.assert_allclose(model(x).numpy(), x @ kernel + bias, rtol=1e-5, atol=1e-5)
