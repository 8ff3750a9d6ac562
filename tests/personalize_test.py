"""Tests of `mfl_tff.training.personalize.evaluate`: held-out clients -> personalization.json.

Algorithms are built by name (`builders.build_algorithm`) for a small sinusoid task. The reference
is plain TensorFlow in float64 (eager): the sinusoid MLP written out as dense layers, per-client
query MSE before adaptation, after SGD steps on the client's one support batch, and numpy
statistics over clients.
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from mfl_tff.algorithms import builders
from mfl_tff.data import sinusoid
from mfl_tff.training import personalize

FINE_TUNE_LR = 0.02
MAX_STEPS = 3
FEDAVG_EVAL_STEPS = 2
NUM_EVAL = 4
DESIGN_KEYS = (
    "task",
    "algorithm",
    "metric",
    "num_clients",
    "rounds",
    "before_adaptation",
    "after_adaptation",
    "steps_curve",
)


pytestmark = pytest.mark.usefixtures("tff_local_execution")


@pytest.fixture(scope="module")
def task():
    return sinusoid.build_sinusoid(num_train_clients=10, num_eval_clients=5, eval_query_points=20)


@pytest.fixture(scope="module")
def built(task):
    """`name -> (process, initial state, spec)`, each built once."""
    cache = {}

    def get(name):
        if name not in cache:
            steps = FEDAVG_EVAL_STEPS if name == "fedavg" else 1
            process, spec = builders.build_algorithm(
                name, task, builders.AlgorithmOptions(inner_lr=0.01, inner_steps=steps)
            )
            cache[name] = (process, process.initialize(), spec)
        return cache[name]

    return get


def mse(weights, part):
    keep = part["mask"].reshape(-1) > 0
    h = tf.constant(part["x"].reshape(-1, 1)[keep], tf.float64)
    y = tf.constant(part["y"].reshape(-1, 1)[keep], tf.float64)
    for i in range(0, len(weights), 2):
        h = tf.matmul(h, weights[i]) + weights[i + 1]
        if i + 2 < len(weights):
            h = tf.nn.relu(h)
    return tf.reduce_mean(tf.square(h - y))


def curve(weights, client, rates, steps, guard_after):
    """Query MSE after 0..steps SGD steps on the support batch, guarded from `guard_after` on."""
    current = [tf.constant(np.asarray(w, np.float64)) for w in weights]
    values = [float(mse(current, client["query"]))]
    for step in range(steps):
        with tf.GradientTape() as tape:
            tape.watch(current)
            loss = mse(current, client["support"])
        grads = tape.gradient(loss, current)
        stepped = [w - r * g for w, r, g in zip(current, rates, grads)]
        after = float(mse(stepped, client["support"]))
        if step < guard_after or (np.isfinite(after) and after <= float(loss)):
            current = stepped
        values.append(float(mse(current, client["query"])))
    return np.array(values)


def assert_distribution(got, values):
    assert got["mean"] == pytest.approx(np.mean(values), rel=1e-5)
    assert got["p10"] == pytest.approx(np.percentile(values, 10), rel=1e-5)
    assert got["median"] == pytest.approx(np.median(values), rel=1e-5)
    assert got["p90"] == pytest.approx(np.percentile(values, 90), rel=1e-5)


def test_fixed_rate_algorithm_report(built, task):
    process, state, spec = built("fedavg")
    assert not spec.learns_alpha and spec.eval_steps == FEDAVG_EVAL_STEPS
    report = personalize.evaluate(
        process,
        state,
        spec,
        task,
        fine_tune_lr=FINE_TUNE_LR,
        max_steps=MAX_STEPS,
        rounds=1,
        num_clients=NUM_EVAL,
    )
    for key in DESIGN_KEYS:
        assert key in report
    assert (report["task"], report["algorithm"], report["metric"]) == ("sinusoid", "fedavg", "mse")
    assert report["num_clients"] == NUM_EVAL and report["rounds"] == 1
    weights = process.get_model_weights(state).trainable
    clients = task.eval_clients(task.eval_data.client_ids[:NUM_EVAL])
    rates = [FINE_TUNE_LR] * len(weights)
    # Its own rule: fine-tuning at the fixed rate, read at its step count K, guarded after K.
    own = np.stack([curve(weights, c, rates, MAX_STEPS, FEDAVG_EVAL_STEPS) for c in clients])
    fine_tune = np.stack([curve(weights, c, rates, MAX_STEPS, MAX_STEPS) for c in clients])
    assert_distribution(report["before_adaptation"], own[:, 0])
    assert_distribution(report["after_adaptation"], own[:, FEDAVG_EVAL_STEPS])
    np.testing.assert_allclose(report["steps_curve"], own.mean(axis=0), rtol=1e-5)
    # The shared baseline: the same rate, unguarded, read at max_steps (the default).
    assert_distribution(report["fine_tune"]["before_adaptation"], fine_tune[:, 0])
    assert_distribution(report["fine_tune"]["after_adaptation"], fine_tune[:, MAX_STEPS])
    np.testing.assert_allclose(
        report["fine_tune"]["steps_curve"], fine_tune.mean(axis=0), rtol=1e-5
    )
    assert report["fine_tune"]["adaptation_steps"] == MAX_STEPS


def test_learned_alpha_algorithm_uses_its_alpha_for_its_trained_steps(built, task):
    process, state, spec = built("meta_sgd")
    assert spec.learns_alpha and spec.eval_steps == 1
    rng = np.random.default_rng(5)
    alpha = tuple(
        rng.uniform(0.0, 0.05, np.shape(a)).astype(np.float32)
        for a in process.get_hparams(state)["alpha"]
    )
    state = process.set_hparams(state, {"alpha": alpha})
    report = personalize.evaluate(
        process,
        state,
        spec,
        task,
        fine_tune_lr=FINE_TUNE_LR,
        max_steps=MAX_STEPS,
        rounds=1,
        fine_tune_steps=2,
    )
    assert report["num_clients"] == 5  # all held-out clients by default
    weights = process.get_model_weights(state).trainable
    clients = task.eval_clients(task.eval_data.client_ids)
    own = np.stack([curve(weights, c, alpha, MAX_STEPS, spec.eval_steps) for c in clients])
    fine_tune = np.stack(
        [curve(weights, c, [FINE_TUNE_LR] * len(weights), MAX_STEPS, MAX_STEPS) for c in clients]
    )
    # "after" is read at the trained step count K = 1, with the learned per-coordinate rates.
    assert_distribution(report["after_adaptation"], own[:, 1])
    np.testing.assert_allclose(report["steps_curve"], own.mean(axis=0), rtol=1e-5)
    assert_distribution(report["fine_tune"]["after_adaptation"], fine_tune[:, 2])
    assert report["fine_tune"]["adaptation_steps"] == 2
    assert abs(own[:, 1].mean() - fine_tune[:, 1].mean()) > 1e-4  # the rules differ
