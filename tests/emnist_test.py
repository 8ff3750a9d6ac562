"""Tests of `mfl_tff.data.emnist` on small files in TFF's real EMNIST SQLite format (no network)."""

from __future__ import annotations

import collections
import urllib.request

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_federated as tff
from tensorflow_federated.python.simulation.datasets import download as tff_download

from mfl_tff.data import emnist
from tests.testing import (
    NUM_EVAL,
    NUM_WRITERS,
    NUM_WRITERS_ALL,
    random_writers,
    write_emnist_file,
)


@pytest.fixture
def no_network(monkeypatch):
    """Records (and fails) every way TFF or Keras could download; yields the list of attempts."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise AssertionError(f"download attempted: {args}")

    monkeypatch.setattr(tff_download, "_fetch_lzma_file", refuse)
    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    monkeypatch.setattr(tf.keras.utils, "get_file", refuse)
    return attempts


def _real_examples(packed) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for part in packed.values():
        keep = part["mask"].reshape(-1) == 1.0
        xs.append(part["x"].reshape((-1, 28, 28))[keep])
        ys.append(part["y"].reshape(-1)[keep])
    return np.concatenate(xs), np.concatenate(ys)


def _sorted_by_pixel_sum(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(x.reshape(len(x), -1).sum(axis=1), kind="stable")
    return x[order], y[order]


def test_writers_split_into_disjoint_train_and_held_out_clients(emnist_dir, no_network):
    directory, digits_train, _ = emnist_dir
    task = emnist.build_emnist(data_cache_dir=directory, num_eval_clients=NUM_EVAL)
    train_ids, eval_ids = task.train_data.client_ids, task.eval_data.client_ids
    assert len(eval_ids) == NUM_EVAL
    assert not set(train_ids) & set(eval_ids)
    assert set(train_ids) | set(eval_ids) == set(digits_train)
    assert isinstance(task.train_data, tff.simulation.datasets.ClientData)
    assert task.train_data.element_type_structure == collections.OrderedDict(
        x=tf.TensorSpec([28, 28], tf.float32), y=tf.TensorSpec([], tf.int32)
    )
    assert task.problem == "classification"
    assert not no_network


def test_each_train_example_of_a_writer_is_packed_exactly_once(emnist_dir):
    directory, digits_train, _ = emnist_dir
    task = emnist.build_emnist(data_cache_dir=directory, num_eval_clients=NUM_EVAL)
    packed = dict(zip(task.train_data.client_ids, task.train_clients(task.train_data.client_ids)))
    packed.update(zip(task.eval_data.client_ids, task.eval_clients(task.eval_data.client_ids)))
    assert set(packed) == set(digits_train)
    for cid, client in packed.items():
        x, y = _sorted_by_pixel_sum(*_real_examples(client))
        want_x, want_y = _sorted_by_pixel_sum(*digits_train[cid])
        # Exact equality: same examples, none lost or repeated, none from TFF's test split.
        np.testing.assert_array_equal(x, want_x, err_msg=cid)
        np.testing.assert_array_equal(y, want_y, err_msg=cid)
        assert client["support"]["y"].dtype == np.int32


def test_split_is_deterministic_for_a_seed_and_differs_across_seeds(emnist_dir):
    directory, _, _ = emnist_dir
    a = emnist.build_emnist(data_cache_dir=directory, num_eval_clients=NUM_EVAL, seed=0)
    b = emnist.build_emnist(data_cache_dir=directory, num_eval_clients=NUM_EVAL, seed=0)
    c = emnist.build_emnist(data_cache_dir=directory, num_eval_clients=NUM_EVAL, seed=1)
    assert a.eval_data.client_ids == b.eval_data.client_ids
    assert a.train_data.client_ids == b.train_data.client_ids
    assert a.eval_data.client_ids != c.eval_data.client_ids
    first = a.train_data.client_ids[0]
    tf.nest.map_structure(
        np.testing.assert_array_equal, a.train_clients([first])[0], b.train_clients([first])[0]
    )


def test_num_train_clients_takes_a_subset_and_keeps_the_held_out_writers(emnist_dir):
    directory, _, _ = emnist_dir
    full = emnist.build_emnist(data_cache_dir=directory, num_eval_clients=NUM_EVAL)
    small = emnist.build_emnist(
        data_cache_dir=directory, num_eval_clients=NUM_EVAL, num_train_clients=4
    )
    assert len(small.train_data.client_ids) == 4
    assert set(small.train_data.client_ids) < set(full.train_data.client_ids)
    assert small.eval_data.client_ids == full.eval_data.client_ids


def test_shots_and_packing_options_reach_the_packed_clients(emnist_dir):
    directory, digits_train, _ = emnist_dir
    task = emnist.build_emnist(
        data_cache_dir=directory, num_eval_clients=NUM_EVAL, shots=2, batch_size=4, max_batches=2
    )
    cid = task.train_data.client_ids[0]
    client = task.train_clients([cid])[0]
    assert client["support"]["x"].shape == (2, 4, 28, 28)
    assert client["query"]["mask"].shape == (2, 4)
    assert client["support"]["mask"].sum() == 2
    assert client["query"]["mask"].sum() == min(len(digits_train[cid][1]) - 2, 8)


def test_all_62_classes_read_the_all_splits(emnist_dir, no_network):
    directory, _, all_train = emnist_dir
    task = emnist.build_emnist(
        only_digits=False, data_cache_dir=directory, num_eval_clients=NUM_EVAL, model="mlp"
    )
    ids = task.train_data.client_ids + task.eval_data.client_ids
    assert sorted(ids) == sorted(all_train)
    assert len(ids) == NUM_WRITERS_ALL
    cid = task.eval_data.client_ids[0]
    x, y = _sorted_by_pixel_sum(*_real_examples(task.eval_clients([cid])[0]))
    want_x, want_y = _sorted_by_pixel_sum(*all_train[cid])
    np.testing.assert_array_equal(x, want_x)
    np.testing.assert_array_equal(y, want_y)
    assert tuple(_logits_type(task.model_fn(), 3).shape) == (3, 62)
    assert not no_network


def _logits_type(model: tff.learning.models.FunctionalModel, batch: int) -> tff.TensorType:
    # Functional models run only in graph context, so trace a TFF computation; tracing gives the
    # result type without starting TFF's execution service.
    @tff.tensorflow.computation(tff.TensorType(np.float32, [batch, 28, 28]))
    def logits(x):
        weights = tf.nest.map_structure(tf.constant, model.initial_weights)
        return model.predict_on_batch(weights, x, training=False)

    return logits.type_signature.result


@pytest.mark.parametrize("model", ["cnn", "mlp"])
def test_model_gives_ten_logits(emnist_dir, model):
    directory, _, _ = emnist_dir
    task = emnist.build_emnist(data_cache_dir=directory, num_eval_clients=NUM_EVAL, model=model)
    functional_model = task.model_fn()
    assert isinstance(functional_model, tff.learning.models.FunctionalModel)
    result = _logits_type(functional_model, 5)
    assert result.dtype == np.float32
    assert tuple(result.shape) == (5, 10)
    # And the values: finite, and different images give different logits.
    with tf.Graph().as_default() as graph:
        x = tf.constant(np.random.default_rng(0).random((5, 28, 28), dtype=np.float32))
        out = functional_model.predict_on_batch(functional_model.initial_weights, x, False)
        with tf.compat.v1.Session(graph=graph) as session:
            values = session.run(out)
    assert np.all(np.isfinite(values))
    assert not np.allclose(values[0], values[1])


@pytest.mark.parametrize("subdir", ["", "not_created"])
def test_missing_cache_file_raises_one_line_and_downloads_nothing(tmp_path, no_network, subdir):
    directory = tmp_path / subdir if subdir else tmp_path
    with pytest.raises(FileNotFoundError) as info:
        emnist.build_emnist(data_cache_dir=directory)
    message = str(info.value)
    assert "\n" not in message
    assert emnist.CACHE_FILE_NAME in message
    assert str(directory) in message
    assert emnist.ARCHIVE_URL in message
    assert not no_network
    # TFF's loader would have created the directory on its way to a download.
    assert list(tmp_path.iterdir()) == []


def test_missing_cache_file_names_tffs_default_directory(tmp_path, monkeypatch, no_network):
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=str(tmp_path / ".tff")):
        emnist.build_emnist()
    assert not no_network


@pytest.mark.parametrize("only_digits", [True, False])
@pytest.mark.parametrize("use_default_dir", [True, False])
def test_expected_path_is_the_one_tff_reads(tmp_path, monkeypatch, only_digits, use_default_dir):
    """Lets TFF's own load_data run until it would download, and records the path it wants."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    cache_dir = None if use_default_dir else str(tmp_path / "cache")
    wanted = []

    def record(origin, filename):
        wanted.append(filename)
        raise ConnectionError("no network in tests")

    monkeypatch.setattr(tff_download, "_fetch_lzma_file", record)
    with pytest.raises(ConnectionError):
        tff.simulation.datasets.emnist.load_data(only_digits=only_digits, cache_dir=cache_dir)
    assert wanted == [emnist.cache_file_path(cache_dir)]


def test_too_many_eval_clients_raises(emnist_dir):
    directory, _, _ = emnist_dir
    with pytest.raises(ValueError, match="12 writers"):
        emnist.build_emnist(data_cache_dir=directory, num_eval_clients=NUM_WRITERS)
    with pytest.raises(ValueError, match="num_train_clients"):
        emnist.build_emnist(data_cache_dir=directory, num_eval_clients=10, num_train_clients=3)
    # The largest valid request still works: every writer but one held out.
    task = emnist.build_emnist(data_cache_dir=directory, num_eval_clients=NUM_WRITERS - 1)
    assert len(task.train_data.client_ids) == 1


@pytest.mark.parametrize(
    "options",
    [
        {"num_eval_clients": 0},
        {"num_train_clients": 0},
        {"batch_size": 0},
        {"max_batches": 0},
        {"shots": 0},
        {"shots": (2, 5)},
    ],
)
def test_invalid_counts_raise_before_reading_data(tmp_path, options):
    with pytest.raises(ValueError, match=next(iter(options))):
        emnist.build_emnist(data_cache_dir=tmp_path, **options)


def test_unknown_model_lists_the_choices(tmp_path):
    with pytest.raises(ValueError, match="cnn, mlp"):
        emnist.build_emnist(data_cache_dir=tmp_path, model="resnet")


def test_file_without_the_requested_split_raises_value_error(tmp_path):
    rng = np.random.default_rng(0)
    ids = ["f0001_01", "f0002_02"]
    splits = {
        "digits_only_train": random_writers(rng, ids, 10),
        "digits_only_test": random_writers(rng, ids, 10),
    }
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    write_emnist_file(str(tmp_path / "cache" / emnist.CACHE_FILE_NAME), splits, str(scratch))
    assert len(emnist.load_train_writers(data_cache_dir=tmp_path / "cache").client_ids) == 2
    with pytest.raises(ValueError, match="all_train"):
        emnist.build_emnist(only_digits=False, data_cache_dir=tmp_path / "cache")
