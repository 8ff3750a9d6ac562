"""Tests of `mfl_tff.data.registry`: built-in tasks by name, options, and user-registered tasks."""

from __future__ import annotations

import collections
import sys

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_federated as tff

import mfl_tff.data as data_package
from mfl_tff.data import registry
from mfl_tff.data.task import FederatedTask

BUILTINS = ("digits", "digits_fewshot", "emnist", "sinusoid", "synthetic")


@pytest.fixture
def clean_registry(monkeypatch):
    """Lets a test register tasks; the registry is restored to the built-ins afterwards."""
    registry.task_names()  # loads the built-ins
    monkeypatch.setattr(registry, "_BUILDERS", dict(registry._BUILDERS))


@pytest.fixture
def fresh_registry(monkeypatch):
    """The registry as a new process sees it: nothing registered, built-ins not imported yet."""
    monkeypatch.setattr(registry, "_BUILDERS", {})
    monkeypatch.delitem(sys.modules, "mfl_tff.data.builtin_tasks", raising=False)
    monkeypatch.delattr(data_package, "builtin_tasks", raising=False)


def test_task_names_lists_the_builtins_sorted():
    names = registry.task_names()
    assert set(BUILTINS) <= set(names)
    assert names == sorted(names)


def test_unknown_task_raises_value_error_naming_the_choices():
    with pytest.raises(ValueError, match="nonexistent") as error:
        registry.get_task("nonexistent")
    for name in BUILTINS:
        assert name in str(error.value)


def test_unknown_option_raises_type_error_naming_it():
    with pytest.raises(TypeError, match="bogus_option"):
        registry.get_task("sinusoid", bogus_option=1)


def test_ignore_unknown_options_drops_them_and_keeps_the_known_ones():
    task = registry.get_task(
        "sinusoid", ignore_unknown_options=True, bogus_option=1, shots=3, num_train_clients=4
    )
    assert task.name == "sinusoid"
    assert len(task.train_data.client_ids) == 4
    (packed,) = task.train_clients(task.train_data.client_ids[:1])
    assert packed["support"]["mask"].sum() == 3


def test_task_options_are_the_builders_keywords():
    options = registry.task_options("digits")
    assert {"num_train_clients", "shots", "seed", "dirichlet_concentration"} <= set(options)
    with pytest.raises(ValueError):
        registry.task_options("nonexistent")


def _user_client_data(ids, offset):
    """ClientData whose examples carry their identity: x = [client, i, 0.5], y = i % 4."""
    clients = collections.OrderedDict()
    for c, cid in enumerate(ids):
        n = 6 + c
        x = np.stack([np.full(n, offset + c), np.arange(n), np.full(n, 0.5)], axis=1)
        clients[cid] = collections.OrderedDict(
            x=x.astype(np.float32), y=(np.arange(n) % 4).astype(np.int32)
        )
    return tff.simulation.datasets.TestClientData(clients), clients


def _keras_model():
    return tf.keras.Sequential(
        [tf.keras.layers.InputLayer(input_shape=(3,)), tf.keras.layers.Dense(4)]
    )


def test_a_user_task_from_client_data_and_keras_is_registered_and_packed(clean_registry):
    train, train_clients = _user_client_data(["u0", "u1", "u2"], offset=0)
    held_out, held_out_clients = _user_client_data(["h0", "h1"], offset=10)

    def build_user_task(*, seed=0, batch_size=3):
        return registry.task_from_keras(
            "user_task",
            train_data=train,
            eval_data=held_out,
            keras_model_fn=_keras_model,
            problem="classification",
            batch_size=batch_size,
            support_batches=2,
            query_batches=3,
            seed=seed,
        )

    registry.register_task("user_task", build_user_task)
    assert "user_task" in registry.task_names()
    task = registry.get_task("user_task", seed=5)
    assert isinstance(task, FederatedTask)
    assert task.name == "user_task" and task.seed == 5 and task.metric == "accuracy"
    for which, clients in (("train", train_clients), ("eval", held_out_clients)):
        ids = list(clients)
        packed = task.train_clients(ids) if which == "train" else task.eval_clients(ids)
        for cid, client in zip(ids, packed):
            assert client["support"]["x"].shape == (2, 3, 3)
            rows = np.concatenate([part["x"][part["mask"] > 0] for part in client.values()])
            expected = clients[cid]["x"]
            # Each of the user's examples is packed once (support_fraction 0.5, no cap reached).
            assert len(rows) == len(expected)
            np.testing.assert_array_equal(rows[np.argsort(rows[:, 1])], expected)
            assert client["support"]["mask"].sum() == round(len(expected) / 2)
    model = task.model_fn()
    assert [w.shape for w in model.initial_weights[0]] == [(3, 4), (4,)]


def test_a_regression_user_task_gets_a_regression_model(clean_registry):
    def dataset_fn(cid):
        n = 5 if cid == "a" else 4
        x = tf.reshape(tf.range(2 * n, dtype=tf.float32), [n, 2])
        return tf.data.Dataset.from_tensor_slices(
            collections.OrderedDict(x=x, y=tf.reduce_sum(x, axis=1, keepdims=True))
        )

    make = tff.simulation.datasets.ClientData.from_clients_and_tf_fn
    task = registry.task_from_keras(
        "user_regression",
        train_data=make(["a", "b"], dataset_fn),
        eval_data=make(["c"], dataset_fn),
        keras_model_fn=lambda: tf.keras.Sequential(
            [tf.keras.layers.InputLayer(input_shape=(2,)), tf.keras.layers.Dense(1)]
        ),
        problem="regression",
        support_size=2,
    )
    registry.register_task("user_regression", lambda **options: task)
    got = registry.get_task("user_regression", anything="goes")  # **options takes every option
    assert got is task and got.metric == "mse"
    (packed,) = got.train_clients(["a"])
    support = packed["support"]
    assert support["mask"].sum() == 2
    real = support["mask"] > 0
    np.testing.assert_array_equal(support["y"][real][:, 0], support["x"][real].sum(axis=1))
    x_spec, y_spec = got.model_fn().input_spec
    assert x_spec.shape.as_list() == [None, 2] and y_spec.shape.as_list() == [None, 1]


def test_duplicate_registration_raises_unless_overwrite(clean_registry):
    def first(**options):
        return "first"

    def second(**options):
        return "second"

    registry.register_task("dup_task", first)
    with pytest.raises(ValueError, match="overwrite=True"):
        registry.register_task("dup_task", second)
    assert registry.get_task("dup_task") == "first"
    registry.register_task("dup_task", second, overwrite=True)
    assert registry.get_task("dup_task") == "second"
    with pytest.raises(ValueError, match="overwrite=True"):
        registry.register_task("sinusoid", second)


def test_registrations_made_by_tests_are_cleaned_up():
    names = registry.task_names()
    assert not {"user_task", "user_regression", "dup_task"} & set(names)


@pytest.mark.parametrize("name", ["", None, 3])
def test_a_task_name_must_be_a_non_empty_string(clean_registry, name):
    with pytest.raises(ValueError):
        registry.register_task(name, lambda: None)


def test_a_builtin_name_is_taken_even_before_the_builtins_are_loaded(fresh_registry):
    with pytest.raises(ValueError, match="already registered"):
        registry.register_task("digits", lambda **options: "mine")


def test_a_user_overwrite_made_before_the_builtins_load_is_kept(fresh_registry):
    def mine(**options):
        return "mine"

    registry.register_task("digits", mine, overwrite=True)
    assert registry.get_task("digits") == "mine"
