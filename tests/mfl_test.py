"""Tests of `mfl_tff.algorithms.mfl.build_mfl`, the two-phase MFL round.

References share no code with the library:
* TFF's own `tff.learning.algorithms.build_weighted_fed_avg` for the `local` adaptive update with a
  meta learning rate of 0 (MFL then reduces to FedAvg at the rate alpha, which stays frozen);
* a plain-TensorFlow float64 re-implementation of the digits MLP (dense layers written out), of
  K-step SGD on the real examples of each batch (picked by boolean indexing, not masks), and of
  exact meta-gradients by nested `tf.GradientTape`s, run eagerly.

Each process is built once per module (a build costs seconds; a round a fraction of one), and
TFF's reference runs are made once and shared.
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_federated as tff

from mfl_tff.algorithms import builders, mfl
from mfl_tff.data import digits
from tests import testing

LR = 0.1
ROUNDS = 3
TOLERANCE = 1e-5
# Digits clients with 80, 25, 19 and 37 packed examples (padding in support and query).
CLIENT_INDICES = (0, 1, 3, 4)
# For meta-gradient tests with K = 2 inner steps: clients whose first two support batches are real.
META_CLIENT_INDICES = (0, 1, 4)
INNER_STEPS = 2
SERVER_LR = 0.5
HUGE_META_LR = 1e4
MIN_ALPHA = 1e-3
GRANULARITIES = ("scalar", "per_layer", "per_coordinate")


MEASURED: dict[str, float] = {}


def sgd(learning_rate):
    return tff.learning.optimizers.build_sgdm(learning_rate=learning_rate)


@pytest.fixture(scope="module", autouse=True)
def execution(tff_local_execution):
    yield
    for name, value in MEASURED.items():
        print(f"mfl_test max abs diff {name}: {value:.3g}")


@pytest.fixture(scope="module")
def task():
    return digits.build_digits(num_train_clients=40, num_eval_clients=3)


@pytest.fixture(scope="module")
def clients(task):
    return task.train_clients([task.train_data.client_ids[i] for i in CLIENT_INDICES])


@pytest.fixture(scope="module")
def meta_clients(task):
    packed = task.train_clients([task.train_data.client_ids[i] for i in META_CLIENT_INDICES])
    for c in packed:
        assert np.all(c["support"]["mask"][:INNER_STEPS].sum(axis=1) > 0)
    return packed


def build(task, **options):
    return mfl.build_mfl(task.model_fn, task.client_data_type(), **options)


# Four processes, each built once (a build costs seconds, a round a fraction of one). The `local`
# update reduces to FedAvg with scalar alpha (support process) and per-coordinate alpha (local/all
# process); per_layer alpha takes the same path as per-coordinate (one rate tensor per weight
# tensor) and is the meta process's.


@pytest.fixture(scope="module")
def local_all(task):
    """The `local`/`all` process, per-coordinate alpha, meta lr 0 (an optimizer instance)."""
    return build(
        task,
        adaptive_update="local",
        adaptive_data="all",
        alpha_granularity="per_coordinate",
        initial_alpha=LR,
        meta_optimizer=sgd(0.0),
        server_optimizer=sgd(1.0),
    )


@pytest.fixture(scope="module")
def support_process(task):
    """The default `local` update (support data) with scalar alpha and meta_lr=0 by name: the
    default meta optimizer (Adam) at rate 0, and the server's SGD 1.0."""
    process, _ = builders.build_algorithm(
        "mfl",
        task,
        builders.AlgorithmOptions(
            adaptive_update="local",
            alpha_granularity="scalar",
            inner_lr=LR,
            meta_lr=0.0,
            server_optimizer="sgd",
            server_lr=1.0,
        ),
    )
    return process


@pytest.fixture(scope="module")
def projection_process(task):
    return build(
        task,
        adaptive_update="local",
        alpha_granularity="per_coordinate",
        initial_alpha=LR,
        inner_steps=INNER_STEPS,
        min_alpha=MIN_ALPHA,
        meta_optimizer=sgd(HUGE_META_LR),
        server_optimizer=sgd(1.0),
    )


@pytest.fixture(scope="module")
def meta_process(task):
    # The reference below is MAML with alpha alone: the `rates` meta-model, set explicitly since
    # mfl's default is `conditioned` (its own reductions to `rates` are in meta_model_test.py).
    return build(
        task,
        adaptive_update="meta",
        meta_model="rates",
        alpha_granularity="per_layer",
        initial_alpha=LR,
        inner_steps=INNER_STEPS,
        meta_optimizer=sgd(0.0),
        server_optimizer=sgd(SERVER_LR),
    )


@pytest.fixture(scope="module")
def tff_fedavg(task):
    return tff.learning.algorithms.build_weighted_fed_avg(
        task.model_fn(),
        client_optimizer_fn=sgd(LR),
        server_optimizer_fn=sgd(1.0),
    )


@pytest.fixture(scope="module")
def tff_reference(tff_fedavg):
    """`tff_reference(clients, parts, rounds)`: TFF FedAvg's weights, each run made once."""
    runs = {}

    def get(client_values, parts, rounds):
        key = (tuple(id(c) for c in client_values), parts, rounds)
        if key not in runs:
            datasets = [testing.as_dataset(c, parts) for c in client_values]
            state, _ = run(tff_fedavg, datasets, rounds)
            runs[key] = tff_fedavg.get_model_weights(state).trainable
        return runs[key]

    return get


# ---------------------------------------------------------------------------------------------
# Plain-TensorFlow float64 reference (eager; no Keras, no mfl_tff code).


f64 = testing.f64
loss_of = testing.mlp_cross_entropy
batches = testing.real_batches
whole = testing.real_examples


def sgd_step(weights, step_sizes, batch):
    with tf.GradientTape() as tape:
        tape.watch(weights)
        loss = loss_of(weights, batch)
    grads = tape.gradient(loss, weights)
    return [w - a * g for w, a, g in zip(weights, step_sizes, grads)]


def expand(alpha, weights):
    return list(alpha) * len(weights) if len(alpha) == 1 else list(alpha)


def local_delta(weights, step_sizes, client, parts):
    """Plain SGD over the real batches of `parts`, in order; returns (delta, num_examples)."""
    trained, n = weights, 0
    for part in parts:
        for batch in batches(client[part]):
            if batch is not None:
                trained = sgd_step(trained, step_sizes, batch)
                n += int(batch[1].shape[0])
    return [w - t for w, t in zip(weights, trained)], n


def reference_fedavg_round(weights, step_sizes, clients, parts=("support", "query")):
    results = [local_delta(weights, step_sizes, c, parts) for c in clients]
    total = sum(n for _, n in results)
    mean = [sum(d[i] * n for d, n in results) / total for i in range(len(weights))]
    return [w - m for w, m in zip(weights, mean)]


def meta_gradients(theta, alpha, client, steps):
    """Exact d L_query(theta_K) / d (theta, alpha), and the query losses before and after."""
    support = batches(client["support"])
    query = whole(client["query"])
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(theta)
        tape.watch(alpha)
        adapted = theta
        for k in range(steps):
            batch = support[k % len(support)]
            if batch is not None:
                adapted = sgd_step(adapted, expand(alpha, theta), batch)
        post = loss_of(adapted, query)
    grad_theta = tape.gradient(post, theta)
    grad_alpha = tape.gradient(post, alpha)
    return grad_theta, grad_alpha, float(loss_of(theta, query)), float(post)


def weighted_mean(values_and_weights):
    total = sum(w for _, w in values_and_weights)
    n = len(values_and_weights[0][0])
    return [sum(v[i] * w for v, w in values_and_weights) / total for i in range(n)]


def query_size(client) -> int:
    return int(client["query"]["mask"].sum())


max_abs_diff = testing.max_abs_diff
run = testing.run_rounds


# ---------------------------------------------------------------------------------------------
# `local` adaptive update with meta lr 0 is FedAvg.


def test_local_all_data_reduces_to_tff_fedavg(local_all, tff_reference, clients):
    process = local_all
    state, _ = run(process, clients, ROUNDS)
    ours = process.get_model_weights(state).trainable
    initial = process.get_model_weights(process.initialize()).trainable
    assert max_abs_diff(ours, initial) > 1e-2
    diff = max_abs_diff(ours, tff_reference(clients, ("support", "query"), ROUNDS))
    MEASURED["local/all/per_coordinate vs TFF FedAvg, 3 rounds"] = diff
    assert diff <= TOLERANCE
    for a in process.get_hparams(state)["alpha"]:
        np.testing.assert_allclose(a, LR, rtol=1e-7)  # meta lr 0 leaves alpha alone


def test_meta_lr_zero_freezes_alpha_and_local_on_support_is_fedavg_at_rate_alpha(
    support_process, tff_reference, clients
):
    """meta_lr=0 (by name, Adam): alpha stays exactly the initial rate although its
    meta-gradients are not zero; theta then follows FedAvg with client SGD at that rate (the
    initial alpha, LR for every parameter) on the support parts only."""
    state, outputs = run(support_process, clients, ROUNDS)
    for output in outputs:
        assert output.metrics["meta_update"]["meta_gradient_norm"] > 1e-3  # not a vacuous freeze
    for a in support_process.get_hparams(state)["alpha"]:
        np.testing.assert_array_equal(a, np.float32(LR))
    diff = max_abs_diff(
        support_process.get_model_weights(state).trainable,
        tff_reference(clients, ("support",), ROUNDS),
    )
    MEASURED["local/support vs TFF FedAvg on support, 3 rounds"] = diff
    assert diff <= TOLERANCE
    # Training on support only is not training on everything.
    assert (
        max_abs_diff(
            tff_reference(clients, ("support",), ROUNDS),
            tff_reference(clients, ("support", "query"), ROUNDS),
        )
        > 1e-3
    )


@pytest.fixture(scope="module")
def model_shapes(task):
    return [tuple(np.shape(w)) for w in task.model_fn().initial_weights[0]]


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_alpha_shape_follows_granularity(
    support_process, meta_process, local_all, model_shapes, granularity
):
    process = {"scalar": support_process, "per_layer": meta_process}.get(granularity, local_all)
    alpha = process.get_hparams(process.initialize())["alpha"]
    shapes = model_shapes
    expected = {
        "scalar": [()],
        "per_layer": [()] * len(shapes),
        "per_coordinate": shapes,
    }[granularity]
    assert [tuple(np.shape(a)) for a in alpha] == expected


def test_set_hparams_round_trips_and_the_adaptive_update_uses_it(local_all, clients):
    process = local_all
    state = process.initialize()
    rng = np.random.default_rng(7)
    new_alpha = tuple(
        rng.uniform(0.02, 0.2, size=np.shape(a)).astype(np.float32)
        for a in process.get_hparams(state)["alpha"]
    )
    state = process.set_hparams(state, {"alpha": new_alpha})
    for got, want in zip(process.get_hparams(state)["alpha"], new_alpha):
        np.testing.assert_array_equal(got, want)
    theta = process.get_model_weights(state).trainable
    state, _ = run(process, clients, 1, state)
    expected = reference_fedavg_round(f64(theta), f64(new_alpha), clients)
    diff = max_abs_diff(process.get_model_weights(state).trainable, expected)
    MEASURED["set_hparams per-coordinate alpha vs plain-TF SGD, 1 round"] = diff
    assert diff <= TOLERANCE
    for got, want in zip(process.get_hparams(state)["alpha"], new_alpha):
        np.testing.assert_array_equal(got, want)


# ---------------------------------------------------------------------------------------------
# The meta update on alpha: exact meta-gradient, projection onto [min_alpha, inf).


def test_huge_meta_lr_projects_alpha_onto_min_alpha(projection_process, meta_clients):
    process = projection_process
    state = process.initialize()
    theta = f64(process.get_model_weights(state).trainable)
    alpha0 = f64(process.get_hparams(state)["alpha"])
    grads = [
        (meta_gradients(theta, alpha0, c, INNER_STEPS)[1], query_size(c)) for c in meta_clients
    ]
    mean_grad = weighted_mean(grads)
    state, outputs = run(process, meta_clients, 1, state)
    alpha = [np.asarray(a, np.float64) for a in process.get_hparams(state)["alpha"]]
    for got, a0, g in zip(alpha, alpha0, mean_grad):
        want = np.maximum(a0.numpy() - HUGE_META_LR * g.numpy(), MIN_ALPHA)
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3)
    flat = np.concatenate([a.ravel() for a in alpha])
    assert flat.min() == pytest.approx(MIN_ALPHA)  # the projection was active...
    assert flat.max() > 10.0  # ...and the step really was huge
    update = outputs[0].metrics["meta_update"]
    np.testing.assert_allclose(
        update["meta_gradient_norm"],
        np.sqrt(sum(float(tf.reduce_sum(g * g)) for g in mean_grad)),
        rtol=1e-4,
    )
    np.testing.assert_allclose(update["alpha_min"], flat.min(), rtol=1e-6)
    np.testing.assert_allclose(update["alpha_max"], flat.max(), rtol=1e-6)
    np.testing.assert_allclose(update["alpha_mean"], flat.mean(), rtol=1e-4)
    # A second round from these rates (some clients' adaptive updates now diverge and are
    # rejected): alpha stays projected.
    state, outputs = run(process, meta_clients, 1, state)
    assert outputs[0].metrics["meta_client_work"]["num_clients_rejected"] == 0
    flat = np.concatenate([np.ravel(a) for a in process.get_hparams(state)["alpha"]])
    assert np.all(np.isfinite(flat)) and flat.min() == pytest.approx(MIN_ALPHA)
    for w in process.get_model_weights(state).trainable:
        assert np.all(np.isfinite(w))


def test_alpha_stays_at_least_min_alpha_over_rounds_with_huge_meta_lr(
    projection_process, meta_clients
):
    # By round 3 every client diverges and is rejected (see the all-rejected test below).
    state, _ = run(projection_process, meta_clients, 3)
    for a in projection_process.get_hparams(state)["alpha"]:
        assert np.all(np.isfinite(a)) and np.all(a >= MIN_ALPHA)
    for w in projection_process.get_model_weights(state).trainable:
        assert np.all(np.isfinite(w))


# ---------------------------------------------------------------------------------------------
# The `meta` adaptive update: a MAML step on theta with the broadcast alpha.


def test_meta_adaptive_update_is_weighted_exact_maml_gradient(meta_process, meta_clients):
    process = meta_process
    state = process.initialize()
    per_layer = tuple(np.float32(a) for a in (0.05, 0.1, 0.02, 0.08, 0.03, 0.06))
    state = process.set_hparams(state, {"alpha": per_layer})
    theta = f64(process.get_model_weights(state).trainable)
    results = [meta_gradients(theta, f64(per_layer), c, INNER_STEPS) for c in meta_clients]
    sizes = [query_size(c) for c in meta_clients]
    mean_grad = weighted_mean([(r[0], n) for r, n in zip(results, sizes)])
    expected = [t - SERVER_LR * g for t, g in zip(theta, mean_grad)]
    state, outputs = run(process, meta_clients, 1, state)
    ours = process.get_model_weights(state).trainable
    assert max_abs_diff(ours, theta) > 1e-4
    diff = max_abs_diff(ours, expected)
    MEASURED["meta adaptive update vs nested-tape MAML, 1 round"] = diff
    np.testing.assert_allclose(
        np.concatenate([np.ravel(w) for w in ours]),
        np.concatenate([np.ravel(w) for w in expected]),
        rtol=1e-4,
        atol=TOLERANCE,
    )
    # Metrics: query losses before/after adaptation are query-size-weighted means.
    metrics = outputs[0].metrics
    for phase in ("meta_client_work", "adaptive_client_work"):
        work = metrics[phase]
        for key in ("pre_adaptation_loss", "post_adaptation_loss"):
            assert key in work
        pre = sum(r[2] * n for r, n in zip(results, sizes)) / sum(sizes)
        post = sum(r[3] * n for r, n in zip(results, sizes)) / sum(sizes)
        np.testing.assert_allclose(work["pre_adaptation_loss"], pre, rtol=1e-5)
        np.testing.assert_allclose(work["post_adaptation_loss"], post, rtol=1e-5)
        assert work["post_adaptation_loss"] < work["pre_adaptation_loss"]
        assert work["num_clients"] == len(meta_clients)
        assert work["num_examples"] == sum(sizes)
        assert work["num_clients_rejected"] == 0
    for key in ("meta_gradient_norm", "alpha_mean", "alpha_min", "alpha_max"):
        assert np.isfinite(metrics["meta_update"][key])
    np.testing.assert_allclose(metrics["meta_update"]["alpha_min"], 0.02, rtol=1e-6)
    np.testing.assert_allclose(metrics["meta_update"]["alpha_max"], 0.1, rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# Non-finite clients.


def with_nan_input(client):
    poisoned = testing.copy_client(client)
    poisoned["support"]["x"][0, 0, 2, 5] = np.nan
    poisoned["query"]["x"][0, 0, 2, 5] = np.nan
    return poisoned


def test_non_finite_client_is_rejected_not_averaged(local_all, tff_reference, clients):
    process = local_all
    poisoned = [clients[0], clients[1], with_nan_input(clients[2]), clients[3]]
    state, outputs = run(process, poisoned, 2)
    others = [clients[0], clients[1], clients[3]]
    ours = process.get_model_weights(state).trainable
    assert all(np.all(np.isfinite(w)) for w in ours)
    diff = max_abs_diff(ours, tff_reference(others, ("support", "query"), 2))
    MEASURED["NaN client rejected (local/all/per_coordinate), 2 rounds"] = diff
    assert diff <= TOLERANCE
    for output in outputs:
        for phase in ("meta_client_work", "adaptive_client_work"):
            assert output.metrics[phase]["num_clients_rejected"] == 1
        assert np.all(np.isfinite(output.metrics["meta_update"]["meta_gradient_norm"]))
    for a in process.get_hparams(state)["alpha"]:
        np.testing.assert_allclose(a, LR, rtol=1e-7)


def test_round_whose_clients_are_all_rejected_leaves_alpha_and_model_unchanged(
    support_process, clients
):
    state = support_process.initialize()
    state, outputs = run(support_process, [with_nan_input(clients[0])], 1, state)
    assert outputs[0].metrics["meta_client_work"]["num_clients_rejected"] == 1
    for a in support_process.get_hparams(state)["alpha"]:
        np.testing.assert_allclose(a, LR, rtol=1e-7)
    initial = support_process.get_model_weights(support_process.initialize()).trainable
    assert max_abs_diff(support_process.get_model_weights(state).trainable, initial) == 0.0


# ---------------------------------------------------------------------------------------------
# Bad options.


@pytest.mark.parametrize(
    "options, error, message",
    [
        (dict(adaptive_update="fedavg"), ValueError, r"adaptive_update must be one of.*local"),
        (dict(adaptive_data="query"), ValueError, r"adaptive_data must be one of.*support"),
        (dict(alpha_granularity="per_unit"), ValueError, r"per_layer"),
        pytest.param(
            dict(initial_alpha=0.0),
            ValueError,
            "alpha",
        ),
        (dict(min_alpha=-1.0), ValueError, "min_alpha"),
        (dict(inner_steps=0), ValueError, "inner_steps"),
        (dict(local_epochs=0), ValueError, "local_epochs"),
        (dict(meta_optimizer=tf.keras.optimizers.Adam()), TypeError, "tff.learning.optimizers"),
    ],
)
def test_bad_options_raise_actionable_errors(task, options, error, message):
    with pytest.raises(error, match=message):
        build(task, **options)
