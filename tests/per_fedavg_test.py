"""Tests of `mfl_tff.algorithms.per_fedavg.build_per_fedavg` (first-order and Hessian-free).

The reference follows the module docstring's formulas in plain TensorFlow (float64, eager), with
tau = 2 local steps; local step t uses D = support batch t, D' = query batch t, D'' = support
batch t + 1:

    theta_tmp = theta - alpha grad f(theta; D)
    FO:  theta <- theta - beta grad f(theta_tmp; D')
    HF:  theta <- theta - beta (I - alpha H(theta; D'')) grad f(theta_tmp; D')

The Hessian-vector product of the reference is forward-over-reverse
(`tf.autodiff.ForwardAccumulator` over a `GradientTape`), not the library's double backprop. The
model is the digits MLP, written out as dense layers.
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_federated as tff

from mfl_tff.algorithms import per_fedavg
from mfl_tff.data import digits
from tests import testing

ALPHA = 0.05
BETA = 0.1
TAU = 2
SERVER_LR = 0.7
RTOL, ATOL = 1e-4, 1e-6
# Digits clients 0 (80 examples, all batches full) and 4 (37 examples: batches 0 and 1 of support
# and query are real, the rest padding).
CLIENT_INDICES = (0, 4)


pytestmark = pytest.mark.usefixtures("tff_local_execution")


@pytest.fixture(scope="module")
def task():
    return digits.build_digits(num_train_clients=40, num_eval_clients=3)


@pytest.fixture(scope="module")
def clients(task):
    packed = task.train_clients([task.train_data.client_ids[i] for i in CLIENT_INDICES])
    for c in packed:
        assert np.all(c["support"]["mask"][: TAU + 1].sum(axis=1)[:TAU] > 0)
        assert np.all(c["query"]["mask"][:TAU].sum(axis=1) > 0)
    assert np.all(packed[0]["support"]["mask"][TAU] > 0)  # D'' of the last step is real
    return packed


def build(task, variant):
    return per_fedavg.build_per_fedavg(
        task.model_fn,
        task.client_data_type(),
        variant=variant,
        inner_lr=ALPHA,
        outer_lr=BETA,
        local_steps=TAU,
        server_optimizer=tff.learning.optimizers.build_sgdm(learning_rate=SERVER_LR),
    )


@pytest.fixture(scope="module")
def processes(task):
    return {variant: build(task, variant) for variant in ("fo", "hf")}


# ---------------------------------------------------------------------------------------------
# Plain-TensorFlow float64 reference.


loss_of = testing.mlp_cross_entropy


def batch(part, index):
    return testing.real_examples(part, index)


def gradient(weights, data):
    with tf.GradientTape() as tape:
        tape.watch(weights)
        loss = loss_of(weights, data)
    return tape.gradient(loss, weights)


def hessian_vector_product(weights, data, vector):
    with tf.autodiff.ForwardAccumulator(primals=weights, tangents=vector) as accumulator:
        grads = gradient(weights, data)
    return accumulator.jvp(grads)


def per_fedavg_delta(theta, client, variant):
    weights = theta
    for t in range(TAU):
        d = batch(client["support"], t)
        d_prime = batch(client["query"], t)
        tmp = [w - ALPHA * g for w, g in zip(weights, gradient(weights, d))]
        outer = gradient(tmp, d_prime)
        if variant == "hf":
            hvp = hessian_vector_product(weights, batch(client["support"], t + 1), outer)
            outer = [o - ALPHA * h for o, h in zip(outer, hvp)]
        weights = [w - BETA * o for w, o in zip(weights, outer)]
    return [t - w for t, w in zip(theta, weights)]


def num_examples(client) -> int:
    return int(client["support"]["mask"].sum() + client["query"]["mask"].sum())


def flat(values):
    return np.concatenate([np.ravel(np.asarray(v)) for v in values])


def round_result(process, client_values):
    state = process.initialize()
    theta = testing.f64(process.get_model_weights(state).trainable)
    output = process.next(state, client_values)
    return theta, process.get_model_weights(output.state).trainable, output.metrics


@pytest.mark.parametrize("variant", ["fo", "hf"])
def test_one_client_round_follows_the_formulas(processes, clients, variant):
    theta, new, metrics = round_result(processes[variant], clients[:1])
    delta = per_fedavg_delta(theta, clients[0], variant)
    expected = [t - SERVER_LR * d for t, d in zip(theta, delta)]
    np.testing.assert_allclose(flat(new), flat(expected), rtol=RTOL, atol=ATOL)
    assert metrics["client_work"]["num_examples"] == num_examples(clients[0])


def test_hessian_term_matters(clients, processes):
    """FO and HF differ by more than the tolerance, so the HF test can tell them apart."""
    theta, _, _ = round_result(processes["fo"], clients[:1])
    fo = per_fedavg_delta(theta, clients[0], "fo")
    hf = per_fedavg_delta(theta, clients[0], "hf")
    assert np.max(np.abs(flat(fo) - flat(hf))) * SERVER_LR > 100 * ATOL


def test_clients_are_averaged_by_example_count(processes, clients):
    theta, new, metrics = round_result(processes["fo"], clients)
    sizes = [num_examples(c) for c in clients]
    deltas = [per_fedavg_delta(theta, c, "fo") for c in clients]
    mean = [sum(d[i] * n for d, n in zip(deltas, sizes)) / sum(sizes) for i in range(len(theta))]
    expected = [t - SERVER_LR * m for t, m in zip(theta, mean)]
    np.testing.assert_allclose(flat(new), flat(expected), rtol=RTOL, atol=ATOL)
    assert metrics["client_work"]["num_clients"] == 2
    assert metrics["client_work"]["num_examples"] == sum(sizes)


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(variant="so"), r"variant must be one of.*fo.*hf"),
        (dict(inner_lr=0.0), "inner_lr"),
        (dict(outer_lr=float("inf")), "outer_lr"),
        pytest.param(
            dict(local_steps=0),
            "local_steps",
        ),
    ],
)
def test_bad_options_raise_value_errors(task, options, message):
    with pytest.raises(ValueError, match=message):
        per_fedavg.build_per_fedavg(task.model_fn, task.client_data_type(), **options)
