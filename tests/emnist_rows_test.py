"""Tests of EMNIST data on the workers (`build_emnist(data_on_workers=True)`, `emnist_rows`).

On small files in TFF's real EMNIST SQLite format (the `emnist_dir` fixture): the default task is
bit-identical to before the option existed; the row ids read back on the worker give exactly the
default task's packed clients (each round's split, held-out clients, cohorts, eagerly and inside a
TFF computation on the worker), so training sees the default task's tensors; the driver sends far
fewer bytes; and a worker without the file fails with a message naming the path.
"""

from __future__ import annotations

import shutil
import sqlite3

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_federated as tff

from mfl_tff.algorithms import cohorts
from mfl_tff.data import emnist, emnist_rows, example_sources, packing, registry
from tests import testing

# `testing.digest(testing.packed_sample(task))` of the default task (only_digits, then all 62
# classes), computed on the `emnist_dir` file with the code from before `data_on_workers` existed.
DEFAULT_DIGESTS = {
    True: "899f91fe2e0d83abc6edf67b47c4df32d0f7472e803ff1f619dd72da1b85e1b2",
    False: "8c43b5bafac3c8a259a3eebffcbeb42f8ac52f60e8ed1ccecacd5d68f35aae18",
}


def _options(directory, only_digits=True) -> dict:
    return dict(
        data_cache_dir=directory,
        num_eval_clients=testing.NUM_EVAL,
        only_digits=only_digits,
        model="mlp",
    )


@pytest.fixture(scope="module", params=[True, False], ids=["digits", "all"])
def tasks(request, emnist_dir):
    """(only_digits, default task, the same with data on the workers), for 10 and 62 classes."""
    options = _options(emnist_dir[0], request.param)
    return (
        request.param,
        emnist.build_emnist(**options),
        emnist.build_emnist(data_on_workers=True, **options),
    )


def test_the_default_task_is_unchanged(tasks):
    only_digits, default, on_workers = tasks
    assert not default.data_on_workers and on_workers.data_on_workers
    assert testing.digest(testing.packed_sample(default)) == DEFAULT_DIGESTS[only_digits]


def test_rows_read_back_are_the_default_tasks_clients_exactly(tasks, emnist_dir):
    _, default, on_workers = tasks
    source = on_workers.example_source
    assert isinstance(source, emnist_rows.EmnistRows)
    assert source.path == emnist.cache_file_path(emnist_dir[0])  # the driver's file by default
    wants, gots = testing.packed_sample(default), testing.packed_sample(on_workers)
    for want, got in zip(wants, gots):
        assert got[0]["support"]["x"].dtype == np.int32
        # Stacked clients (any leading axes) read back in one call.
        testing.assert_identical(
            packing.stack_clients(want),
            example_sources.build_on_worker(packing.stack_clients(got), source),
        )
    # Cohorts padded with an empty client (all codes 0, which no row has), and an empty client
    # alone: only padding, read as zeros.
    want, got = wants[1], gots[1]
    for cohort_want, cohort_got in zip(cohorts.make_cohorts(want, 2), cohorts.make_cohorts(got, 2)):
        testing.assert_identical(cohort_want, example_sources.build_on_worker(cohort_got, source))
    empty = tf.nest.map_structure(np.zeros_like, got[0])
    testing.assert_identical(
        tf.nest.map_structure(np.zeros_like, want[0]),
        example_sources.build_on_worker(empty, source),
    )


def test_the_driver_sends_row_ids_instead_of_pixels(tasks):
    _, default, on_workers = tasks
    ids = default.train_data.client_ids[:3]
    for want, got in zip(default.train_clients(ids, 1), on_workers.train_clients(ids, 1)):
        slots = sum(part["mask"].size for part in want.values())
        assert slots == 2 * 10 * 10  # support and query: max_batches 10 of batch_size 10
        assert sum(part["x"].nbytes for part in want.values()) == slots * 28 * 28 * 4 == 627_200
        assert sum(part["x"].nbytes for part in got.values()) == slots * 4 == 800
        # Labels and masks are the same bytes in both.
        for part in ("support", "query"):
            np.testing.assert_array_equal(got[part]["y"], want[part]["y"])
            np.testing.assert_array_equal(got[part]["mask"], want[part]["mask"])


def test_options_and_their_errors(emnist_dir, tmp_path):
    directory = emnist_dir[0]
    assert "data_on_workers" in registry.task_options("emnist")
    task = emnist.build_emnist(
        data_on_workers=True, worker_data_cache_dir="/data/emnist", **_options(directory)
    )
    assert task.example_source.path == "/data/emnist/emnist_all.sqlite"
    assert task.train_data.element_type_structure["x"] == tf.TensorSpec([], tf.int32)
    with pytest.raises(ValueError, match="only with data_on_workers"):
        emnist.build_emnist(worker_data_cache_dir="/data/emnist", **_options(directory))
    # A row id beyond int32 cannot be a code.
    shutil.copy(directory / emnist.CACHE_FILE_NAME, tmp_path / emnist.CACHE_FILE_NAME)
    with sqlite3.connect(tmp_path / emnist.CACHE_FILE_NAME) as connection:
        connection.execute(
            "INSERT INTO examples (rowid, split_name, client_id, serialized_example_proto) "
            "VALUES (2147483648, 'unused', 'unused', x'')"
        )
    emnist.build_emnist(**_options(tmp_path))  # the default task does not mind
    with pytest.raises(ValueError, match="beyond int32"):
        emnist.build_emnist(data_on_workers=True, **_options(tmp_path))


def test_a_worker_without_the_file_fails_naming_the_path(tasks, tmp_path):
    _, _, on_workers = tasks
    client = on_workers.train_clients(on_workers.train_data.client_ids[:1])[0]
    missing = str(tmp_path / "elsewhere" / emnist.CACHE_FILE_NAME)
    with pytest.raises(tf.errors.InvalidArgumentError, match=f"no file {missing} on this worker"):
        example_sources.build_on_worker(client, emnist_rows.EmnistRows(missing))
    # A different file (here one without those rows) is caught too, not read as zeros.
    other = tmp_path / emnist.CACHE_FILE_NAME
    with sqlite3.connect(other) as connection:
        connection.execute(
            "CREATE TABLE examples (split_name TEXT, client_id TEXT, serialized_example_proto BLOB)"
        )
    with pytest.raises(tf.errors.InvalidArgumentError, match="lacks rows the driver read"):
        example_sources.build_on_worker(client, emnist_rows.EmnistRows(other))
    assert not (tmp_path / "elsewhere").exists()


@pytest.mark.timeout(120)
def test_on_the_worker(emnist_dir, tff_local_execution, tmp_path):
    options = dict(_options(emnist_dir[0]), batch_size=5, max_batches=2)
    default = emnist.build_emnist(**options)
    on_workers = emnist.build_emnist(data_on_workers=True, **options)

    # Read back inside a TFF computation, on the worker: exactly the default task's clients.
    ids = default.train_data.client_ids[:4]
    want = packing.stack_clients(default.train_clients(ids, 1))
    got = packing.stack_clients(on_workers.train_clients(ids, 1))
    spec = tf.nest.map_structure(lambda a: tf.TensorSpec(a.shape, a.dtype), got)

    def read_on_worker(source):
        @tff.tensorflow.computation(tff.types.tensorflow_to_type(spec))
        def read(data):
            return example_sources.build_on_worker(data, source)

        return read

    testing.assert_identical(want, read_on_worker(on_workers.example_source)(got))

    # A worker without the file: the computation fails with the message naming the path.
    missing = str(tmp_path / "elsewhere" / emnist.CACHE_FILE_NAME)
    with pytest.raises(Exception, match=f"no file {missing} on this worker") as raised:
        read_on_worker(emnist_rows.EmnistRows(missing))(got)
    # What the training program prints instead of the worker's multi-line gRPC error.
    assert example_sources.worker_data_problem(raised.value) == (
        f"EMNIST data on the workers: no file {missing} on this worker; each worker needs TFF's "
        "emnist_all.sqlite (the driver's file) at that path."
    )
