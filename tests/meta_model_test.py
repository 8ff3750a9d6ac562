"""Tests of `mfl_tff.meta.meta_model`: the inner loop's meta-model and client optimizer.

The reference is float64 numpy written from the formulas in meta_model.py's docstring and shares
no code with the library: a 1 -> 4 -> 1 tanh MLP with hand-written backpropagation (itself
checked against finite differences), the masked MSE loss as a mean over the real examples picked
by boolean indexing, the support batches cycled over the non-empty ones, the multipliers
m = exp(3 tanh(o / 3)) of `per_step` and `conditioned`, heavy-ball momentum with
beta = sigmoid(logit), global-norm clipping, and the post-adaptation query loss.

`conditioned` stops the gradient through its features. The reference reproduces that by freezing
them: it runs once at the base point, records the features f_k of every step, and its perturbed
evaluations reuse the recorded f_k; the derivative of that function is the stop-gradient one.

The library runs in float32 in a plain `tf.Graph` + `tf.compat.v1.Session` (no TFF worker).
Finite differences are central with EPS = 1e-6 on the float64 reference: truncation ~EPS^2 and
round-off ~1e-16 / EPS = 1e-10, far below the float32 error of the code under test (~1e-7 per
operation, a few hundred operations deep; observed <= 2e-5 of the group's largest gradient).
Each parameter group (each alpha tensor, the logits, each network tensor, the momentum logits)
is compared as a whole: max |library - reference| <= RTOL * max(FLOOR, max |reference|), with
RTOL = 2e-4 and FLOOR = 1e-2 (a group whose gradient is tiny is held to an absolute 2e-6),
against groups of gradients of order 1e-2..4. Every coordinate is checked, and every group that
a step uses is checked to be clearly non-zero, so no comparison passes trivially.

`conditioned`'s norm features read the support gradient BEFORE clipping (the module docstring);
the clipped case checks that (a reference reading the clipped norms fails it).

Also checked: exact reductions (a zero output layer, or beta = 0, give bit-for-bit the plain
rates), the closed form of one clipped step, and the initial meta-parameters.
"""

from __future__ import annotations

import collections
from typing import NamedTuple, Optional

import numpy as np
import pytest
import tensorflow as tf

from mfl_tff.meta import gradients, hparams, meta_model
from mfl_tff.models import functional
from mfl_tff.training import runtime

EPS = 1e-6
RTOL = 2e-4
FLOOR = 1e-2
HIDDEN = 4
SHAPES = [(1, HIDDEN), (HIDDEN,), (HIDDEN, 1), (1,)]
NUM_TENSORS = len(SHAPES)
# Margin kept from the kinks the finite differences must not straddle (ReLU, clipping).
KINK_MARGIN = 1e-3


@pytest.fixture(scope="module", autouse=True)
def no_worker_left():
    """These tests run graphs in a Session (and eagerly); they must start no `worker_binary`."""
    before = set(runtime.live_worker_pids())
    yield
    assert set(runtime.live_worker_pids()) <= before


# ---------------------------------------------------------------------------------------------
# The model, a client and meta-parameters.


def tanh_mlp():
    """The library's model: Dense(4, tanh) -> Dense(1), the reference's architecture."""
    return tf.keras.Sequential(
        [
            tf.keras.layers.InputLayer(input_shape=(1,)),
            tf.keras.layers.Dense(HIDDEN, activation="tanh"),
            tf.keras.layers.Dense(1),
        ]
    )


@pytest.fixture(scope="module")
def model():
    fm = functional.functional_model(tanh_mlp, x_shape=(1,), problem="regression", seed=3)
    trainable, non_trainable = functional.initial_weights(fm)
    assert [w.shape for w in trainable] == SHAPES and non_trainable == ()
    return fm


def random_theta(seed=2):
    """Weights large enough for a clearly non-quadratic loss."""
    rng = np.random.default_rng(seed)
    return tuple(rng.normal(scale=0.8, size=s).astype(np.float32) for s in SHAPES)


def random_part(rng, num_batches, batch_size, num_real):
    """A packed part; padding holds random (valid) examples, so a leak would show."""
    x = rng.normal(size=(num_batches, batch_size, 1)).astype(np.float32)
    y = (np.sin(2.0 * x) + 0.3 * rng.normal(size=x.shape)).astype(np.float32)
    mask = np.zeros((num_batches, batch_size), np.float32)
    for b, n in enumerate(num_real):
        mask[b, :n] = 1.0
    return {"x": x, "y": y, "mask": mask}


def packed_client(seed=4):
    """Support: 3 batches of 4 with 4, 2 and 0 real examples (steps cycle over the first two);
    query: 2 batches of 4 with 4 and 2 real examples."""
    rng = np.random.default_rng(seed)
    return {
        "support": random_part(rng, 3, 4, (4, 2, 0)),
        "query": random_part(rng, 2, 4, (4, 2)),
    }


def meta_names(meta):
    """(name, value) of every tensor of the meta-parameters, in a fixed order."""
    if not isinstance(meta, collections.abc.Mapping):
        return [(f"alpha{i}", a) for i, a in enumerate(meta)]
    items = [(f"alpha{i}", a) for i, a in enumerate(meta["alpha"])]
    extra = meta["meta_model"]
    if "step_logits" in extra:
        items.append(("step_logits", extra["step_logits"]))
    if "network" in extra:
        items += list(zip(("w1", "b1", "w2", "b2"), extra["network"]))
    if "momentum_logits" in extra:
        items.append(("momentum_logits", extra["momentum_logits"]))
    return items


def with_values(meta, values):
    """`meta`'s structure (as `initial_meta` builds it) holding `values` ({name: array})."""
    alpha = tuple(values[f"alpha{i}"] for i in range(len(meta_model.alpha_of(meta))))
    if not isinstance(meta, collections.abc.Mapping):
        return alpha
    extra = collections.OrderedDict()
    for key in meta["meta_model"]:
        if key == "network":
            extra[key] = tuple(values[n] for n in ("w1", "b1", "w2", "b2"))
        else:
            extra[key] = values[key]
    return collections.OrderedDict(alpha=alpha, meta_model=extra)


def random_values(meta, seed):
    """Random float32 values for every meta-tensor; the output layer is small but non-zero."""
    rng = np.random.default_rng(seed)
    draw = {
        "step_logits": lambda s: rng.normal(scale=0.5, size=s),
        "w1": lambda s: rng.uniform(-0.6, 0.6, size=s),
        "b1": lambda s: rng.normal(0.2, 0.5, size=s),
        "w2": lambda s: rng.normal(scale=0.3, size=s),
        "b2": lambda s: rng.normal(scale=0.2, size=s),
        "momentum_logits": lambda s: rng.normal(scale=1.0, size=s),
    }
    values = {}
    for name, value in meta_names(meta):
        shape = np.shape(value)
        if name.startswith("alpha"):
            values[name] = rng.uniform(0.08, 0.2, size=shape)
        else:
            values[name] = draw[name](shape)
        values[name] = np.asarray(values[name], np.float32)
    return values


# ---------------------------------------------------------------------------------------------
# Independent float64 reference.


def mlp_loss_and_grad(theta, x, y):
    """Mean squared error of the tanh MLP on (x, y) and its gradient w.r.t. theta."""
    w1, b1, w2, b2 = theta
    h = np.tanh(x @ w1 + b1)
    diff = h @ w2 + b2 - y
    loss = np.mean(diff**2)
    d_out = 2.0 * diff / diff.size
    d_z = (d_out @ w2.T) * (1.0 - h**2)
    return loss, [x.T @ d_z, d_z.sum(axis=0), h.T @ d_out, d_out.sum(axis=0)]


def real_examples(part, batch=None):
    """Real examples (float64) of one batch of a packed part, or of all of it."""
    sl = slice(None) if batch is None else slice(batch, batch + 1)
    keep = part["mask"][sl].reshape(-1) > 0
    x = part["x"][sl].reshape(-1, 1)[keep].astype(np.float64)
    y = part["y"][sl].reshape(-1, 1)[keep].astype(np.float64)
    return x, y


def support_batches(support):
    """The support batches the inner steps use in turn: the non-empty ones."""
    return [
        real_examples(support, b) for b in range(len(support["mask"])) if support["mask"][b].any()
    ]


def squash(o):
    return np.exp(3.0 * np.tanh(o / 3.0))


def sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def global_norm(tensors):
    return np.sqrt(sum(np.sum(np.square(t)) for t in tensors))


class Case(NamedTuple):
    """One inner loop: the meta-model, the client optimizer, K (of the meta-model), the steps
    actually taken, alpha's granularity and the inner clip norm."""

    meta_model: str
    client_optimizer: str
    loop_steps: int
    steps: int
    granularity: str
    clip_norm: Optional[float] = None

    @property
    def loop(self):
        return meta_model.InnerLoop(
            meta_model=self.meta_model,
            client_optimizer=self.client_optimizer,
            num_steps=self.loop_steps,
            clip_norm=self.clip_norm,
        )


def ref_inner_loop(case, theta, values, data, frozen=None, trace=None):
    """Query loss after `case.steps` inner steps from `theta`, with meta-parameters `values`.

    With `frozen` (a list of feature vectors), `conditioned` reads those instead of computing
    its features. With `trace` (a dict), records the features, the hidden pre-activations and the
    support gradient norms of every step.
    """
    theta = [np.asarray(w, np.float64) for w in theta]
    v = {k: np.asarray(a, np.float64) for k, a in values.items()}
    alpha = [v[f"alpha{i}"] for i in range(NUM_TENSORS) if f"alpha{i}" in v]
    if len(alpha) == 1:
        alpha = alpha * NUM_TENSORS
    batches = support_batches(data["support"])
    velocity = None
    for k in range(case.steps):
        loss, g = mlp_loss_and_grad(theta, *batches[k % len(batches)])
        norm = global_norm(g)
        # The norm features read the gradient before clipping.
        features = np.log(np.array([loss] + [np.linalg.norm(gi) for gi in g]) + 1e-12)
        if case.clip_norm is not None:
            g = [gi * case.clip_norm / max(norm, case.clip_norm) for gi in g]
        if trace is not None:
            trace.setdefault("features", []).append(features)
            trace.setdefault("norms", []).append(norm)
        if frozen is not None:
            features = frozen[k]
        row = min(k, case.loop_steps - 1)
        if case.meta_model == "per_step":
            m = squash(v["step_logits"][row])
        elif case.meta_model == "conditioned":
            pre = features @ v["w1"] + v["b1"]
            if trace is not None:
                trace.setdefault("pre_activations", []).append(pre)
            o = np.maximum(pre, 0.0) @ v["w2"] + v["b2"]
            m = squash(o[row * NUM_TENSORS : (row + 1) * NUM_TENSORS])
        else:
            m = np.ones(NUM_TENSORS)
        if case.client_optimizer == "momentum":
            beta = sigmoid(v["momentum_logits"])
            if velocity is None:
                velocity = g
            else:
                velocity = [beta[i] * vi + gi for i, (vi, gi) in enumerate(zip(velocity, g))]
            direction = velocity
        else:
            direction = g
        theta = [w - alpha[i] * m[i] * d for i, (w, d) in enumerate(zip(theta, direction))]
    return mlp_loss_and_grad(theta, *real_examples(data["query"]))[0]


def central_differences(f, values):
    """d f / d values[name][j] by central differences, for every coordinate of every array."""
    base = {k: np.array(a, np.float64) for k, a in values.items()}
    result = {}
    for name, array in base.items():
        grad = np.zeros(array.shape)
        for j in np.ndindex(array.shape):
            plus = dict(base, **{name: array.copy()})
            minus = dict(base, **{name: array.copy()})
            plus[name][j] += EPS
            minus[name][j] -= EPS
            grad[j] = (f(plus) - f(minus)) / (2 * EPS)
        result[name] = grad
    return result


def reference_meta_gradients(case, theta, values, data):
    """Finite-difference meta-gradients of the reference (features frozen at the base point),
    the reference's query loss, and its trace at the base point."""
    trace = {}
    loss = ref_inner_loop(case, theta, values, data, trace=trace)
    frozen = trace["features"]

    def f(vals):
        return ref_inner_loop(case, theta, vals, data, frozen=frozen)

    return central_differences(f, values), loss, trace


# ---------------------------------------------------------------------------------------------
# The code under test, run in a graph.


def run_in_graph(fn):
    """`fn()` built in a fresh graph and run once; numpy out. Grappler is off (it only rewrites
    a graph into an equivalent one, and takes most of the time on second-order graphs)."""
    config = tf.compat.v1.ConfigProto()
    config.graph_options.rewrite_options.disable_meta_optimizer = True
    with tf.Graph().as_default() as graph:
        outputs = fn()
        with tf.compat.v1.Session(graph=graph, config=config) as session:
            return session.run(outputs)


def constants(structure):
    return tf.nest.map_structure(tf.constant, structure)


def library_meta_gradients(fm, case, meta, theta, data):
    """(grad of every meta-tensor by name, post-adaptation query loss) from the library."""
    _, grad_meta, _, post_loss, _ = gradients.meta_gradients(
        fm,
        (constants(theta), ()),
        constants(data),
        constants(meta),
        case.steps,
        wrt="alpha",
        loop=case.loop,
    )
    return dict(meta_names(grad_meta)), post_loss


# The finite-difference cases: (meta-model, optimizer, K, steps taken, granularity, clip norm).
FD_CASES = {
    "conditioned_k1": Case("conditioned", "sgd", 1, 1, "per_layer"),
    "conditioned_k3": Case("conditioned", "sgd", 3, 3, "per_coordinate"),
    "per_step_k1_momentum": Case("per_step", "momentum", 1, 1, "per_layer"),
    "per_step_k3": Case("per_step", "sgd", 3, 3, "per_coordinate"),
    # Steps past the meta-model's K reuse its last row.
    "per_step_k2_of_4_momentum": Case("per_step", "momentum", 2, 4, "per_layer"),
    "rates_k3_momentum": Case("rates", "momentum", 3, 3, "per_layer"),
    "conditioned_k3_momentum_clip": Case("conditioned", "momentum", 3, 3, "scalar", 0.3),
}
FD_PARAMS = list(FD_CASES)


def fd_seed(name):
    """The seed of a case's meta-parameters."""
    return 10 + list(FD_CASES).index(name)


def fd_meta(case, seed):
    template = meta_model.initial_meta(case.loop, SHAPES, case.granularity, 0.1)
    values = random_values(template, seed)
    return with_values(template, values), values


@pytest.fixture(scope="module")
def library_results(model):
    """Every library output the tests read, from one graph run once."""
    theta, data = random_theta(), packed_client()

    def build():
        out = {"fd": {}}
        for name, case in FD_CASES.items():
            meta, _ = fd_meta(case, fd_seed(name))
            out["fd"][name] = library_meta_gradients(model, case, meta, theta, data)
        out["reductions"] = reductions(model, theta, data)
        out["clip"] = clipped_steps(model, theta, data)
        return out

    return run_in_graph(build)


# ---------------------------------------------------------------------------------------------
# 1. Meta-gradients against finite differences.


def test_reference_backprop_matches_finite_differences():
    """Guards the hand-written backpropagation the reference's inner steps use."""
    theta = [np.asarray(w, np.float64) for w in random_theta()]
    x, y = real_examples(packed_client()["support"])
    _, grads = mlp_loss_and_grad(theta, x, y)
    for i, g in enumerate(grads):
        fd = np.zeros(g.shape)
        for j in np.ndindex(g.shape):
            plus = [w.copy() for w in theta]
            minus = [w.copy() for w in theta]
            plus[i][j] += EPS
            minus[i][j] -= EPS
            fd[j] = (mlp_loss_and_grad(plus, x, y)[0] - mlp_loss_and_grad(minus, x, y)[0]) / (
                2 * EPS
            )
        np.testing.assert_allclose(g, fd, rtol=1e-6, atol=1e-9)
        assert np.max(np.abs(g)) > 1e-2


def assert_group_close(name, actual, expected):
    actual = np.asarray(actual, np.float64)
    assert actual.shape == expected.shape, name
    scale = max(FLOOR, np.max(np.abs(expected)))
    error = np.max(np.abs(actual - expected))
    assert error <= RTOL * scale, (
        f"{name}: max |library - reference| = {error:.3g} > {RTOL * scale:.3g}\n"
        f"library   {actual.ravel()}\nreference {expected.ravel()}"
    )


@pytest.mark.parametrize("name", FD_PARAMS)
def test_meta_gradients_match_finite_differences(name, library_results):
    case = FD_CASES[name]
    theta, data = random_theta(), packed_client()
    _, values = fd_meta(case, fd_seed(name))
    expected, ref_loss, trace = reference_meta_gradients(case, theta, values, data)
    grads, post_loss = library_results["fd"][name]

    # The finite differences straddle no kink: of the network's ReLUs, or of the clipping.
    for pre in trace.get("pre_activations", []):
        assert np.min(np.abs(pre)) > KINK_MARGIN
    if case.clip_norm is not None:
        norms = np.array(trace["norms"])
        assert np.min(np.abs(norms - case.clip_norm)) > KINK_MARGIN
        assert norms[0] > case.clip_norm  # The clipping is active.

    assert post_loss == pytest.approx(ref_loss, rel=1e-5)
    assert set(grads) == set(expected)
    for key in expected:
        assert_group_close(key, grads[key], expected[key])

    # Not vacuous: every meta-parameter group a step uses has a clearly non-zero gradient.
    for key, grad in expected.items():
        if key == "momentum_logits" and case.steps == 1:
            assert np.all(grad == 0.0) and np.all(grads[key] == 0.0)
        else:
            assert np.max(np.abs(grad)) > 1e-3, key


# ---------------------------------------------------------------------------------------------
# 2. Exact reductions to the plain rates.


def reductions(fm, theta, data):
    """Library outputs of meta-models that reduce exactly to `rates`, and of plain `rates`."""
    rates_loop = meta_model.InnerLoop(num_steps=3)
    alpha = random_values(meta_model.initial_meta(rates_loop, SHAPES, "per_layer", 0.1), 20)
    plain = tuple(alpha[f"alpha{i}"] for i in range(NUM_TENSORS))

    zero_output = meta_model.InnerLoop(meta_model="conditioned", num_steps=3)
    template = meta_model.initial_meta(zero_output, SHAPES, "per_layer", 0.1)
    values = dict(random_values(template, 21), **alpha)
    values["w2"] = np.zeros_like(values["w2"])
    values["b2"] = np.zeros_like(values["b2"])
    conditioned = with_values(template, values)

    no_momentum = meta_model.InnerLoop(client_optimizer="momentum", num_steps=3)
    template = meta_model.initial_meta(no_momentum, SHAPES, "per_layer", 0.1)
    values = dict(alpha, momentum_logits=np.full([NUM_TENSORS], -1e4, np.float32))
    momentum_zero = with_values(template, values)

    one_step = meta_model.InnerLoop(client_optimizer="momentum", num_steps=1)
    momentum_k1 = with_values(
        meta_model.initial_meta(one_step, SHAPES, "per_layer", 0.1), dict(values)
    )
    momentum_k1["meta_model"]["momentum_logits"] = np.array([0.5, -0.3, 1.0, 0.0], np.float32)

    trainable, support = constants(theta), constants(data["support"])
    out = {}
    for name, loop, meta in (
        ("rates", rates_loop, plain),
        ("conditioned", zero_output, conditioned),
        ("momentum", no_momentum, momentum_zero),
        ("momentum_k1", one_step, momentum_k1),
    ):
        adapted, effective = meta_model.adapt(
            fm, trainable, (), support, constants(meta), loop, loop.num_steps
        )
        _, grad, _, post_loss, _ = gradients.meta_gradients(
            fm,
            (trainable, ()),
            constants(data),
            constants(meta),
            loop.num_steps,
            wrt="alpha",
            loop=loop,
        )
        out[name] = {
            "adapted": adapted,
            "effective": effective,
            "grad": dict(meta_names(grad)),
            "post_loss": post_loss,
        }
    return out


@pytest.mark.parametrize("name", ["conditioned", "momentum"])
def test_reduces_exactly_to_rates(name, library_results):
    """A zero output layer (m = 1) or beta = 0 gives the plain rates' steps and alpha gradients,
    bit for bit."""
    results = library_results["reductions"]
    rates, other = results["rates"], results[name]
    for a, b in zip(rates["adapted"], other["adapted"]):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(rates["effective"], other["effective"])
    assert rates["post_loss"] == other["post_loss"]
    for i in range(NUM_TENSORS):
        np.testing.assert_array_equal(rates["grad"][f"alpha{i}"], other["grad"][f"alpha{i}"])
    # Not vacuous: the steps moved theta and the alpha gradients are far from zero.
    assert np.max(np.abs(rates["adapted"][0] - random_theta()[0])) > 1e-3
    assert max(abs(rates["grad"][f"alpha{i}"]) for i in range(NUM_TENSORS)) > 1e-2


def test_one_step_gives_momentum_a_zero_gradient(library_results):
    grad = library_results["reductions"]["momentum_k1"]["grad"]
    assert grad["momentum_logits"] is not None
    np.testing.assert_array_equal(grad["momentum_logits"], np.zeros(NUM_TENSORS))
    assert max(abs(grad[f"alpha{i}"]) for i in range(NUM_TENSORS)) > 1e-2


def test_exact_reductions_match_the_reference(library_results):
    """The plain rates themselves agree with the float64 reference (K = 3, per_layer)."""
    rates = library_results["reductions"]["rates"]
    alpha = random_values(
        meta_model.initial_meta(meta_model.InnerLoop(), SHAPES, "per_layer", 1), 20
    )
    case = Case("rates", "sgd", 3, 3, "per_layer")
    expected, ref_loss, _ = reference_meta_gradients(case, random_theta(), alpha, packed_client())
    assert rates["post_loss"] == pytest.approx(ref_loss, rel=1e-5)
    for key in expected:
        assert_group_close(key, rates["grad"][key], expected[key])


# ---------------------------------------------------------------------------------------------
# 3. Clipping.

CLIP_ALPHA = np.float32(0.25)


def clip_norms(theta, data):
    """The inner clip norms of the clipping tests: half the first gradient's norm, and None."""
    norm = global_norm(first_support_gradient(theta, data))
    return {"clipped": float(0.5 * norm), "unclipped": None}


def clipped_steps(fm, theta, data):
    """One inner step with a scalar alpha, clipped to half the gradient norm and unclipped."""
    out = {}
    for name, clip in clip_norms(theta, data).items():
        loop = meta_model.InnerLoop(clip_norm=clip)
        adapted, effective = meta_model.adapt(
            fm,
            constants(theta),
            (),
            constants(data["support"]),
            (tf.constant(CLIP_ALPHA),),
            loop,
            1,
        )
        out[name] = {"adapted": adapted, "effective": effective}
    return out


def first_support_gradient(theta, data):
    x, y = support_batches(data["support"])[0]
    return mlp_loss_and_grad([np.asarray(w, np.float64) for w in theta], x, y)[1]


@pytest.mark.parametrize("name", ["clipped", "unclipped"])
def test_one_step_moves_by_alpha_times_the_clipped_norm(name, library_results):
    theta, data = random_theta(), packed_client()
    g = first_support_gradient(theta, data)
    norm = global_norm(g)
    result = library_results["clip"][name]
    clip = clip_norms(theta, data)[name]
    assert clip is None or clip < 0.9 * norm
    expected_norm = CLIP_ALPHA * (clip if clip is not None else norm)
    moves = [np.asarray(a, np.float64) - w for a, w in zip(result["adapted"], theta)]
    assert global_norm(moves) == pytest.approx(expected_norm, rel=1e-5)
    # The direction is the gradient's: theta_1 = theta_0 - alpha * (norm or clip) * g / ||g||.
    for move, gi in zip(moves, g):
        np.testing.assert_allclose(move, -expected_norm * gi / norm, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(result["effective"], np.full([1, NUM_TENSORS], CLIP_ALPHA))


# ---------------------------------------------------------------------------------------------
# 4. The initial meta-parameters.


def test_initial_conditioned_network_gives_multipliers_of_one():
    loop = meta_model.InnerLoop(meta_model="conditioned", num_steps=3)
    meta = meta_model.initial_meta(loop, SHAPES, "per_coordinate", 0.05)
    w1, b1, w2, b2 = meta["meta_model"]["network"]
    assert w1.shape == (1 + NUM_TENSORS, meta_model.HIDDEN_UNITS) and np.any(w1 != 0)
    assert b1.shape == (meta_model.HIDDEN_UNITS,)
    assert w2.shape == (meta_model.HIDDEN_UNITS, 3 * NUM_TENSORS) and not np.any(w2)
    assert b2.shape == (3 * NUM_TENSORS,) and not np.any(b2)
    assert all(a.dtype == np.float32 for _, a in meta_names(meta))
    grads = [tf.constant(w) for w in random_theta(5)]
    for step in range(5):  # Past K too.
        m = meta_model.multipliers(meta, loop, step, tf.constant(0.7), grads)
        np.testing.assert_array_equal(m.numpy(), np.ones(NUM_TENSORS, np.float32))
    for a, shape in zip(meta["alpha"], SHAPES):
        np.testing.assert_array_equal(a, np.full(shape, 0.05, np.float32))


def test_initial_per_step_logits_give_multipliers_of_one():
    loop = meta_model.InnerLoop(meta_model="per_step", num_steps=2)
    meta = meta_model.initial_meta(loop, SHAPES, "scalar", 0.05)
    assert meta["meta_model"]["step_logits"].shape == (2, NUM_TENSORS)
    m = meta_model.multipliers(meta, loop, 0, None, None)
    np.testing.assert_array_equal(m.numpy(), np.ones(NUM_TENSORS, np.float32))


def test_initial_momentum_is_the_documented_value():
    loop = meta_model.InnerLoop(client_optimizer="momentum", num_steps=2)
    meta = meta_model.initial_meta(loop, SHAPES, "per_layer", 0.05)
    logits = meta["meta_model"]["momentum_logits"]
    assert logits.shape == (NUM_TENSORS,) and logits.dtype == np.float32
    np.testing.assert_allclose(sigmoid(logits.astype(np.float64)), 0.1, rtol=1e-6)
    assert meta_model.INITIAL_MOMENTUM == 0.1
    np.testing.assert_allclose(meta_model.momentum(meta).numpy(), 0.1, rtol=1e-6)
    assert set(meta["meta_model"]) == {"momentum_logits"}


def test_rates_with_sgd_keep_alphas_plain_tuple():
    loop = meta_model.InnerLoop()
    assert not loop.structured
    for granularity in hparams.GRANULARITIES:
        meta = meta_model.initial_meta(loop, SHAPES, granularity, 0.05)
        assert isinstance(meta, tuple)
        expected = hparams.initial_alpha(SHAPES, granularity, 0.05)
        assert len(meta) == len(expected)
        for a, e in zip(meta, expected):
            np.testing.assert_array_equal(a, e)
    assert meta_model.momentum(meta) is None


@pytest.mark.parametrize(
    "kwargs, choices",
    [
        ({"meta_model": "maml"}, meta_model.META_MODELS),
        ({"client_optimizer": "adam"}, meta_model.CLIENT_OPTIMIZERS),
    ],
)
def test_unknown_names_raise_naming_the_choices(kwargs, choices):
    assert set(meta_model.META_MODELS) == {"rates", "per_step", "conditioned"}
    assert set(meta_model.CLIENT_OPTIMIZERS) == {"sgd", "momentum"}
    with pytest.raises(ValueError) as error:
        meta_model.InnerLoop(**kwargs)
    message = str(error.value)
    assert all(choice in message for choice in choices)
    assert next(iter(kwargs.values())) in message
