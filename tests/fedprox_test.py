"""Tests of `mfl_tff.algorithms.fedprox` against an independent float64 reference.

The reference is FedProx as the paper writes it (Li et al., arXiv 1812.06127): each client runs
SGD on f(w) + mu/2 ||w - w_global||^2 over its real examples, batch by batch (support, then
query), and the server averages the deltas weighted by example counts. It is numpy on the
`synthetic` task's softmax regression, with the closed-form gradient of the mean cross-entropy
X^T (softmax(XW + b) - onehot(y)) / n; it shares no code with the library.

TFF 0.87's own `build_weighted_fed_prox` is not the reference: its client adds
mu * (w_global - w) to the gradient (`proximal_client_work.py`), the opposite sign of the
proximal term's gradient, so it pushes clients away from the global model. A test below pins
that down (TFF equals the reference run with -mu), so that a fix in TFF shows up here.
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow_federated as tff

from mfl_tff.algorithms import builders
from mfl_tff.data import packing, synthetic

LR = 0.05
MU = 0.5
ROUNDS = 2
TOLERANCE = 1e-5


@pytest.fixture(scope="module", autouse=True)
def execution(tff_local_execution):
    yield


@pytest.fixture(scope="module")
def task():
    return synthetic.build_synthetic(num_train_clients=12, num_eval_clients=2, max_examples=60)


@pytest.fixture(scope="module")
def clients(task):
    packed = task.train_clients(task.train_data.client_ids[:4])
    assert len({packing.num_examples(c) for c in packed}) > 1  # clients of different sizes
    return packed


def _real_batches(client):
    """The client's real examples, batch by batch (support, then query), as float64."""
    for part in ("support", "query"):
        for x, y, mask in zip(client[part]["x"], client[part]["y"], client[part]["mask"]):
            keep = mask > 0
            if keep.any():
                yield x[keep].astype(np.float64), y[keep].astype(np.int64)


def _softmax_regression_grad(w, b, x, y):
    logits = x @ w + b
    logits -= logits.max(axis=1, keepdims=True)
    p = np.exp(logits)
    p /= p.sum(axis=1, keepdims=True)
    p[np.arange(len(y)), y] -= 1.0
    return x.T @ p / len(y), p.sum(axis=0) / len(y)


def reference_fedprox(initial, clients, mu, rounds):
    w, b = (np.asarray(a, np.float64) for a in initial)
    for _ in range(rounds):
        deltas, counts = [], []
        for client in clients:
            cw, cb = w.copy(), b.copy()
            n = 0
            for x, y in _real_batches(client):
                gw, gb = _softmax_regression_grad(cw, cb, x, y)
                cw, cb = cw - LR * (gw + mu * (cw - w)), cb - LR * (gb + mu * (cb - b))
                n += len(y)
            deltas.append((w - cw, b - cb))
            counts.append(n)
        total = sum(counts)
        w = w - sum(c * d[0] for c, d in zip(counts, deltas)) / total
        b = b - sum(c * d[1] for c, d in zip(counts, deltas)) / total
    return w, b


def _run(process, values, rounds):
    state = process.initialize()
    for _ in range(rounds):
        state = process.next(state, values).state
    return process.get_model_weights(state).trainable


def _max_diff(a, b):
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in zip(a, b))


@pytest.fixture(scope="module")
def initial(task):
    return tuple(np.asarray(w) for w in task.model_fn().initial_weights[0])


def test_fedprox_equals_the_papers_update(task, clients, initial):
    process, _ = builders.build_algorithm(
        "fedprox", task, builders.AlgorithmOptions(inner_lr=LR, proximal_strength=MU)
    )
    ours = _run(process, clients, ROUNDS)
    reference = reference_fedprox(initial, clients, MU, ROUNDS)
    without_prox = reference_fedprox(initial, clients, 0.0, ROUNDS)
    assert _max_diff(reference, without_prox) > 1e-3  # the proximal term matters here
    assert _max_diff(ours, reference) <= TOLERANCE
    # The proximal term holds the model closer to where the round started than FedAvg does.
    assert _max_diff(ours, initial) < _max_diff(without_prox, initial)


def test_tff_fed_prox_0_87_uses_the_opposite_sign(task, clients, initial):
    datasets = [
        packing.to_dataset(c["support"]).concatenate(packing.to_dataset(c["query"]))
        for c in clients
    ]
    tff_process = tff.learning.algorithms.build_weighted_fed_prox(
        task.model_fn(),
        proximal_strength=MU,
        client_optimizer_fn=tff.learning.optimizers.build_sgdm(learning_rate=LR),
        server_optimizer_fn=tff.learning.optimizers.build_sgdm(learning_rate=1.0),
    )
    theirs = _run(tff_process, datasets, ROUNDS)
    assert _max_diff(theirs, reference_fedprox(initial, clients, -MU, ROUNDS)) <= TOLERANCE
    assert _max_diff(theirs, reference_fedprox(initial, clients, MU, ROUNDS)) > 1e-3


def test_proximal_strength_must_be_positive(task):
    with pytest.raises(ValueError, match="proximal_strength"):
        builders.build_algorithm("fedprox", task, builders.AlgorithmOptions(proximal_strength=0.0))
