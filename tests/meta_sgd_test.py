"""Tests of `mfl_tff.algorithms.meta_sgd.build_meta_sgd` on sinusoid.

The reference is plain TensorFlow in float64, run eagerly: the sinusoid MLP written out as dense
layers, K inner steps theta_k = theta_{k-1} - alpha * grad (alpha per coordinate), and the exact
gradients of the query loss w.r.t. theta and alpha by nested `tf.GradientTape`s. The library's
Adam meta-optimizer is replaced by SGD so that one round is `x - lr * grad` for theta and alpha.
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_federated as tff

from mfl_tff.algorithms import meta_sgd
from mfl_tff.data import sinusoid
from tests import testing

INITIAL_ALPHA = 0.02
INNER_STEPS = 2
META_LR = 0.02
RTOL, ATOL = 1e-4, 1e-5


pytestmark = pytest.mark.usefixtures("tff_local_execution")


@pytest.fixture(scope="module")
def task():
    return sinusoid.build_sinusoid(num_train_clients=20, num_eval_clients=5, eval_query_points=20)


@pytest.fixture(scope="module")
def clients(task):
    return task.train_clients(task.train_data.client_ids[:4])


@pytest.fixture(scope="module")
def process(task):
    return meta_sgd.build_meta_sgd(
        task.model_fn,
        task.client_data_type(),
        initial_alpha=INITIAL_ALPHA,
        inner_steps=INNER_STEPS,
        meta_optimizer=tff.learning.optimizers.build_sgdm(learning_rate=META_LR),
    )


def mse(weights, part):
    return testing.mlp_squared_error(weights, testing.real_examples(part))


def meta_sgd_gradients(theta, alpha, client):
    """Sinusoid clients have one support batch: every inner step uses it."""
    with tf.GradientTape(persistent=True) as outer:
        outer.watch(theta)
        outer.watch(alpha)
        adapted = theta
        for _ in range(INNER_STEPS):
            with tf.GradientTape() as inner:
                inner.watch(adapted)
                loss = mse(adapted, client["support"])
            grads = inner.gradient(loss, adapted)
            adapted = [w - a * g for w, a, g in zip(adapted, alpha, grads)]
        query_loss = mse(adapted, client["query"])
    return outer.gradient(query_loss, theta), outer.gradient(query_loss, alpha), query_loss


def flat(values):
    """Raveled and concatenated, in their own dtype (alpha is float32)."""
    return np.concatenate([np.ravel(np.asarray(v)) for v in values])


def test_alpha_is_per_coordinate_and_initialised(process, task):
    alpha = process.get_hparams(process.initialize())["alpha"]
    shapes = [np.shape(w) for w in task.model_fn().initial_weights[0]]
    assert [np.shape(a) for a in alpha] == shapes
    np.testing.assert_array_equal(flat(alpha), INITIAL_ALPHA)


def test_one_round_steps_theta_and_alpha_by_exact_gradients(process, clients):
    state = process.initialize()
    rng = np.random.default_rng(3)
    # Distinct rates per coordinate, so that a mix-up of coordinates would show.
    alpha = tuple(
        rng.uniform(0.005, 0.04, np.shape(a)).astype(np.float32)
        for a in process.get_hparams(state)["alpha"]
    )
    state = process.set_hparams(state, {"alpha": alpha})
    theta = testing.f64(process.get_model_weights(state).trainable)
    grad_theta, grad_alpha, post = meta_sgd_gradients(theta, testing.f64(alpha), clients[0])
    output = process.next(state, clients[:1])
    new_theta = process.get_model_weights(output.state).trainable
    new_alpha = process.get_hparams(output.state)["alpha"]
    expected_theta = [t - META_LR * g for t, g in zip(theta, grad_theta)]
    expected_alpha = [a - META_LR * g for a, g in zip(testing.f64(alpha), grad_alpha)]
    assert np.max(np.abs(flat(new_alpha) - flat(alpha))) > 1e-5  # alpha did move
    np.testing.assert_allclose(flat(new_theta), flat(expected_theta), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(flat(new_alpha), flat(expected_alpha), rtol=RTOL, atol=ATOL)
    work = output.metrics["client_work"]
    np.testing.assert_allclose(work["post_adaptation_loss"], float(post), rtol=1e-5)
    np.testing.assert_allclose(
        work["pre_adaptation_loss"], float(mse(theta, clients[0]["query"])), rtol=1e-5
    )
    update = output.metrics["meta_update"]
    np.testing.assert_allclose(update["alpha_mean"], np.mean(flat(new_alpha)), rtol=1e-5)
    np.testing.assert_allclose(update["alpha_min"], np.min(flat(new_alpha)), rtol=1e-6)
    np.testing.assert_allclose(update["alpha_max"], np.max(flat(new_alpha)), rtol=1e-6)


def test_post_adaptation_loss_falls_over_ten_rounds(process, clients):
    state = process.initialize()
    losses = []
    for _ in range(11):
        output = process.next(state, clients)
        state = output.state
        losses.append(float(output.metrics["client_work"]["post_adaptation_loss"]))
    print("meta_sgd post-adaptation loss by round:", np.round(losses, 3))
    assert np.all(np.isfinite(losses))
    assert losses[-1] < 0.95 * losses[0], losses


def test_round_whose_clients_are_all_rejected_leaves_alpha_finite(process, clients):
    poisoned = testing.copy_client(clients[0])
    poisoned["query"]["y"][0, 0, 0] = np.inf
    output = process.next(process.initialize(), [poisoned])
    assert output.metrics["client_work"]["num_clients_rejected"] == 1
    for w in process.get_model_weights(output.state).trainable:
        assert np.all(np.isfinite(w))
    np.testing.assert_array_equal(flat(process.get_hparams(output.state)["alpha"]), INITIAL_ALPHA)


@pytest.mark.parametrize(
    "options, error, message",
    [
        pytest.param(
            dict(initial_alpha=-0.1),
            ValueError,
            "alpha",
        ),
        (dict(inner_steps=0), ValueError, "inner_steps"),
        (dict(meta_optimizer=tf.keras.optimizers.Adam()), TypeError, "tff.learning.optimizers"),
        (dict(meta_aggregator=tff.aggregators.MeanFactory), TypeError, "Weighted"),
    ],
)
def test_bad_options_raise_actionable_errors(task, options, error, message):
    with pytest.raises(error, match=message):
        meta_sgd.build_meta_sgd(task.model_fn, task.client_data_type(), **options)
