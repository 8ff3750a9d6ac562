"""Tests of `mfl_tff.data.client_data`: numpy-backed `ClientData` and reading any `ClientData`."""

from __future__ import annotations

import collections

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_federated as tff

from mfl_tff.data import client_data


def _clients() -> dict[str, collections.OrderedDict]:
    rng = np.random.default_rng(0)
    return {
        cid: collections.OrderedDict(
            x=rng.normal(size=(n, 2, 3)).astype(np.float32),
            y=rng.integers(0, 5, size=n).astype(np.int32),
        )
        for cid, n in (("a", 4), ("b", 7), ("c", 1))
    }


def test_from_dict_exposes_ids_arrays_and_element_spec():
    clients = _clients()
    data = client_data.ArrayClientData.from_dict(clients)
    assert data.client_ids == ["a", "b", "c"]
    assert isinstance(data, tff.simulation.datasets.ClientData)
    spec = data.element_type_structure
    assert spec["x"] == tf.TensorSpec((2, 3), tf.float32)
    assert spec["y"] == tf.TensorSpec((), tf.int32)
    np.testing.assert_array_equal(data.client_arrays("b")["x"], clients["b"]["x"])


def test_tf_datasets_yield_the_clients_examples_in_order():
    clients = _clients()
    data = client_data.ArrayClientData.from_dict(clients)
    elements = list(data.create_tf_dataset_for_client("b").as_numpy_iterator())
    assert len(elements) == 7
    np.testing.assert_array_equal(np.stack([e["x"] for e in elements]), clients["b"]["x"])
    np.testing.assert_array_equal([e["y"] for e in elements], clients["b"]["y"])


def test_dataset_fn_accepts_bytes_ids_and_rejects_other_types():
    clients = _clients()
    data = client_data.ArrayClientData.from_dict(clients)
    fn = data.serializable_dataset_fn
    ys = [e["y"] for e in fn(b"a").as_numpy_iterator()]
    np.testing.assert_array_equal(ys, clients["a"]["y"])
    with pytest.raises(TypeError):
        fn(3)


def test_generated_clients_come_from_the_id():
    calls = []

    def arrays_fn(cid):
        calls.append(cid)
        n = int(cid)
        return collections.OrderedDict(
            x=np.full((n, 1), n, np.float32), y=np.arange(n, dtype=np.int32)
        )

    data = client_data.ArrayClientData([str(i) for i in range(1, 1000)], arrays_fn)
    assert data.client_arrays("37")["x"].shape == (37, 1)
    assert np.all(data.client_arrays("37")["x"] == 37.0)
    # Only the first client is generated up front (for the element spec), not all 999.
    assert calls.count("1") == 1 and len(calls) == 3


def test_no_client_ids_raise():
    with pytest.raises(ValueError):
        client_data.ArrayClientData([], lambda cid: {})


def test_client_arrays_reads_any_client_data():
    clients = _clients()
    test_data = tff.simulation.datasets.TestClientData(clients)
    arrays = client_data.client_arrays(test_data, "b")
    np.testing.assert_array_equal(arrays["x"], clients["b"]["x"])
    np.testing.assert_array_equal(arrays["y"], clients["b"]["y"])


def test_client_arrays_of_an_empty_client_have_the_element_shapes():
    def dataset_fn(cid):
        n = 0 if cid == "empty" else 2
        return tf.data.Dataset.from_tensor_slices(
            collections.OrderedDict(x=tf.zeros([n, 4]), y=tf.zeros([n], tf.int64))
        )

    data = tff.simulation.datasets.ClientData.from_clients_and_tf_fn(["empty", "full"], dataset_fn)
    arrays = client_data.client_arrays(data, "empty")
    assert arrays["x"].shape == (0, 4)
    assert arrays["y"].shape == (0,)
    assert arrays["y"].dtype == np.int64
    assert client_data.client_arrays(data, "full")["x"].shape == (2, 4)


def test_client_arrays_without_x_and_y_raise_with_the_fix():
    data = tff.simulation.datasets.TestClientData(
        {"a": collections.OrderedDict(pixels=np.zeros((2, 3), np.float32), label=np.zeros(2))}
    )
    with pytest.raises(ValueError, match="preprocess"):
        client_data.client_arrays(data, "a")
