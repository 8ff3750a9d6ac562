"""Tests of `mfl_tff.meta.inner_loop`: local SGD over packed batches against a plain-TF loop.

The code under test runs in float32 in a plain `tf.Graph` + `tf.compat.v1.Session` (no TFF worker).
The reference is an eager float64 loop with its own MLP forward pass and loss, stepping on the real
examples of each non-empty batch (picked by boolean indexing, not by masks), in order, for E epochs.
Tolerances: 6-9 float32 SGD steps on a 33-parameter model accumulate ~1e-6 relative error, so
RTOL = 1e-4 and ATOL = 1e-6 leave a wide margin while the steps move the weights by ~1e-1.
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from mfl_tff.meta import inner_loop
from mfl_tff.models import functional, keras_models
from mfl_tff.training import runtime

RTOL = 1e-4
ATOL = 1e-6


@pytest.fixture(scope="module", autouse=True)
def no_worker_left():
    """These tests run graphs in a Session; they must start (or leave) no `worker_binary`.

    Only this process's own workers count: the suite's background jobs run theirs.
    """
    before = set(runtime.live_worker_pids())
    yield
    assert set(runtime.live_worker_pids()) <= before


def _functional(keras_fn, x_shape, problem):
    model = functional.functional_model(keras_fn, x_shape=x_shape, problem=problem, seed=3)
    return model, functional.initial_weights(model)


@pytest.fixture(scope="module")
def classifier():
    return _functional(lambda: keras_models.mlp((2,), (5,), 3), (2,), "classification")


@pytest.fixture(scope="module")
def regressor():
    return _functional(lambda: keras_models.mlp((1,), (4,), 1), (1,), "regression")


def random_theta(weights, seed):
    rng = np.random.default_rng(seed)
    return tuple(rng.normal(scale=0.8, size=w.shape).astype(np.float32) for w in weights[0])


def packed_batches(problem, x_dim, real_per_batch, batch_size=4, seed=0):
    """Packed batches with `real_per_batch[i]` real examples in batch i; padding holds garbage."""
    rng = np.random.default_rng(seed)
    num_batches = len(real_per_batch)
    x = rng.normal(size=(num_batches, batch_size, x_dim)).astype(np.float32)
    if problem == "classification":
        y = rng.integers(0, 3, size=(num_batches, batch_size)).astype(np.int32)
    else:
        y = rng.normal(size=(num_batches, batch_size, 1)).astype(np.float32)
    mask = (np.arange(batch_size)[None, :] < np.asarray(real_per_batch)[:, None]).astype(np.float32)
    return {"x": x, "y": y, "mask": mask}


def run_in_graph(fn, *args):
    """`fn(*args)` with the numpy structures `args` as constants of a fresh graph; numpy out."""
    with tf.Graph().as_default() as graph:
        outputs = fn(*tf.nest.map_structure(tf.constant, args))
        with tf.compat.v1.Session(graph=graph) as session:
            return session.run(outputs)


def library_local_sgd(model, weights, batches, step_sizes, epochs, **kwargs):
    return run_in_graph(
        lambda w, b, s: inner_loop.local_sgd(model, w, b, s, epochs, **kwargs),
        weights,
        batches,
        step_sizes,
    )


def ref_loss(problem, theta, x, y):
    """Mean loss of a ReLU MLP ((kernel, bias) per layer, linear last layer) in float64."""
    h = tf.constant(x, tf.float64)
    for i in range(0, len(theta), 2):
        h = tf.matmul(h, theta[i]) + theta[i + 1]
        if i + 2 < len(theta):
            h = tf.nn.relu(h)
    if problem == "classification":
        return -tf.reduce_mean(tf.gather(tf.nn.log_softmax(h), y, batch_dims=1))
    return tf.reduce_mean(tf.square(h - y.astype(np.float64)))


def ref_local_sgd(problem, theta, batches, rates, epochs, order=None, mu=0.0):
    """Plain SGD on each non-empty batch in `order` (default: as stored), for `epochs` passes;
    with `mu`, on loss + mu/2 ||w - theta||^2 (FedProx's proximal objective)."""
    start = [tf.constant(w, tf.float64) for w in theta]
    theta = list(start)
    rates = list(rates) if isinstance(rates, (tuple, list)) else [rates] * len(theta)
    order = range(len(batches["mask"])) if order is None else order
    for _ in range(epochs):
        for b in order:
            keep = batches["mask"][b] > 0
            if not keep.any():
                continue
            with tf.GradientTape() as tape:
                tape.watch(theta)
                loss = ref_loss(problem, theta, batches["x"][b][keep], batches["y"][b][keep])
                loss += (
                    mu
                    / 2
                    * tf.add_n([tf.reduce_sum(tf.square(w - s)) for w, s in zip(theta, start)])
                )
            grads = tape.gradient(loss, theta)
            theta = [w - np.asarray(a, np.float64) * g for w, a, g in zip(theta, rates, grads)]
    return [w.numpy() for w in theta]


def assert_all_close(actual, expected):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        assert np.shape(a) == np.shape(e)
        np.testing.assert_allclose(np.asarray(a, np.float64), e, rtol=RTOL, atol=ATOL)


def max_abs_difference(a, b):
    return max(float(np.max(np.abs(np.asarray(x, np.float64) - y))) for x, y in zip(a, b))


def test_local_sgd_scalar_step_size_equals_reference_loop(classifier):
    model, weights = classifier
    theta = random_theta(weights, 1)
    # Batch 1 is all padding (skipped), batch 2 is partly padded.
    batches = packed_batches("classification", 2, [4, 0, 3, 2], seed=2)
    rate = np.float32(0.4)
    trained = library_local_sgd(model, (theta, weights[1]), batches, rate, epochs=2)
    expected = ref_local_sgd("classification", theta, batches, rate, epochs=2)
    assert_all_close(trained, expected)
    # Not vacuous: training moved the weights, and neither one epoch nor another batch order
    # would have passed.
    assert max_abs_difference(theta, expected) > 0.05
    one_epoch = ref_local_sgd("classification", theta, batches, rate, epochs=1)
    assert max_abs_difference(trained, one_epoch) > 100 * ATOL
    reordered = ref_local_sgd("classification", theta, batches, rate, 2, order=[3, 2, 1, 0])
    assert max_abs_difference(trained, reordered) > 100 * ATOL


def test_local_sgd_per_coordinate_step_sizes_equal_reference_loop(regressor):
    model, weights = regressor
    theta = random_theta(weights, 3)
    batches = packed_batches("regression", 1, [3, 4, 0], seed=4)
    rng = np.random.default_rng(5)
    rates = tuple(rng.uniform(0.05, 0.3, size=w.shape).astype(np.float32) for w in theta)
    trained = library_local_sgd(model, (theta, weights[1]), batches, rates, epochs=3)
    expected = ref_local_sgd("regression", theta, batches, rates, epochs=3)
    assert_all_close(trained, expected)
    assert max_abs_difference(theta, expected) > 0.05
    # Each coordinate's own rate matters: their mean as one scalar rate gives other weights.
    mean_rate = np.mean(np.concatenate([r.reshape(-1) for r in rates]))
    scalar = ref_local_sgd("regression", theta, batches, mean_rate, epochs=3)
    assert max_abs_difference(trained, scalar) > 100 * ATOL


def test_local_sgd_with_a_proximal_term_descends_the_proximal_objective(classifier):
    """FedProx (arXiv 1812.06127): the gradient of mu/2 ||w - w_0||^2, by autodiff here."""
    model, weights = classifier
    theta = random_theta(weights, 12)
    batches = packed_batches("classification", 2, [4, 0, 3, 2], seed=13)
    rate, mu = np.float32(0.4), 0.7
    trained = library_local_sgd(
        model, (theta, weights[1]), batches, rate, epochs=2, proximal_strength=mu
    )
    expected = ref_local_sgd("classification", theta, batches, rate, epochs=2, mu=mu)
    assert_all_close(trained, expected)
    # Not vacuous: the proximal term changes the result.
    plain = ref_local_sgd("classification", theta, batches, rate, epochs=2)
    assert max_abs_difference(trained, plain) > 100 * ATOL


@pytest.mark.parametrize("problem", ["classification", "regression"])
def test_local_sgd_on_all_padding_leaves_weights_unchanged(problem, classifier, regressor):
    model, weights = classifier if problem == "classification" else regressor
    theta = random_theta(weights, 6)
    x_dim = 2 if problem == "classification" else 1
    batches = packed_batches(problem, x_dim, [0, 0, 0], seed=7)
    trained = library_local_sgd(model, (theta, weights[1]), batches, np.float32(0.5), 2)
    for t, w in zip(trained, theta):
        np.testing.assert_array_equal(t, w)


def test_local_sgd_with_zero_epochs_leaves_weights_unchanged(classifier):
    model, weights = classifier
    theta = random_theta(weights, 8)
    batches = packed_batches("classification", 2, [4, 4], seed=9)
    trained = library_local_sgd(model, (theta, weights[1]), batches, 0.5, 0)
    for t, w in zip(trained, theta):
        np.testing.assert_array_equal(t, w)


def test_concat_parts_puts_query_batches_after_support_batches():
    support = packed_batches("classification", 2, [4, 1], seed=10)
    query = packed_batches("classification", 2, [2, 0, 0], seed=11)
    joined = inner_loop.concat_parts({"support": support, "query": query})
    assert set(joined) == {"x", "y", "mask"}
    for key in ("x", "y", "mask"):
        np.testing.assert_array_equal(joined[key][:2], support[key])
        np.testing.assert_array_equal(joined[key][2:], query[key])


def test_local_sgd_of_conv_clients_under_vectorized_map_equals_each_client_alone():
    # Batch 2 is padding for every client: under tf.vectorized_map a cond would run the
    # convolution's gradient on no client, which pfor's fallback loop cannot do (it failed
    # before `vectorized_clients`); each client must end where it ends trained alone.
    model, weights = _functional(
        lambda: keras_models.small_cnn((6, 6, 1), 3), (6, 6, 1), "classification"
    )
    clients = []
    for seed, real in enumerate(([4, 4, 0], [2, 0, 0], [3, 1, 0])):
        batches = packed_batches("classification", 36, real, seed=seed)
        batches["x"] = batches["x"].reshape((3, 4, 6, 6, 1))
        clients.append(batches)
    stacked = tf.nest.map_structure(lambda *a: np.stack(a), *clients)

    def vectorized(w, b, rate):
        with inner_loop.vectorized_clients():
            return tf.vectorized_map(
                lambda client: inner_loop.local_sgd(model, w, client, rate, 2),
                b,
                fallback_to_while_loop=True,
            )

    together = run_in_graph(vectorized, weights, stacked, np.float32(0.3))
    for i, client in enumerate(clients):
        alone = library_local_sgd(model, weights, client, np.float32(0.3), 2)
        assert max_abs_difference(alone, weights[0]) > 1e-3  # it trained
        for a, t in zip(alone, together):
            np.testing.assert_allclose(t[i], a, rtol=RTOL, atol=ATOL)
