"""Shared fixtures: small files in TFF's real EMNIST SQLite format, and worker-process hygiene."""

from __future__ import annotations

import collections
import os
import sqlite3

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_federated as tff

from mfl_tff.data import emnist
from mfl_tff.training import runtime

NUM_WRITERS = 12
NUM_EVAL = 3
# The 62-class splits have two writers more, as the real file does (3,400 vs 3,383).
NUM_WRITERS_ALL = 14

Writers = dict[str, tuple[np.ndarray, np.ndarray]]


def random_writers(rng: np.random.Generator, ids: list[str], num_classes: int) -> Writers:
    writers = {}
    for cid in ids:
        n = int(rng.integers(3, 16))
        pixels = rng.random((n, 28, 28), dtype=np.float32)
        labels = rng.integers(0, num_classes, size=n).astype(np.int32)
        writers[cid] = (pixels, labels)
    return writers


def write_emnist_file(path: str, splits: dict[str, Writers], scratch: str) -> None:
    """Writes `splits` ({split name: {writer: (pixels, labels)}}) in TFF's EMNIST SQLite format.

    `save_to_sql_client_data` gives each client one split, but the real file has the same writer in
    several splits, so each split is saved on its own and the rows are merged into one file.
    """
    parts = []
    for i, (split_name, writers) in enumerate(splits.items()):
        part = os.path.join(scratch, f"part{i}.sqlite")

        def dataset_fn(cid, writers=writers):
            pixels, labels = writers[cid]
            # Same element spec as TFF's parsed EMNIST: label int32 [], pixels float32 [28, 28].
            return tf.data.Dataset.from_tensor_slices(
                collections.OrderedDict(label=labels, pixels=pixels)
            )

        tff.simulation.datasets.save_to_sql_client_data(
            list(writers),
            dataset_fn,
            part,
            split_names_by_client_id={cid: split_name for cid in writers},
        )
        parts.append(part)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tf.io.gfile.copy(parts[0], path)
    with sqlite3.connect(path) as con:
        for part in parts[1:]:
            con.execute("ATTACH DATABASE ? AS part;", (part,))
            con.execute("INSERT INTO examples SELECT * FROM part.examples;")
            con.execute("INSERT INTO client_metadata SELECT * FROM part.client_metadata;")
            con.commit()
            con.execute("DETACH DATABASE part;")


@pytest.fixture(scope="session")
def emnist_dir(tmp_path_factory):
    """A cache directory with emnist_all.sqlite; returns (dir, digits train, all train)."""
    rng = np.random.default_rng(1234)
    ids = [f"f{i:04d}_{i % 7:02d}" for i in range(NUM_WRITERS_ALL)]
    digits_train = random_writers(rng, ids[:NUM_WRITERS], 10)
    all_train = random_writers(rng, ids, 62)
    splits = {
        "digits_only_train": digits_train,
        # Test splits hold other examples of the same writers; they must never reach a client.
        "digits_only_test": random_writers(rng, ids[:NUM_WRITERS], 10),
        "all_train": all_train,
        "all_test": random_writers(rng, ids, 62),
    }
    directory = tmp_path_factory.mktemp("emnist_cache")
    write_emnist_file(
        str(directory / emnist.CACHE_FILE_NAME), splits, str(tmp_path_factory.mktemp("scratch"))
    )
    return directory, digits_train, all_train


@pytest.fixture(scope="module")
def tff_local_execution():
    """TFF's runtime for a test module: a worker we start, stopped (and checked gone) after it."""
    with runtime.local_execution():
        yield
    assert runtime.live_worker_pids() == []
