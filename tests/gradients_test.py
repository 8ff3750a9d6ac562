"""Tests of `mfl_tff.meta.gradients` against references that share no code with it.

The library runs in float32 (the functional models' input specs are float32) inside a plain
`tf.Graph` + `tf.compat.v1.Session`, which starts no TFF worker. The references are float64 numpy:
an MLP forward pass with hand-written backpropagation (itself checked against finite differences),
real examples picked by boolean indexing (not by masks), K explicit SGD steps. Finite differences
are central, of the float64 reference, with EPS = 1e-6: truncation error ~ EPS^2 * (third
derivative) ~ 1e-12 and round-off ~ 1e-16 / EPS = 1e-10, so the references are exact far below the
float32 error of the code under test (~1e-7 per operation, a few hundred operations deep; observed
<= 2e-4 relative). Hence RTOL = 1e-3 and ATOL = 1e-5, against gradients of order 1e-2..10. Every
coordinate is checked: the models have at most 33 parameters.
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from mfl_tff.meta import gradients, hparams
from mfl_tff.models import functional, keras_models
from mfl_tff.training import runtime

EPS = 1e-6
RTOL = 1e-3
ATOL = 1e-5
GRANULARITIES = ("scalar", "per_layer", "per_coordinate")
X_DIM = {"classification": 2, "regression": 1}
MODEL_SHAPES = {
    "classification": [(2, 5), (5,), (5, 3), (3,)],
    "regression": [(1, 4), (4,), (4, 1), (1,)],
}


@pytest.fixture(scope="module", autouse=True)
def no_worker_left():
    """These tests run graphs in a Session; they must start (or leave) no `worker_binary`.

    Only this process's own workers count: the suite's background jobs run theirs.
    """
    before = set(runtime.live_worker_pids())
    yield
    assert set(runtime.live_worker_pids()) <= before


# ---------------------------------------------------------------------------------------------
# Fixtures: models, random weights, a packed client with partly padded support and query.


def _functional(keras_fn, x_shape, problem):
    model = functional.functional_model(keras_fn, x_shape=x_shape, problem=problem, seed=3)
    trainable, non_trainable = functional.initial_weights(model)
    return model, [w.shape for w in trainable], non_trainable


@pytest.fixture(scope="module")
def classifier():
    return _functional(lambda: keras_models.mlp((2,), (5,), 3), (2,), "classification")


@pytest.fixture(scope="module")
def regressor():
    return _functional(lambda: keras_models.mlp((1,), (4,), 1), (1,), "regression")


@pytest.fixture(scope="module")
def softmax_regressor():
    return _functional(lambda: keras_models.softmax_regression(2, 3), (2,), "classification")


def random_theta(shapes, seed):
    """Weights larger than Keras' initialization, so that the losses are clearly non-quadratic."""
    rng = np.random.default_rng(seed)
    return tuple(rng.normal(scale=0.8, size=s).astype(np.float32) for s in shapes)


def random_part(rng, problem, num_batches, batch_size, x_dim, num_real):
    """A packed part whose padding holds random (valid) examples, so a leak would show."""
    x = rng.normal(size=(num_batches, batch_size, x_dim)).astype(np.float32)
    if problem == "classification":
        y = rng.integers(0, 3, size=(num_batches, batch_size)).astype(np.int32)
    else:
        y = rng.normal(size=(num_batches, batch_size, 1)).astype(np.float32)
    mask = np.zeros(num_batches * batch_size, np.float32)
    mask[:num_real] = 1.0
    return {"x": x, "y": y, "mask": mask.reshape(num_batches, batch_size)}


def packed_client(problem, x_dim, seed=0):
    """2 support batches of 4 (7 real: batches cycle for K = 3), 2 query batches of 4 (5 real)."""
    rng = np.random.default_rng(seed)
    return {
        "support": random_part(rng, problem, 2, 4, x_dim, 7),
        "query": random_part(rng, problem, 2, 4, x_dim, 5),
    }


def random_alpha(shapes, granularity, seed):
    """Positive rates that differ between tensors and coordinates, so a mix-up would show."""
    rng = np.random.default_rng(seed)
    base = hparams.initial_alpha(shapes, granularity, 1.0)
    return tuple(
        (np.asarray(a) * rng.uniform(0.2, 0.6, size=np.shape(a))).astype(np.float32) for a in base
    )


# ---------------------------------------------------------------------------------------------
# The code under test, run in a graph.


def run_in_graph(fn, *args):
    """`fn(*args)` with the numpy structures `args` as constants of a fresh graph; numpy out.

    Grappler (TF's graph optimizer, which only rewrites a graph into an equivalent one) is off:
    on these second-order graphs it takes most of the run time.
    """
    config = tf.compat.v1.ConfigProto()
    config.graph_options.rewrite_options.disable_meta_optimizer = True
    with tf.Graph().as_default() as graph:
        outputs = fn(*tf.nest.map_structure(tf.constant, args))
        with tf.compat.v1.Session(graph=graph, config=config) as session:
            return session.run(outputs)


def library_meta_gradients(model, theta, non_trainable, data, alpha, num_steps, **kw):
    return gradients.meta_gradients(model, (theta, non_trainable), data, alpha, num_steps, **kw)


# ---------------------------------------------------------------------------------------------
# Independent float64 reference: numpy forward pass and hand-written backpropagation.


def ref_loss_and_grad(problem, theta, x, y):
    """Mean loss over the examples (x, y) and its gradient w.r.t. `theta`, in float64.

    `theta` is (kernel, bias) per dense layer, ReLU between layers and a linear last layer.
    """
    theta = [np.asarray(w, np.float64) for w in theta]
    num_layers = len(theta) // 2
    inputs, pre_activations = [], []
    h = np.asarray(x, np.float64)
    for i in range(num_layers):
        inputs.append(h)
        z = h @ theta[2 * i] + theta[2 * i + 1]
        pre_activations.append(z)
        h = np.maximum(z, 0.0) if i < num_layers - 1 else z
    n = len(h)
    if problem == "classification":
        shifted = h - h.max(axis=1, keepdims=True)
        log_p = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        loss = -np.mean(log_p[np.arange(n), y])
        d_out = np.exp(log_p)
        d_out[np.arange(n), y] -= 1.0
        d_out /= n
    else:
        diff = h - np.asarray(y, np.float64)
        loss = np.mean(np.square(diff))
        d_out = 2.0 * diff / diff.size
    grads = [None] * len(theta)
    for i in reversed(range(num_layers)):
        grads[2 * i] = inputs[i].T @ d_out
        grads[2 * i + 1] = d_out.sum(axis=0)
        if i > 0:
            d_out = (d_out @ theta[2 * i].T) * (pre_activations[i - 1] > 0)
    return loss, grads


def real_examples(part, index=None):
    """The real examples of batch `index` of `part` (or of all its batches), by boolean indexing."""
    sl = slice(None) if index is None else slice(index, index + 1)
    keep = part["mask"][sl].reshape(-1) > 0
    x = part["x"][sl].reshape((-1,) + part["x"].shape[2:])[keep]
    y = part["y"][sl].reshape((-1,) + part["y"].shape[2:])[keep]
    return x.astype(np.float64), y


def ref_loss(problem, theta, part, index=None):
    return ref_loss_and_grad(problem, theta, *real_examples(part, index))[0]


def ref_grad(problem, theta, part, index=None):
    return ref_loss_and_grad(problem, theta, *real_examples(part, index))[1]


def ref_accuracy(theta, part):
    x, y = real_examples(part)
    h = x
    for i in range(0, len(theta), 2):
        h = h @ theta[i] + theta[i + 1]
        h = np.maximum(h, 0.0) if i + 2 < len(theta) else h
    return np.mean(np.argmax(h, axis=-1) == y)


def ref_expand(alpha, granularity, num_tensors):
    alpha = [np.asarray(a, np.float64) for a in alpha]
    return alpha * num_tensors if granularity == "scalar" else alpha


def ref_adapt(problem, theta, rates, support, num_steps):
    """K SGD steps, support batches in turn; returns theta_K and the batch gradients g_k."""
    theta = [np.asarray(w, np.float64) for w in theta]
    num_batches = support["mask"].shape[0]
    batch_grads = []
    for k in range(num_steps):
        g = ref_grad(problem, theta, support, k % num_batches)
        batch_grads.append(g)
        theta = [w - a * gi for w, a, gi in zip(theta, rates, g)]
    return theta, batch_grads


def ref_meta_loss(problem, theta, alpha, granularity, data, num_steps):
    rates = ref_expand(alpha, granularity, len(theta))
    adapted, _ = ref_adapt(problem, theta, rates, data["support"], num_steps)
    return ref_loss(problem, adapted, data["query"])


def central_differences(f, arrays):
    """d f / d arrays[i][j] by central differences, for every coordinate j of every array i."""
    arrays = [np.array(a, np.float64) for a in arrays]
    result = []
    for i, a in enumerate(arrays):
        grad = np.zeros(a.shape)
        for j in np.ndindex(a.shape):
            plus = [b.copy() for b in arrays]
            minus = [b.copy() for b in arrays]
            plus[i][j] += EPS
            minus[i][j] -= EPS
            grad[j] = (f(plus) - f(minus)) / (2 * EPS)
        result.append(grad)
    return result


def reduce_to_granularity(per_coordinate, granularity):
    """Per-coordinate alpha gradients summed to the granularity of alpha."""
    if granularity == "scalar":
        return [sum(np.sum(g) for g in per_coordinate)]
    if granularity == "per_layer":
        return [np.sum(g) for g in per_coordinate]
    return list(per_coordinate)


def assert_all_close(actual, expected):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        assert np.shape(a) == np.shape(e)
        np.testing.assert_allclose(np.asarray(a, np.float64), e, rtol=RTOL, atol=ATOL)


# ---------------------------------------------------------------------------------------------
# Tests.


def case(problem, granularity):
    """theta, a packed client and alpha for one (problem, granularity), the same in every test."""
    shapes = MODEL_SHAPES[problem]
    return (
        random_theta(shapes, 2),
        packed_client(problem, X_DIM[problem], seed=4),
        random_alpha(shapes, granularity, 5),
    )


# The (problem, K, granularity, first_order) cases the tests below read.
META_CASES = (
    [("classification", k, g, False) for k in (1, 3) for g in GRANULARITIES]
    + [("regression", 3, "per_layer", False)]
    + [("classification", 3, g, True) for g in GRANULARITIES]
)


@pytest.fixture(scope="module")
def meta_results(classifier, regressor):
    """meta_gradients outputs for every case of META_CASES, from one graph run once (one graph
    traces the model's functions once and is optimized once: a few times faster than a graph per
    case)."""
    models = {"classification": classifier, "regression": regressor}

    def all_cases():
        outputs = {}
        for problem, num_steps, granularity, first_order in META_CASES:
            model, shapes, non_trainable = models[problem]
            assert shapes == MODEL_SHAPES[problem]
            theta, data, alpha = tf.nest.map_structure(tf.constant, case(problem, granularity))
            outputs[problem, num_steps, granularity, first_order] = library_meta_gradients(
                model,
                theta,
                tf.nest.map_structure(tf.constant, non_trainable),
                data,
                alpha,
                num_steps,
                first_order=first_order,
            )
        return outputs

    results = run_in_graph(all_cases)

    def get(problem, num_steps, granularity, first_order=False):
        return results[problem, num_steps, granularity, first_order]

    return get


@pytest.mark.parametrize("problem", ["classification", "regression"])
def test_reference_gradient_matches_finite_differences(problem):
    """Guards the hand-written backpropagation every other reference relies on."""
    theta, data, _ = case(problem, "scalar")
    part = data["query"]
    fd = central_differences(lambda t: ref_loss(problem, t, part), theta)
    assert max(np.max(np.abs(g)) for g in fd) > 1e-2
    for g, expected in zip(ref_grad(problem, theta, part), fd):
        np.testing.assert_allclose(g, expected, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize(
    "problem, num_steps, granularity",
    [("classification", k, g) for k in (1, 3) for g in GRANULARITIES]
    + [("regression", 3, "per_layer")],
)
def test_exact_meta_gradients_match_finite_differences(
    problem, num_steps, granularity, meta_results
):
    theta, data, alpha = case(problem, granularity)
    grad_theta, grad_alpha, pre_loss, post_loss, post_metric = meta_results(
        problem, num_steps, granularity
    )

    fd_theta = central_differences(
        lambda t: ref_meta_loss(problem, t, alpha, granularity, data, num_steps), theta
    )
    fd_alpha = central_differences(
        lambda a: ref_meta_loss(problem, theta, a, granularity, data, num_steps), alpha
    )
    assert_all_close(grad_theta, fd_theta)
    assert_all_close(grad_alpha, fd_alpha)
    # Not vacuous: the meta-gradients are far from zero.
    assert max(np.max(np.abs(g)) for g in fd_alpha) > 1e-2
    assert max(np.max(np.abs(g)) for g in fd_theta) > 1e-2

    # The losses returned alongside: query loss before and after adaptation, and the metric.
    rates = ref_expand(alpha, granularity, len(theta))
    adapted, _ = ref_adapt(problem, theta, rates, data["support"], num_steps)
    assert post_loss == pytest.approx(ref_loss(problem, adapted, data["query"]), rel=1e-5)
    assert pre_loss == pytest.approx(ref_loss(problem, theta, data["query"]), rel=1e-5)
    assert post_loss != pytest.approx(pre_loss, rel=1e-3)
    if problem == "classification":
        assert post_metric == pytest.approx(ref_accuracy(adapted, data["query"]))
    else:
        assert post_metric == pytest.approx(post_loss, rel=1e-6)  # squared error = MSE loss


def first_order_reference(problem, theta, alpha, granularity, data, num_steps):
    """grad L_q(theta_K) and -sum_k grad L_q(theta_K) * g_k, reduced to alpha's granularity."""
    rates = ref_expand(alpha, granularity, len(theta))
    adapted, batch_grads = ref_adapt(problem, theta, rates, data["support"], num_steps)
    query_grad = ref_grad(problem, adapted, data["query"])
    per_coordinate = [-sum(q * g[i] for g in batch_grads) for i, q in enumerate(query_grad)]
    return query_grad, reduce_to_granularity(per_coordinate, granularity)


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_first_order_meta_gradients_match_the_first_order_formula(granularity, meta_results):
    theta, data, alpha = case("classification", granularity)
    grad_theta, grad_alpha, _, _, _ = meta_results("classification", 3, granularity, True)
    expected_theta, expected_alpha = first_order_reference(
        "classification", theta, alpha, granularity, data, 3
    )
    assert_all_close(grad_theta, expected_theta)
    assert_all_close(grad_alpha, expected_alpha)


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_exact_and_first_order_differ_for_three_steps(granularity, meta_results):
    """Second-order terms are far from negligible here, so the tests above tell modes apart."""
    exact = meta_results("classification", 3, granularity)
    first = meta_results("classification", 3, granularity, True)
    for exact_grads, first_grads in zip(exact[:2], first[:2]):
        gap = max(float(np.max(np.abs(e - f))) for e, f in zip(exact_grads, first_grads))
        scale = max(float(np.max(np.abs(e))) for e in exact_grads)
        assert gap > 10 * (RTOL * scale + ATOL)  # ten times what assert_all_close allows
    # Same forward pass in both modes.
    assert exact[3] == pytest.approx(first[3], rel=1e-6)


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_one_step_exact_alpha_gradient_has_closed_form(granularity, meta_results):
    """theta_1 = theta - alpha * g_0 with g_0 independent of alpha: dL/dalpha = -grad L_q . g_0."""
    theta, data, alpha = case("classification", granularity)
    _, grad_alpha, _, _, _ = meta_results("classification", 1, granularity)
    _, expected = first_order_reference("classification", theta, alpha, granularity, data, 1)
    assert_all_close(grad_alpha, expected)


def library_hvp(model, theta, non_trainable, batch, vector):
    return run_in_graph(
        lambda t, n, b, v: gradients.hessian_vector_product(model, t, n, b, v),
        theta,
        non_trainable,
        batch,
        vector,
    )


def one_batch(part, index):
    return {k: v[index] for k, v in part.items()}


def test_hessian_vector_product_matches_finite_differences_of_gradients(classifier):
    model, shapes, non_trainable = classifier
    theta = random_theta(shapes, 12)
    part = packed_client("classification", 2, seed=13)["support"]
    vector = random_theta(shapes, 14)
    hvp = library_hvp(model, theta, non_trainable, one_batch(part, 1), vector)

    def grad_at(sign):
        shifted = [w.astype(np.float64) + sign * EPS * v for w, v in zip(theta, vector)]
        return ref_grad("classification", shifted, part, 1)

    expected = [(p - m) / (2 * EPS) for p, m in zip(grad_at(1.0), grad_at(-1.0))]
    assert max(np.max(np.abs(e)) for e in expected) > 1e-2
    assert_all_close(hvp, expected)


def test_hessian_vector_product_matches_closed_form_softmax_regression_hessian(
    softmax_regressor,
):
    """Logits z = x W + b: H = mean_i J_i^T (diag p_i - p_i p_i^T) J_i, J_i = [x_i^T kron I, I]."""
    model, shapes, non_trainable = softmax_regressor
    assert shapes == [(2, 3), (3,)]
    theta = random_theta(shapes, 15)
    part = packed_client("classification", 2, seed=16)["support"]
    vector = random_theta(shapes, 17)
    hvp = library_hvp(model, theta, non_trainable, one_batch(part, 1), vector)

    x, _ = real_examples(part, 1)
    assert 0 < len(x) < part["mask"].shape[1]  # the batch is partly padded
    kernel, bias = (w.astype(np.float64) for w in theta)
    num_params = kernel.size + bias.size
    hessian = np.zeros((num_params, num_params))
    for xi in x:
        z = xi @ kernel + bias
        p = np.exp(z - z.max())
        p /= p.sum()
        jac = np.concatenate([np.kron(xi[None, :], np.eye(3)), np.eye(3)], axis=1)
        hessian += jac.T @ (np.diag(p) - np.outer(p, p)) @ jac
    hessian /= len(x)
    expected = hessian @ np.concatenate([v.reshape(-1) for v in vector]).astype(np.float64)
    assert_all_close(hvp, [expected[: kernel.size].reshape(2, 3), expected[kernel.size :]])
