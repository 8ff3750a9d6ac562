"""Metrics releases whose cost per round does not grow with the rows already written.

`MetricsReleaseManager` implements `tff.program.ReleaseManager` for the training program's metrics,
keyed by round, to two places:

* a CSV file (`AppendingCSVReleaseManager`), in the format `tff.program.CSVFileReleaseManager`
  writes: the key column first, one column per flattened value (`a/b`), values as the text of
  `numpy.ndarray.tolist()`, empty cells where a row has no value, `\\r\\n` line ends. TFF 0.87's
  manager rewrites the whole file on every release (tens of milliseconds at 1,000 rows); this one
  appends. Only a row bringing a new column (evaluation rounds add `personalization/...`) rewrites
  the file once, with the wider header.
* TensorBoard (`TensorBoardReleaseManager`): numeric scalars as the scalar summaries
  `tf.summary.scalar` writes, but all of a release in one summary event (one op instead of one
  per value: some 20 times cheaper for 30 values); other numeric arrays as histograms.

Releases are buffered by `release_sync` and written by `flush` (the `async` `release` of the
interface does both), so a run can write every N rounds.

Crash safety. Appends are single writes at the end of the file, and every rewrite goes to a
temporary file that is fsynced and renamed over the old one. A kill can therefore only leave a
torn last line, which the next start-up drops. A resumed run passes the round it restored
(`keep_keys_up_to`): rows after it, released after that round's checkpoint, are dropped once at
start-up, so rounds trained again are not duplicated.
"""

from __future__ import annotations

import collections
import csv
import io
import os
import re
from collections.abc import Mapping
from typing import Any, Optional

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from mfl_tff.training import outputs

# Scalar summaries are tagged for TensorBoard's scalar plugin, as `tf.summary.scalar` tags them.
_SCALAR_METADATA = tf.compat.v1.SummaryMetadata(
    plugin_data=tf.compat.v1.SummaryMetadata.PluginData(plugin_name="scalars")
)
_FLOAT32_ENUM = tf.float32.as_datatype_enum


class MetricsFileError(outputs.ProgramError, ValueError):
    """The existing metrics file cannot be continued (not one this program wrote)."""


def flatten_with_name(value: Any) -> list[tuple[str, Any]]:
    """`[('a/b', leaf), ...]` as TFF's release managers name columns; empty entries vanish.

    `tff.program.structure_utils.flatten_with_name`'s result, found without `dm-tree` for what
    metrics are made of (dicts with string keys, lists and tuples of numbers and arrays), where
    `dm-tree` costs more than the rest of a release; anything else goes to TFF's function.
    """
    named: list[tuple[str, Any]] = []
    if isinstance(value, _PLAIN_CONTAINERS) and _flatten_plain(value, (), named):
        return named
    return tff.program.structure_utils.flatten_with_name(value)


_PLAIN_CONTAINERS = (dict, collections.OrderedDict, list, tuple)
_PLAIN_LEAVES = (np.ndarray, np.generic, int, float, complex, bool, str, bytes)


def _flatten_plain(value: Any, path: tuple, named: list) -> bool:
    """Appends `value`'s leaves to `named` in `dm-tree` order; False if `value` is not plain."""
    kind = type(value)
    if kind in (dict, collections.OrderedDict):
        if not all(type(k) is str for k in value):
            return False
        # dm-tree visits every mapping, OrderedDict included, in sorted key order.
        return all(_flatten_plain(value[k], (*path, k), named) for k in sorted(value))
    if kind in (list, tuple):
        return all(_flatten_plain(v, (*path, i), named) for i, v in enumerate(value))
    if not isinstance(value, _PLAIN_LEAVES):
        return False  # A namedtuple, attrs class, Mapping subclass, value reference, ...
    named.append(("/".join(map(str, path)), value))
    return True


class AppendingCSVReleaseManager(tff.program.ReleaseManager):
    """A `tff.program.ReleaseManager` appending one CSV row per release, keyed by an integer.

    A release with a key at or below an earlier one replaces the rows from that key on, as
    `tff.program.CSVFileReleaseManager` does (this rewrites the file; the training program never
    needs it, since a resumed run drops those rows at start-up).
    """

    def __init__(
        self,
        path: str,
        key_fieldname: str = "key",
        *,
        keep_keys_up_to: Optional[int] = None,
    ):
        """Opens `path`, repairing a torn last line and dropping rows after `keep_keys_up_to`.

        Creates the file (header only) and its directory if missing.

        Args:
          path: The CSV file.
          key_fieldname: The name of the key column (the first column of a new file).
          keep_keys_up_to: If not None, rows with a greater key are removed (a resumed run
            passes the round it restored).

        Raises:
          MetricsFileError: If the file exists without a `key_fieldname` column or with a key
            that is not an integer.
        """
        if not path or not key_fieldname:
            raise ValueError("path and key_fieldname must not be empty.")
        self._path = os.fspath(path)
        self._key = key_fieldname
        self._pending: list[dict[str, Any]] = []
        self._unsynced = False
        os.makedirs(os.path.dirname(os.path.abspath(self._path)), exist_ok=True)
        self._fieldnames, self._written_last = self._open(keep_keys_up_to)
        self._last_key = self._written_last

    @property
    def path(self) -> str:
        return self._path

    @property
    def fieldnames(self) -> list[str]:
        """The columns written so far (pending rows may bring more)."""
        return list(self._fieldnames)

    async def release(self, value: Any, key: int) -> None:
        """Releases `value` as the row of `key` and writes it (`add` then `flush`).

        Args:
          value: A `tff.program.ReleasableStructure` (value references are materialized).
          key: The row's key; at or below an earlier key, it replaces the rows from there on.
        """
        self.add(await tff.program.materialize_value(value), key)
        self.flush()

    def add(self, value: Any, key: int) -> None:
        """Buffers `value` (materialized: numpy values, Python numbers) as the row of `key`."""
        self.add_flat(flatten_with_name(value), key)

    def add_flat(self, named_values: list[tuple[str, Any]], key: int) -> None:
        """`add` for a value already flattened by `flatten_with_name`."""
        key = int(key)
        if self._last_key is not None and key <= self._last_key:
            self._pending = [row for row in self._pending if row[self._key] < key]
            if self._written_last is not None and key <= self._written_last:
                self._written_last = self._rewrite(self._fieldnames, self._rows(keep_up_to=key - 1))
        row = {self._key: key}
        for name, leaf in named_values:
            row[name] = np.array(leaf).tolist()
        self._pending.append(row)
        self._last_key = key

    def flush(self, durable: bool = False) -> None:
        """Writes the buffered rows: appended, or the file rewritten once if a column is new.

        Args:
          durable: Also fsync the file (a checkpoint about to be saved must not survive a power
            cut that the rows it covers do not).
        """
        if self._pending:
            new = []
            for row in self._pending:
                new += [name for name in row if name not in self._fieldnames and name not in new]
            if new:
                fieldnames = self._fieldnames + new
                # Every row gets every column (empty cells), as csv.DictWriter writes them.
                rows = [r + [""] * (len(fieldnames) - len(r)) for r in self._rows()]
                rows += [self._as_list(row, fieldnames) for row in self._pending]
                self._rewrite(fieldnames, rows)
                self._fieldnames = fieldnames
            else:
                self._append(self._pending)
            self._written_last = self._pending[-1][self._key]
            self._pending = []
        if durable and self._unsynced:
            with open(self._path, "rb") as f:
                os.fsync(f.fileno())
            self._unsynced = False

    # -- The file. ---------------------------------------------------------------------------

    def _open(self, keep_up_to: Optional[int]) -> tuple[list[str], Optional[int]]:
        """Reads, repairs and trims the existing file: `(header, last key)`."""
        directory, name = os.path.split(os.path.abspath(self._path))
        for entry in os.listdir(directory):
            if re.fullmatch(re.escape(name) + r"\.tmp\d+", entry):  # Left by a killed rewrite.
                os.remove(os.path.join(directory, entry))
        if not os.path.exists(self._path):
            self._rewrite([self._key], [])
            return [self._key], None
        with open(self._path, "rb") as f:
            data = f.read()
        # A kill during an append can leave a line without its end: the row is lost, not kept
        # half-written (its round is trained again, since no checkpoint covers it).
        complete = data[: data.rfind(b"\n") + 1]
        try:
            text = complete.decode("utf-8")
        except UnicodeDecodeError:
            raise MetricsFileError(
                f"{self._path} is not a text file; move it away or choose another experiment name."
            ) from None
        records = [r for r in csv.reader(io.StringIO(text, newline="")) if r]
        header, body = (records[0], records[1:]) if records else ([self._key], [])
        if self._key not in header:
            raise MetricsFileError(
                f"{self._path} has no {self._key} column, so it is not a metrics file this "
                "program wrote; move it away or choose another experiment name."
            )
        index = header.index(self._key)
        keys = []
        for number, record in enumerate(body, start=2):
            try:
                keys.append(int(record[index]))
            except (IndexError, ValueError):
                raise MetricsFileError(
                    f"{self._path} line {number} has no integer {self._key}; move the file away "
                    "or choose another experiment name."
                ) from None
        kept = body
        if keep_up_to is not None:
            kept = [r for r, k in zip(body, keys) if k <= keep_up_to]
            keys = [k for k in keys if k <= keep_up_to]
        if len(complete) != len(data) or len(kept) != len(body) or not records:
            self._rewrite(header, kept)
        return header, (keys[-1] if keys else None)

    def _rows(self, keep_up_to: Optional[int] = None) -> list[list[str]]:
        """The written rows (text cells), optionally those with key <= `keep_up_to`."""
        with open(self._path, newline="", encoding="utf-8") as f:
            records = [r for r in csv.reader(f) if r][1:]
        if keep_up_to is None:
            return records
        index = self._fieldnames.index(self._key)
        return [r for r in records if int(r[index]) <= keep_up_to]

    @staticmethod
    def _as_list(row: Mapping[str, Any], fieldnames: list[str]) -> list[Any]:
        return [row.get(name, "") for name in fieldnames]

    def _append(self, rows: list[dict[str, Any]]) -> None:
        text = io.StringIO(newline="")
        csv.writer(text).writerows(self._as_list(row, self._fieldnames) for row in rows)
        # One write call: a kill tears at most the end of the file, never the middle.
        with open(self._path, "a", newline="", encoding="utf-8") as f:
            f.write(text.getvalue())
        self._unsynced = True

    def _rewrite(self, fieldnames: list[str], rows: list[list[Any]]) -> Optional[int]:
        """Replaces the file by `fieldnames` and `rows` through a temporary file; the last key."""
        temporary = f"{self._path}.tmp{os.getpid()}"
        try:
            with open(temporary, "w", newline="", encoding="utf-8") as f:
                writer = csv.writer(f)
                writer.writerow(fieldnames)
                writer.writerows(rows)
                f.flush()
                os.fsync(f.fileno())
            os.replace(temporary, self._path)
        except BaseException:
            if os.path.exists(temporary):
                os.remove(temporary)
            raise
        self._unsynced = False
        index = fieldnames.index(self._key)
        return int(rows[-1][index]) if rows else None


class TensorBoardReleaseManager(tff.program.ReleaseManager):
    """A `tff.program.ReleaseManager` writing numeric values to TensorBoard, keyed by step.

    What `tff.program.TensorBoardReleaseManager` writes (scalars as scalar summaries cast to
    float32, other numeric arrays as histograms, anything else ignored), with the scalars of a
    release in one event.
    """

    def __init__(self, logdir: str):
        """Writes to a new events file in `logdir` (created if missing)."""
        if not logdir:
            raise ValueError("logdir must not be empty.")
        os.makedirs(logdir, exist_ok=True)
        self._writer = tf.summary.create_file_writer(logdir)

    async def release(self, value: Any, key: int) -> None:
        """Writes `value` at step `key` (value references are materialized)."""
        self.write(await tff.program.materialize_value(value), key)

    def write(self, value: Any, key: int) -> None:
        """Writes `value` (materialized) at step `key`; the writer's queue flushes it later."""
        self.write_flat(flatten_with_name(value), key)

    def write_flat(self, named_values: list[tuple[str, Any]], key: int) -> None:
        """`write` for a value already flattened by `flatten_with_name`."""
        summary = tf.compat.v1.Summary()
        histograms = []
        for name, leaf in named_values:
            array = np.asarray(leaf)
            if array.dtype.kind not in "biuf":
                continue
            if array.ndim:
                histograms.append((name, array))
            else:
                # The float32 scalar tensor `tf.summary.scalar` writes, built field by field
                # (`tf.make_tensor_proto` costs more than the rest of a release).
                entry = summary.value.add(tag=name, metadata=_SCALAR_METADATA)
                entry.tensor.dtype = _FLOAT32_ENUM
                entry.tensor.tensor_shape.SetInParent()
                entry.tensor.float_val.append(float(np.float32(array)))
        with self._writer.as_default(step=int(key)):
            if summary.value:
                tf.summary.experimental.write_raw_pb(summary.SerializeToString(), step=int(key))
            for name, array in histograms:
                tf.summary.histogram(name, array, step=int(key))

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class MetricsReleaseManager(tff.program.ReleaseManager):
    """The training program's metrics: CSV rows appended, TensorBoard summaries, keyed by round.

    `release_sync` buffers a round's metrics (no event loop needed); `flush` writes the buffered
    rows. The interface's `release` does both.
    """

    def __init__(
        self,
        csv_path: str,
        logdir: str,
        *,
        key_fieldname: str = "round_num",
        keep_keys_up_to: Optional[int] = None,
    ):
        """Opens both outputs (see `AppendingCSVReleaseManager` for `keep_keys_up_to`)."""
        self.csv = AppendingCSVReleaseManager(
            csv_path, key_fieldname, keep_keys_up_to=keep_keys_up_to
        )
        self.tensorboard = TensorBoardReleaseManager(logdir)

    async def release(self, value: Any, key: int) -> None:
        """Releases and writes `value` as round `key` (value references are materialized)."""
        self.release_sync(await tff.program.materialize_value(value), key)
        self.flush()

    def release_sync(self, value: Any, key: int) -> None:
        """Buffers `value` (materialized) as round `key`; `flush` writes it."""
        named_values = flatten_with_name(value)  # Once for both: it is a third of the cost.
        self.csv.add_flat(named_values, key)
        self.tensorboard.write_flat(named_values, key)

    def flush(self, durable: bool = False) -> None:
        """Writes the buffered rows (`durable`: fsynced, before a checkpoint)."""
        self.csv.flush(durable)
        self.tensorboard.flush()

    def close(self) -> None:
        """Flushes and closes the TensorBoard writer."""
        self.flush()
        self.tensorboard.close()
