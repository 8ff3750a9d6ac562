"""A user's own loss drives the meta-learning math: meta-gradients are those of THAT loss.

The model is a linear regressor compiled with a Huber loss (delta 1), built through
`mfl_tff.models.functional.functional_model` as `registry.task_from_keras` builds a user's model.
The reference is float64 numpy: the masked-mean Huber loss of the linear model, its closed-form
gradient for the inner steps, and central finite differences (EPS 1e-6) of the post-adaptation
query loss with respect to the weights and the per-layer rates. The same reference with the
squared error gives clearly different meta-gradients, so a library that silently trained with MSE
would fail here. Residuals are drawn well away from the Huber kink (|r| = delta), where finite
differences would straddle two pieces.
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from mfl_tff.meta import gradients
from mfl_tff.models import functional

EPS = 1e-6
RTOL = 1e-3
ATOL = 1e-5
X_DIM = 3
STEPS = 2


def huber(r):
    return np.where(np.abs(r) <= 1.0, 0.5 * r**2, np.abs(r) - 0.5)


def huber_grad(r):
    return np.clip(r, -1.0, 1.0)


def squared(r):
    return r**2


def squared_grad(r):
    return 2.0 * r


def _linear_huber_model():
    def build():
        model = tf.keras.Sequential(
            [tf.keras.layers.InputLayer(input_shape=(X_DIM,)), tf.keras.layers.Dense(1)]
        )
        model.compile(loss=tf.keras.losses.Huber(delta=1.0))
        return model

    return functional.functional_model(build, x_shape=(X_DIM,), problem="regression", seed=1)


def _part(rng, num_real, size=6):
    x = rng.normal(size=(1, size, X_DIM)).astype(np.float32)
    y = (rng.normal(size=(1, size, 1)) * 3.0).astype(np.float32)
    mask = np.zeros((1, size), np.float32)
    mask[0, :num_real] = 1.0
    return {"x": x, "y": y, "mask": mask}


def _objective(loss, loss_grad, w, b, alpha, data):
    """Query loss after STEPS inner steps from (w, b) with per-layer rates alpha, float64."""

    def masked(part):
        keep = part["mask"].reshape(-1) > 0
        return part["x"].reshape(-1, X_DIM)[keep].astype(np.float64), part["y"].reshape(-1)[
            keep
        ].astype(np.float64)

    xs, ys = masked(data["support"])
    xq, yq = masked(data["query"])
    for _ in range(STEPS):
        r = xs @ w + b - ys
        g = loss_grad(r) / len(ys)
        w, b = w - alpha[0] * (xs.T @ g), b - alpha[1] * g.sum()
    return loss(xq @ w + b - yq).mean()


def _finite_difference_meta_gradients(loss, loss_grad, w, b, alpha, data):
    def f(params):
        return _objective(loss, loss_grad, params[:X_DIM], params[X_DIM], params[X_DIM + 1 :], data)

    params = np.concatenate([w, [b], alpha]).astype(np.float64)
    grad = np.zeros_like(params)
    for i in range(len(params)):
        step = np.zeros_like(params)
        step[i] = EPS
        grad[i] = (f(params + step) - f(params - step)) / (2 * EPS)
    return grad


@pytest.fixture(scope="module")
def setup():
    rng = np.random.default_rng(7)
    data = {"support": _part(rng, 5), "query": _part(rng, 4)}
    w = rng.normal(size=X_DIM).astype(np.float32)
    b = np.float32(0.3)
    alpha = np.array([0.2, 0.15], np.float32)
    # Every residual met on the way is at least 0.05 away from the Huber kink.
    for part in ("support", "query"):
        r = data[part]["x"][0] @ w + b - data[part]["y"][0, :, 0]
        assert np.all(np.abs(np.abs(r) - 1.0) > 0.05)
    return data, w, b, alpha


def _library(model, data, w, b, alpha):
    with tf.Graph().as_default() as graph:
        theta = (tf.constant(w.reshape(X_DIM, 1)), tf.constant([b]))
        outputs = gradients.meta_gradients(
            model,
            (theta, ()),
            tf.nest.map_structure(tf.constant, data),
            (tf.constant(alpha[0]), tf.constant(alpha[1])),
            STEPS,
        )
        with tf.compat.v1.Session(graph=graph) as session:
            grad_theta, grad_alpha, *_ = session.run(outputs)
    return np.concatenate([grad_theta[0].reshape(-1), grad_theta[1], np.asarray(grad_alpha)])


def test_compiled_huber_loss_is_the_models_loss(setup):
    model = _linear_huber_model()
    data, w, b, _ = setup
    part = data["query"]
    with tf.Graph().as_default() as graph:
        predictions = model.predict_on_batch(
            ((tf.constant(w.reshape(X_DIM, 1)), tf.constant([b])), ()),
            tf.constant(part["x"][0]),
            training=False,
        )
        loss = model.loss(predictions, tf.constant(part["y"][0]), tf.constant(part["mask"][0]))
        with tf.compat.v1.Session(graph=graph) as session:
            value = session.run(loss)
    keep = part["mask"][0] > 0
    r = part["x"][0][keep] @ w + b - part["y"][0, keep, 0]
    np.testing.assert_allclose(value, huber(r.astype(np.float64)).mean(), rtol=1e-5)


def test_meta_gradients_are_those_of_the_huber_loss(setup):
    data, w, b, alpha = setup
    ours = _library(_linear_huber_model(), data, w, b, alpha)
    expected = _finite_difference_meta_gradients(huber, huber_grad, w, b, alpha, data)
    np.testing.assert_allclose(ours, expected, rtol=RTOL, atol=ATOL)
    mse = _finite_difference_meta_gradients(squared, squared_grad, w, b, alpha, data)
    # Squared error would give other meta-gradients by far more than the tolerance.
    assert np.max(np.abs(mse - expected)) > 100 * (ATOL + RTOL * np.max(np.abs(expected)))


def test_explicit_loss_overrides_the_compiled_one(setup):
    data, w, b, alpha = setup

    def build():
        model = tf.keras.Sequential(
            [tf.keras.layers.InputLayer(input_shape=(X_DIM,)), tf.keras.layers.Dense(1)]
        )
        model.compile(loss="huber")
        return model

    model = functional.functional_model(
        build, x_shape=(X_DIM,), problem="regression", loss="mse", seed=1
    )
    ours = _library(model, data, w, b, alpha)
    # Keras' "mse" is the mean squared error, r**2 per example (no 1/2).
    expected = _finite_difference_meta_gradients(squared, squared_grad, w, b, alpha, data)
    np.testing.assert_allclose(ours, expected, rtol=RTOL, atol=ATOL)
