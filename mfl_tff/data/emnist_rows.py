"""Federated EMNIST built on the workers from TFF's SQLite file, read by row id.

With `build_emnist(data_on_workers=True)` each client example's `x` is the int32 SQLite `rowid` of
its row in the file's `examples` table, in the order TFF's own loader yields the writer's
examples, and `y` its label, both read on the driver (`client_codes`: TFF's query plus the rowid,
the label parsed by TensorFlow, no pixels). Packing is then the same split and order as the default
task's, over row ids, and the client computation reads the pixels of the rows it was sent from the
file on the worker (`EmnistRows`, an `ExampleSource`):

    SELECT rowid, serialized_example_proto FROM examples WHERE rowid IN (<the codes>)

through `tf.data.experimental.SqlDataset`, parsed with `tf.io.parse_example`. So each worker needs
the same `emnist_all.sqlite` (the same file: the row ids are its rows' keys) at the path the
source names, by default the driver's own path. A worker without the file fails the round with
"EMNIST data on the workers: no file <path> on this worker; ..." (inside the runtime's error), and
one whose file lacks the rows sent fails too, instead of training on zeros.
"""

from __future__ import annotations

import collections
import contextlib
import os
import sqlite3

import numpy as np
import tensorflow as tf

from mfl_tff.data import example_sources

IMAGE_SHAPE = (28, 28)
# Row ids per SQL query on the worker: keeps each statement far below SQLite's 1 MB limit.
ROWS_PER_QUERY = 10_000
INT32_MAX = np.iinfo(np.int32).max
_PIXELS = {
    # The default only serves the sentinel row (an empty proto) that keeps the batch non-empty.
    "pixels": tf.io.FixedLenFeature(
        IMAGE_SHAPE, tf.float32, default_value=np.zeros(IMAGE_SHAPE, np.float32)
    )
}
# TFF's own parsing of the label (tff.simulation.datasets.emnist), then cast to int32 as it does.
_LABEL = {"label": tf.io.FixedLenFeature((), tf.int64)}


def check_row_ids(path: str) -> None:
    """Raises ValueError unless every row id of the file's `examples` fits an int32 code."""
    with contextlib.closing(sqlite3.connect(path)) as connection:  # `path` exists: checked
        (largest,) = connection.execute("SELECT max(rowid) FROM examples").fetchone()
    if largest is not None and largest > INT32_MAX:
        raise ValueError(
            f"{path} has row ids up to {largest}, beyond int32 ({INT32_MAX}); EMNIST data on the "
            "workers sends row ids as int32 codes: use TFF's emnist_all.sqlite as published, or "
            "data_on_workers=False."
        )


def client_codes(path: str, split_name: str, client_id: str) -> collections.OrderedDict:
    """One writer's examples as `OrderedDict(x=int32 row ids, y=int32 labels)`, read on the driver.

    The query is TFF's (`tff.simulation.datasets.SqlClientData`) with the rowid selected too, run
    by the same engine, so the rows come in the order TFF's loader yields that writer's examples.
    """
    query = (
        "SELECT rowid, serialized_example_proto FROM examples WHERE client_id = '"
        f"{client_id}' and split_name ='{split_name}'"
    )
    rows = tf.data.experimental.SqlDataset("sqlite", path, query, (tf.int64, tf.string))
    row_ids, protos = [], []
    for ids, serialized in rows.batch(4096):
        row_ids.append(ids.numpy())
        protos.append(serialized)
    if not row_ids:
        return collections.OrderedDict(x=np.zeros((0,), np.int32), y=np.zeros((0,), np.int32))
    labels = tf.io.parse_example(tf.concat(protos, 0), _LABEL)["label"]
    row_ids = np.concatenate(row_ids)
    if row_ids.max() > INT32_MAX:  # `check_row_ids` has checked the file; this is a changed one.
        raise ValueError(f"{path}: row ids of {client_id} do not fit int32 codes.")
    return collections.OrderedDict(x=row_ids.astype(np.int32), y=tf.cast(labels, tf.int32).numpy())


class EmnistRows(example_sources.ExampleSource):
    """EMNIST pixels read on the worker from TFF's SQLite file; the codes are row ids.

    Args:
      path: The file's path on every worker (`emnist_all.sqlite`, the same bytes as the file the
        driver read the row ids from).
    """

    def __init__(self, path):
        self.path = os.fspath(path)

    def build(self, codes, y):
        codes = tf.convert_to_tensor(codes)
        wanted = tf.reshape(tf.cast(codes, tf.int64), [-1])
        unique, _ = tf.unique(wanted)
        # Runs on the worker: a missing file fails here with one line, not as SQLite's error.
        present = tf.debugging.Assert(
            tf.size(tf.io.matching_files(self.path)) > 0,
            [
                f"EMNIST data on the workers: no file {self.path} on this worker; each worker "
                "needs TFF's emnist_all.sqlite (the driver's file) at that path."
            ],
        )
        with tf.control_dependencies([present]):
            unique = tf.identity(unique)

        def read(chunk):
            query = tf.strings.join(
                [
                    "SELECT rowid, serialized_example_proto FROM examples WHERE rowid IN (",
                    tf.strings.reduce_join(tf.strings.as_string(chunk), separator=","),
                    ")",
                ]
            )
            return tf.data.experimental.SqlDataset(
                "sqlite", self.path, query, (tf.int64, tf.string)
            )

        # Row 0 (an empty proto, zero pixels) keeps the batch non-empty when every code is
        # padding; padding is code 0, which no SQLite row has, so it reads these zeros.
        sentinel = tf.data.Dataset.from_tensors((tf.constant(0, tf.int64), tf.constant(b"")))
        rows = (
            tf.data.Dataset.from_tensor_slices(unique)
            .batch(ROWS_PER_QUERY)
            .flat_map(read)
            .concatenate(sentinel)
            .batch(tf.cast(tf.size(unique), tf.int64) + 1)
        )
        row_ids, protos = tf.data.experimental.get_single_element(rows)
        pixels = tf.io.parse_example(protos, _PIXELS)["pixels"]
        order = tf.argsort(row_ids)
        sorted_ids = tf.gather(row_ids, order)
        where = tf.minimum(tf.searchsorted(sorted_ids, wanted), tf.size(sorted_ids) - 1)
        hit = tf.equal(tf.gather(sorted_ids, where), wanted)
        found = tf.debugging.Assert(
            tf.reduce_all(hit),
            [
                f"EMNIST data on the workers: {self.path} on this worker lacks rows the driver "
                "read (is it the driver's file?), e.g. row ids",
                tf.boolean_mask(wanted, tf.logical_not(hit)),
            ],
            summarize=5,
        )
        with tf.control_dependencies([found]):
            x = tf.gather(pixels, tf.gather(order, where))
        x = tf.reshape(x, tf.concat([tf.shape(codes), IMAGE_SHAPE], 0))
        x.set_shape(codes.shape.concatenate(IMAGE_SHAPE))
        return x, y
