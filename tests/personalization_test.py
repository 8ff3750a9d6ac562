"""Tests of `mfl_tff.evaluation.personalization.build_personalization_eval`.

The reference is plain TensorFlow in float64, run eagerly: the digits MLP written out as dense
layers, query loss and accuracy over the real query examples (boolean indexing, not masks), SGD
steps on support batch k at step k, and the documented guard (a step at index >= guard_after is
kept only if the loss over the whole support set is finite and not higher than before).
"""

from __future__ import annotations

import collections

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_federated as tff

from mfl_tff.algorithms import composer
from mfl_tff.data import digits
from mfl_tff.evaluation import personalization
from mfl_tff.meta import meta_model

MAX_STEPS = 3
GUARD_AFTER = 1
FINE_TUNE_LR = 0.05
MODERATE_ALPHA = (0.2, 0.1, 0.3, 0.05, 0.15, 0.25)  # per layer (digits MLP: 6 tensors)
HUGE_ALPHA = (300.0,) * 6
KEYS = ("own_loss", "own_metric", "fine_tune_loss", "fine_tune_metric")


pytestmark = pytest.mark.usefixtures("tff_local_execution")


@pytest.fixture(scope="module")
def task():
    return digits.build_digits(num_train_clients=6, num_eval_clients=3)


@pytest.fixture(scope="module")
def clients(task):
    packed = task.eval_clients(task.eval_data.client_ids)
    for c in packed:  # every step of the curve uses a real support batch
        assert np.all(c["support"]["mask"][:MAX_STEPS].sum(axis=1) > 0)
    assert any(c["query"]["mask"].min() == 0 for c in packed)  # some padding
    return packed


@pytest.fixture(scope="module")
def evaluate(task):
    alpha_type = tff.types.to_type(tuple((np.float32, ()) for _ in MODERATE_ALPHA))
    return personalization.build_personalization_eval(
        task.model_fn,
        task.client_data_type("eval"),
        alpha_type,
        max_steps=MAX_STEPS,
        fine_tune_lr=FINE_TUNE_LR,
        guard_after=GUARD_AFTER,
    )


@pytest.fixture(scope="module")
def weights(task):
    model = task.model_fn()
    return tff.learning.models.ModelWeights(
        trainable=tuple(np.asarray(w) for w in model.initial_weights[0]),
        non_trainable=tuple(np.asarray(w) for w in model.initial_weights[1]),
    )


# ---------------------------------------------------------------------------------------------
# Plain-TensorFlow float64 reference.


def logits(weights, x):
    h = tf.reshape(x, [tf.shape(x)[0], -1])
    for i in range(0, len(weights), 2):
        h = tf.matmul(h, weights[i]) + weights[i + 1]
        if i + 2 < len(weights):
            h = tf.nn.relu(h)
    return h


def examples(part, batch=None):
    mask = part["mask"] if batch is None else part["mask"][batch]
    x = part["x"] if batch is None else part["x"][batch]
    y = part["y"] if batch is None else part["y"][batch]
    keep = mask.reshape(-1) > 0
    return (
        tf.constant(x.reshape(-1, 64)[keep], tf.float64),
        tf.constant(y.reshape(-1)[keep]),
    )


def loss_and_accuracy(weights, data):
    x, y = data
    out = logits(weights, x)
    loss = tf.reduce_mean(tf.reduce_logsumexp(out, axis=1) - tf.gather(out, y, batch_dims=1))
    accuracy = np.mean(np.argmax(out.numpy(), axis=1) == y.numpy())
    return float(loss), float(accuracy)


def sgd_step(weights, rates, data):
    with tf.GradientTape() as tape:
        tape.watch(weights)
        x, y = data
        out = logits(weights, x)
        loss = tf.reduce_mean(tf.reduce_logsumexp(out, axis=1) - tf.gather(out, y, batch_dims=1))
    return [w - r * g for w, r, g in zip(weights, rates, tape.gradient(loss, weights))]


def reference_curve(weights, client, rates, guard_after):
    """Query (loss, accuracy) after 0..MAX_STEPS steps, and whether each step was kept.

    `rates` is a list of per-layer rates, or a function of the step returning one."""
    rates_at = rates if callable(rates) else (lambda step: rates)
    current = [tf.constant(np.asarray(w, np.float64)) for w in weights.trainable]
    support = examples(client["support"])
    curve, kept = [loss_and_accuracy(current, examples(client["query"]))], []
    for step in range(MAX_STEPS):
        stepped = sgd_step(current, rates_at(step), examples(client["support"], step))
        accept = True
        if step >= guard_after:
            before = loss_and_accuracy(current, support)[0]
            after = loss_and_accuracy(stepped, support)[0]
            finite = all(np.all(np.isfinite(w.numpy())) for w in stepped)
            accept = bool(np.isfinite(after) and after <= before and finite)
        kept.append(accept)
        current = stepped if accept else current
        curve.append(loss_and_accuracy(current, examples(client["query"])))
    return np.array(curve), kept


def as_arrays(per_client):
    return [{k: np.asarray(c[k], np.float64) for k in KEYS} for c in per_client]


def test_step_zero_is_the_unadapted_models_query_loss_and_accuracy(evaluate, weights, clients):
    results = as_arrays(evaluate(weights, MODERATE_ALPHA, clients))
    assert len(results) == len(clients)
    for result, client in zip(results, clients):
        for key in KEYS:
            assert result[key].shape == (MAX_STEPS + 1,)
        loss, accuracy = loss_and_accuracy(
            [tf.constant(np.asarray(w, np.float64)) for w in weights.trainable],
            examples(client["query"]),
        )
        for rule in ("own", "fine_tune"):
            np.testing.assert_allclose(result[f"{rule}_loss"][0], loss, rtol=1e-5)
            np.testing.assert_allclose(result[f"{rule}_metric"][0], accuracy, atol=1e-6)


def test_curves_equal_independent_sgd_steps(evaluate, weights, clients):
    results = as_arrays(evaluate(weights, MODERATE_ALPHA, clients))
    for result, client in zip(results, clients):
        fine_tune, _ = reference_curve(weights, client, [FINE_TUNE_LR] * 6, MAX_STEPS)
        own, kept = reference_curve(weights, client, list(MODERATE_ALPHA), GUARD_AFTER)
        assert kept[0]  # the first step is never guarded
        np.testing.assert_allclose(result["fine_tune_loss"], fine_tune[:, 0], rtol=1e-5)
        np.testing.assert_allclose(result["fine_tune_metric"], fine_tune[:, 1], atol=1e-6)
        np.testing.assert_allclose(result["own_loss"], own[:, 0], rtol=1e-5)
        np.testing.assert_allclose(result["own_metric"], own[:, 1], atol=1e-6)
        assert result["fine_tune_loss"][-1] < result["fine_tune_loss"][0]
        # The learned per-layer rates differ from fine-tuning's, and the curves show it.
        assert abs(result["own_loss"][1] - result["fine_tune_loss"][1]) > 1e-3


def test_guard_rejects_diverging_steps_so_curves_stay_finite(evaluate, weights, clients):
    results = as_arrays(evaluate(weights, HUGE_ALPHA, clients))
    rejected_somewhere = False
    for result, client in zip(results, clients):
        own, kept = reference_curve(weights, client, list(HUGE_ALPHA), GUARD_AFTER)
        assert np.all(np.isfinite(result["own_loss"])) and np.all(np.isfinite(result["own_metric"]))
        # The unguarded first step with these rates blows the query loss up...
        assert result["own_loss"][1] > 10 * result["own_loss"][0]
        np.testing.assert_allclose(result["own_loss"], own[:, 0], rtol=1e-4)
        for step, accepted in enumerate(kept[GUARD_AFTER:], start=GUARD_AFTER):
            if not accepted:  # ...and a rejected step leaves the curve where it was.
                rejected_somewhere = True
                assert result["own_loss"][step + 1] == result["own_loss"][step]
    assert rejected_somewhere


def test_fixed_rate_alpha_is_a_scalar_rate():
    (rate,) = personalization.fixed_rate_alpha(0.03)
    assert np.shape(rate) == () and rate == np.float32(0.03)


@pytest.mark.parametrize(
    "options, message",
    [(dict(max_steps=0), "max_steps"), (dict(fine_tune_lr=0.0), "fine_tune_lr")],
)
def test_bad_options_raise_value_errors(task, options, message):
    settings = dict(max_steps=2, fine_tune_lr=0.1, guard_after=1)
    settings.update(options)
    with pytest.raises(ValueError, match=message):
        personalization.build_personalization_eval(
            task.model_fn,
            task.client_data_type("eval"),
            tff.types.to_type((np.float32,)),
            **settings,
        )


def test_a_per_step_meta_model_steps_with_alpha_times_its_multipliers(task, weights, clients):
    """per_step: the rate of step k on layer l is alpha_l * exp(3 tanh(P[k, l] / 3)), steps
    past the trained K reuse row K - 1, and `own_step_sizes` reports those rates."""
    logits = np.array([[0.5, -1.0, 2.0, 0.0, 9.0, -0.3], [-2.0, 0.4, 0.0, 1.5, -9.0, 0.8]])
    meta = collections.OrderedDict(
        alpha=tuple(np.float32(a) for a in MODERATE_ALPHA),
        meta_model=collections.OrderedDict(step_logits=logits.astype(np.float32)),
    )
    evaluate = personalization.build_personalization_eval(
        task.model_fn,
        task.client_data_type("eval"),
        composer.meta_type_of(meta),
        max_steps=MAX_STEPS,
        fine_tune_lr=FINE_TUNE_LR,
        guard_after=2,
        loop=meta_model.InnerLoop(meta_model="per_step", num_steps=2),
    )
    multipliers = np.exp(3 * np.tanh(logits / 3))
    rates = np.asarray(MODERATE_ALPHA) * multipliers  # [K, L]
    per_client = evaluate(weights, meta, clients)
    for result, client in zip(per_client, clients):
        own, _ = reference_curve(weights, client, lambda step: list(rates[min(step, 1)]), 2)
        np.testing.assert_allclose(np.asarray(result["own_loss"]), own[:, 0], rtol=1e-5)
        np.testing.assert_allclose(result["own_step_sizes"], rates, rtol=1e-6)
