"""Tests of `mfl_tff.algorithms.fedavg.build_fedavg` against TFF's own FedAvg.

The reference is `tff.learning.algorithms.build_weighted_fed_avg` (client SGD at the same rate,
server SGD 1.0, the same FunctionalModel) fed the same clients as `tf.data` datasets: the real
examples of the packed support part, then those of the query part, batch for batch. Clients are
digits clients of different sizes, so packing pads partial batches and whole batches.

Runs are shared: the three-round run of each process is made once per module, and tests whose
point is within one round (local epochs, rejection) run one round.
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_federated as tff

from mfl_tff.algorithms import fedavg
from mfl_tff.data import digits, packing
from tests import testing

LR = 0.1
ROUNDS = 3
# Clients 0, 1, 3, 4 of this partition hold 80, 25, 19 and 37 packed examples (support and query
# both padded, some batches wholly padding).
CLIENT_INDICES = (0, 1, 3, 4)
TOLERANCE = 1e-5

# Measured max |difference| over all weights, printed for the report with `pytest -s`.
MEASURED: dict[str, float] = {}


@pytest.fixture(scope="module", autouse=True)
def execution(tff_local_execution):
    """Every computation of this module runs on a worker we own, stopped afterwards."""
    yield
    for name, value in MEASURED.items():
        print(f"fedavg_test max abs diff {name}: {value:.3g}")


@pytest.fixture(scope="module")
def task():
    return digits.build_digits(num_train_clients=40, num_eval_clients=3)


@pytest.fixture(scope="module")
def clients(task):
    ids = [task.train_data.client_ids[i] for i in CLIENT_INDICES]
    packed = task.train_clients(ids)
    sizes = [packing.num_examples(c) for c in packed]
    assert len(set(sizes)) == len(sizes), sizes  # different sizes...
    assert min(sizes) < 80  # ...and padding
    return packed


def sgd(learning_rate):
    return tff.learning.optimizers.build_sgdm(learning_rate=learning_rate)


@pytest.fixture(scope="module")
def process(task):
    return fedavg.build_fedavg(task.model_fn, task.client_data_type(), client_learning_rate=LR)


@pytest.fixture(scope="module")
def tff_fedavg(task):
    return tff.learning.algorithms.build_weighted_fed_avg(
        task.model_fn(), client_optimizer_fn=sgd(LR), server_optimizer_fn=sgd(1.0)
    )


def weights_by_round(process, client_values, rounds):
    """The trainable weights after each round, and each round's output."""
    state = process.initialize()
    weights, outputs = [], []
    for _ in range(rounds):
        state, (output,) = testing.run_rounds(process, client_values, 1, state)
        weights.append(process.get_model_weights(state).trainable)
        outputs.append(output)
    return weights, outputs


@pytest.fixture(scope="module")
def ours(process, clients):
    """Our FedAvg, three rounds on the clients."""
    return weights_by_round(process, clients, ROUNDS)


@pytest.fixture(scope="module")
def reference(tff_fedavg, clients):
    """TFF's FedAvg, three rounds on the clients."""
    return weights_by_round(tff_fedavg, [testing.as_dataset(c) for c in clients], ROUNDS)[0]


@pytest.fixture(scope="module")
def initial(process):
    return process.get_model_weights(process.initialize()).trainable


def diff(name, a, b) -> float:
    MEASURED[name] = value = testing.max_abs_diff(a, b)
    return value


def test_initial_weights_are_the_model_functions(initial, task):
    expected = task.model_fn().initial_weights[0]
    assert len(initial) == len(expected)
    for w, e in zip(initial, expected):
        np.testing.assert_array_equal(w, e)


def test_three_rounds_equal_tff_weighted_fed_avg(ours, reference, initial, clients):
    weights, outputs = ours
    assert testing.max_abs_diff(weights[-1], initial) > 1e-2  # it did train
    for r in range(ROUNDS):
        assert diff(f"round {r + 1}, 1 epoch", weights[r], reference[r]) <= TOLERANCE
    metrics = outputs[-1].metrics["client_work"]
    assert metrics["num_clients"] == len(clients)
    assert metrics["num_examples"] == sum(packing.num_examples(c) for c in clients)
    assert metrics["num_clients_rejected"] == 0


def test_two_local_epochs_equal_tff_on_repeated_datasets(task, tff_fedavg, reference, clients):
    process = fedavg.build_fedavg(
        task.model_fn, task.client_data_type(), client_learning_rate=LR, local_epochs=2
    )
    (two_epochs,), _ = weights_by_round(process, clients, 1)
    (expected,), _ = weights_by_round(
        tff_fedavg, [testing.as_dataset(c).repeat(2) for c in clients], 1
    )
    assert testing.max_abs_diff(expected, reference[0]) > 1e-3  # the second epoch matters
    assert diff("round 1, 2 epochs", two_epochs, expected) <= TOLERANCE


def all_real_examples(client):
    """A client's real support and query examples together."""
    support, query = (testing.real_examples(client[part]) for part in ("support", "query"))
    return tuple(tf.concat(pair, axis=0) for pair in zip(support, query))


def test_train_loss_metric_is_weighted_mean_of_clients_initial_losses(ours, initial, clients):
    """Round 1 reports the loss of the incoming (initial) model over all of a client's examples,
    averaged over clients by example count."""
    metrics = ours[1][0].metrics["client_work"]
    weights = testing.f64(initial)
    sizes = [packing.num_examples(c) for c in clients]
    losses = [float(testing.mlp_cross_entropy(weights, all_real_examples(c))) for c in clients]
    expected = sum(loss * n for loss, n in zip(losses, sizes)) / sum(sizes)
    np.testing.assert_allclose(metrics["train_loss"], expected, rtol=1e-5)


def with_nan_input(client):
    poisoned = testing.copy_client(client)
    poisoned["support"]["x"][0, 0, 3, 3] = np.nan  # a real example (batches fill front first)
    return poisoned


def test_non_finite_client_is_rejected_not_averaged(process, tff_fedavg, clients):
    poisoned = [clients[0], with_nan_input(clients[1]), clients[2], clients[3]]
    (weights,), (output,) = weights_by_round(process, poisoned, 1)
    others = [clients[0], clients[2], clients[3]]
    (expected,), _ = weights_by_round(tff_fedavg, [testing.as_dataset(c) for c in others], 1)
    assert all(np.all(np.isfinite(w)) for w in weights)
    assert diff("NaN client rejected, 1 round", weights, expected) <= TOLERANCE
    metrics = output.metrics["client_work"]
    assert metrics["num_clients_rejected"] == 1
    assert np.isfinite(metrics["train_loss"])
    assert output.metrics["finalizer"]["update_non_finite"] == 0


@pytest.mark.parametrize(
    "options, error, message",
    [
        pytest.param(dict(client_learning_rate=0.0), ValueError, "client_learning_rate"),
        pytest.param(
            dict(client_learning_rate=float("nan")),
            ValueError,
            "client_learning_rate",
        ),
        (dict(local_epochs=0), ValueError, "local_epochs"),
        (dict(local_epochs=1.5), ValueError, "local_epochs"),
        (dict(server_optimizer=tf.keras.optimizers.SGD()), TypeError, "tff.learning.optimizers"),
        (dict(model_aggregator=tff.aggregators.MeanFactory), TypeError, "Weighted"),
    ],
)
def test_bad_options_raise_actionable_errors(task, options, error, message):
    with pytest.raises(error, match=message):
        fedavg.build_fedavg(task.model_fn, task.client_data_type(), **options)
