"""Tests of the FedMeta family (`build_maml`, `build_fomaml`, `build_reptile`) on sinusoid.

Each algorithm's one-round update is checked against an independent plain-TensorFlow float64
computation: the sinusoid MLP written out as dense layers, SGD on the real examples of each batch
(picked by boolean indexing, not masks), meta-gradients by nested `tf.GradientTape`s (eager).
Training clients have 10 support points and 15 query points, so the query part is padded.
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_federated as tff

from mfl_tff.algorithms import fedmeta
from mfl_tff.data import sinusoid
from tests import testing

INNER_LR = 0.02
INNER_STEPS = 2
META_LR = 0.003
TRAINING_META_LR = 0.05
REPTILE_STEPS = 3
EPSILON = 0.5
NUM_CLIENTS = 4
RTOL, ATOL = 1e-4, 1e-5


def sgd(learning_rate):
    return tff.learning.optimizers.build_sgdm(learning_rate=learning_rate)


pytestmark = pytest.mark.usefixtures("tff_local_execution")


@pytest.fixture(scope="module")
def task():
    return sinusoid.build_sinusoid(
        query_points=15, num_train_clients=20, num_eval_clients=5, eval_query_points=20
    )


@pytest.fixture(scope="module")
def clients(task):
    packed = task.train_clients(task.train_data.client_ids[:NUM_CLIENTS])
    assert packed[0]["query"]["mask"].sum() == 15 and packed[0]["query"]["mask"].size == 20
    return packed


def build(builder, task, **options):
    return builder(task.model_fn, task.client_data_type(), **options)


@pytest.fixture(scope="module")
def maml(task):
    return build(
        fedmeta.build_maml,
        task,
        inner_lr=INNER_LR,
        inner_steps=INNER_STEPS,
        meta_optimizer=sgd(META_LR),
    )


@pytest.fixture(scope="module")
def fomaml(task):
    return build(
        fedmeta.build_fomaml,
        task,
        inner_lr=INNER_LR,
        inner_steps=INNER_STEPS,
        meta_optimizer=sgd(META_LR),
    )


@pytest.fixture(scope="module")
def reptile(task):
    return build(
        fedmeta.build_reptile,
        task,
        inner_lr=INNER_LR,
        inner_steps=REPTILE_STEPS,
        outer_step_size=EPSILON,
    )


# ---------------------------------------------------------------------------------------------
# Plain-TensorFlow float64 reference.


mse = testing.mlp_squared_error
batches = testing.real_batches
whole = testing.real_examples


def sgd_step(weights, lr, batch):
    with tf.GradientTape() as tape:
        tape.watch(weights)
        loss = mse(weights, batch)
    return [w - lr * g for w, g in zip(weights, tape.gradient(loss, weights))]


def adapt(theta, lr, batch_list, steps):
    weights = theta
    for k in range(steps):
        batch = batch_list[k % len(batch_list)]
        if batch is not None:
            weights = sgd_step(weights, lr, batch)
    return weights


def maml_gradient(theta, client):
    with tf.GradientTape() as tape:
        tape.watch(theta)
        adapted = adapt(theta, INNER_LR, batches(client["support"]), INNER_STEPS)
        loss = mse(adapted, whole(client["query"]))
    return tape.gradient(loss, theta)


def fomaml_gradient(theta, client):
    adapted = [
        tf.constant(w.numpy())
        for w in adapt(theta, INNER_LR, batches(client["support"]), INNER_STEPS)
    ]
    with tf.GradientTape() as tape:
        tape.watch(adapted)
        loss = mse(adapted, whole(client["query"]))
    return tape.gradient(loss, adapted)


def reptile_delta(theta, client):
    all_batches = batches(client["support"]) + batches(client["query"])
    adapted = adapt(theta, INNER_LR, all_batches, REPTILE_STEPS)
    return [t - a for t, a in zip(theta, adapted)]


def assert_weights_close(actual, expected):
    np.testing.assert_allclose(
        np.concatenate([np.ravel(w) for w in actual]),
        np.concatenate([np.ravel(np.asarray(w)) for w in expected]),
        rtol=RTOL,
        atol=ATOL,
    )


def one_round(process, client_values):
    state = process.initialize()
    theta = testing.f64(process.get_model_weights(state).trainable)
    output = process.next(state, client_values)
    return theta, process.get_model_weights(output.state).trainable, output.metrics


# ---------------------------------------------------------------------------------------------


def test_maml_round_is_exact_second_order_meta_gradient_step(maml, clients):
    theta, new, metrics = one_round(maml, clients[:1])
    grad = maml_gradient(theta, clients[0])
    assert_weights_close(new, [t - META_LR * g for t, g in zip(theta, grad)])
    # ...and differs measurably from the first-order gradient, so the test can tell them apart.
    fo = fomaml_gradient(theta, clients[0])
    gap = max(float(tf.reduce_max(tf.abs(a - b))) for a, b in zip(grad, fo))
    assert gap * META_LR > 50 * ATOL
    work = metrics["client_work"]
    pre = float(mse(theta, whole(clients[0]["query"])))
    adapted = adapt(theta, INNER_LR, batches(clients[0]["support"]), INNER_STEPS)
    post = float(mse(adapted, whole(clients[0]["query"])))
    np.testing.assert_allclose(work["pre_adaptation_loss"], pre, rtol=1e-5)
    np.testing.assert_allclose(work["post_adaptation_loss"], post, rtol=1e-5)
    np.testing.assert_allclose(work["post_adaptation_metric"], post, rtol=1e-5)  # metric is MSE
    assert work["num_examples"] == 15  # weighted by the query size


def test_fomaml_round_is_query_gradient_at_adapted_weights(fomaml, clients):
    theta, new, _ = one_round(fomaml, clients[:1])
    grad = fomaml_gradient(theta, clients[0])
    assert_weights_close(new, [t - META_LR * g for t, g in zip(theta, grad)])


def test_reptile_round_moves_epsilon_toward_adapted_weights(reptile, clients):
    theta, new, metrics = one_round(reptile, clients[:1])
    delta = reptile_delta(theta, clients[0])
    assert max(float(tf.reduce_max(tf.abs(d))) for d in delta) > 1e-3
    assert_weights_close(new, [t - EPSILON * d for t, d in zip(theta, delta)])
    assert metrics["client_work"]["num_examples"] == 25  # support and query


def test_maml_averages_by_query_size_over_clients(maml, clients):
    theta, new, _ = one_round(maml, clients[:3])
    grads = [maml_gradient(theta, c) for c in clients[:3]]  # equal query sizes: plain mean
    mean = [sum(g[i] for g in grads) / 3 for i in range(len(theta))]
    assert_weights_close(new, [t - META_LR * g for t, g in zip(theta, mean)])


def test_maml_rejects_a_non_finite_client(maml, clients):
    poisoned = testing.copy_client(clients[1])
    poisoned["support"]["x"][0, 3, 0] = np.nan
    theta, new, metrics = one_round(maml, [clients[0], poisoned, clients[2]])
    grads = [maml_gradient(theta, c) for c in (clients[0], clients[2])]
    mean = [(a + b) / 2 for a, b in zip(*grads)]
    assert all(np.all(np.isfinite(w)) for w in new)
    assert_weights_close(new, [t - META_LR * g for t, g in zip(theta, mean)])
    assert metrics["client_work"]["num_clients_rejected"] == 1
    assert np.isfinite(metrics["client_work"]["post_adaptation_loss"])


def test_maml_post_adaptation_loss_falls_over_ten_rounds(maml, clients):
    state = maml.initialize()
    # The server (meta) learning rate is a hyperparameter of the state (TFF's finalizer's).
    hparams = maml.get_hparams(state)
    assert hparams["finalizer"]["learning_rate"] == pytest.approx(META_LR)
    hparams["finalizer"]["learning_rate"] = np.float32(TRAINING_META_LR)
    state = maml.set_hparams(state, hparams)
    losses = []
    for _ in range(11):
        output = maml.next(state, clients)
        state = output.state
        losses.append(float(output.metrics["client_work"]["post_adaptation_loss"]))
    assert np.all(np.isfinite(losses))
    print("maml post-adaptation loss by round:", np.round(losses, 3))
    assert np.all(np.diff(losses) < 0), losses
    assert losses[-1] < 0.95 * losses[0], losses


@pytest.mark.parametrize(
    "builder, options, error, message",
    [
        (fedmeta.build_maml, dict(inner_lr=0.0), ValueError, "inner_lr"),
        (fedmeta.build_fomaml, dict(inner_steps=0), ValueError, "inner_steps"),
        (fedmeta.build_reptile, dict(outer_step_size=-1.0), ValueError, "outer_step_size"),
        (fedmeta.build_reptile, dict(inner_steps=2.5), ValueError, "inner_steps"),
    ],
)
def test_bad_options_raise_actionable_errors(task, builder, options, error, message):
    with pytest.raises(error, match=message):
        build(builder, task, **options)
