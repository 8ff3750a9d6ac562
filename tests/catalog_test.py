"""Tests of `mfl_tff.algorithms.catalog`, the algorithm registry.

A record registered from user code (FedAvg's client function with another default server rate) is
built by name through `builders.build_algorithm` and run for a round; the reference is FedAvg
written out in float64 (plain SGD on the real examples of each batch, the example-weighted mean of
the deltas, a server SGD step at the record's rate). fedavg_test checks FedAvg against TFF's own.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import tensorflow as tf

from mfl_tff.algorithms import algorithm, builders, catalog, fedavg, fedmeta, mfl
from mfl_tff.data import packing, sinusoid
from tests import testing

EXPECTED = (
    "fedavg",
    "maml",
    "fomaml",
    "meta_sgd",
    "reptile",
    "per_fedavg_fo",
    "per_fedavg_hf",
    "mfl",
    "fedprox",
)
USER_NAME = "fedavg_half_server_step"
CLIENT_LR = 0.05
SERVER_LR = 0.5


def test_every_name_resolves_to_its_record():
    assert catalog.names() == EXPECTED
    assert builders.ALGORITHMS == EXPECTED
    for name in EXPECTED:
        record = catalog.get(name)
        assert isinstance(record, algorithm.Algorithm)
        assert record.name == name
        assert record.paper  # documented
    assert catalog.get("mfl") is mfl.MFL and catalog.get("reptile") is fedmeta.REPTILE


def test_unknown_name_lists_the_choices():
    with pytest.raises(ValueError, match="Unknown algorithm 'fedsgd'") as error:
        catalog.get("fedsgd")
    for name in EXPECTED:
        assert name in str(error.value)


def test_register_refuses_a_duplicate_name_and_a_non_record():
    copy = dataclasses.replace(fedavg.FEDAVG, paper="a copy")
    with pytest.raises(ValueError, match="'fedavg' is registered; pass overwrite=True"):
        catalog.register(copy)
    assert catalog.get("fedavg") is fedavg.FEDAVG  # unchanged
    with pytest.raises(TypeError, match="Algorithm record, got dict"):
        catalog.register({"name": "x"})


def test_register_with_overwrite_replaces_the_record():
    copy = dataclasses.replace(fedavg.FEDAVG, paper="a copy")
    try:
        catalog.register(copy, overwrite=True)
        assert catalog.get("fedavg") is copy
    finally:
        catalog.register(fedavg.FEDAVG, overwrite=True)
    assert catalog.get("fedavg") is fedavg.FEDAVG


@pytest.fixture
def user_record():
    """FedAvg's client function under a new name and a server SGD of rate 0.5 by default."""
    record = algorithm.Algorithm(
        name=USER_NAME,
        paper="a test's own algorithm",
        phases=lambda model, options: (
            algorithm.ClientPhase(
                "",
                fedavg.local_sgd_client_fn(
                    model, learning_rate=options.inner_lr, local_epochs=options.local_epochs
                ),
            ),
        ),
        default_server_optimizer=("sgd", SERVER_LR),
        check=algorithm.check_common,
    )
    catalog.register(record)
    yield record
    # The catalog has no unregister: remove the record so that no other test sees it.
    catalog._RECORDS.pop(USER_NAME)


def reference_round(theta, clients):
    """FedAvg in float64 with client SGD at CLIENT_LR and server SGD at SERVER_LR."""
    deltas, sizes = [], []
    for client in clients:
        weights = theta
        for part in ("support", "query"):
            for batch in testing.real_batches(client[part]):
                if batch is None:
                    continue
                with tf.GradientTape() as tape:
                    tape.watch(weights)
                    loss = testing.mlp_squared_error(weights, batch)
                grads = tape.gradient(loss, weights)
                weights = [w - CLIENT_LR * g for w, g in zip(weights, grads)]
        deltas.append([t - w for t, w in zip(theta, weights)])
        sizes.append(packing.num_examples(client))
    mean = [sum(d[i] * n for d, n in zip(deltas, sizes)) / sum(sizes) for i in range(len(theta))]
    return [t - SERVER_LR * m for t, m in zip(theta, mean)]


def test_a_user_registered_record_builds_by_name_and_runs_with_its_defaults(
    user_record, tff_local_execution
):
    assert USER_NAME in catalog.names()
    task = sinusoid.build_sinusoid(num_train_clients=4, num_eval_clients=2, eval_query_points=10)
    clients = task.train_clients(task.train_data.client_ids[:3])
    process, spec = builders.build_algorithm(
        USER_NAME, task, builders.AlgorithmOptions(inner_lr=CLIENT_LR)
    )
    assert spec.name == USER_NAME and not spec.learns_alpha
    state = process.initialize()
    output = process.next(state, clients)
    initial = process.get_model_weights(state).trainable
    ours = process.get_model_weights(output.state).trainable
    assert testing.max_abs_diff(ours, initial) > 1e-3  # it trained
    assert testing.max_abs_diff(ours, reference_round(testing.f64(initial), clients)) <= 1e-5
    assert output.metrics["client_work"]["num_clients"] == len(clients)
    assert np.isfinite(output.metrics["client_work"]["train_loss"])
