"""Tests of `mfl_tff.training.metrics_release`: rows appended in TFF's CSV format, one rewrite per
new column, crash repair and resume at start-up, per-release work independent of the rows already
written (counted in bytes, not timed), and TensorBoard summaries as TFF's manager writes them."""

from __future__ import annotations

import asyncio
import builtins
import collections
import csv
import glob
import os
import pathlib
from typing import NamedTuple

import attrs
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_federated as tff

from mfl_tff.training import metrics_release

KEY = "round_num"


def _metrics(round_num: int, evaluated: bool = False) -> collections.OrderedDict:
    """A round's metrics shaped like the program's (nested, numpy scalars, an int count)."""
    value = collections.OrderedDict(
        client_work=collections.OrderedDict(
            train_loss=np.float32(1.0 / round_num), num_examples=np.int64(10 * round_num)
        ),
        clients=collections.OrderedDict(sampled=3, dropped=0),
        empty=(),
    )
    if evaluated:
        value["personalization"] = collections.OrderedDict(mean=np.float64(0.5 + round_num))
    return value


def _rows(path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _manager(path, **kwargs) -> metrics_release.AppendingCSVReleaseManager:
    return metrics_release.AppendingCSVReleaseManager(str(path), KEY, **kwargs)


def _write_rows(path, keys, evaluated=()) -> None:
    manager = _manager(path)
    for key in keys:
        manager.add(_metrics(key, key in evaluated), key)
    manager.flush()


class _Pair(NamedTuple):
    b: object
    a: object


@attrs.define
class _Record:
    z: object
    a: object


@pytest.mark.parametrize(
    "value",
    [
        _metrics(3, evaluated=True),
        collections.OrderedDict(z=1, a=[np.ones(2), (2.5, b"x")], m={"y": (), "b": True}),
        {"b": [], "a": {"c": np.float32(1)}},
        [1, (2, [3, {"k": 4}])],
        collections.OrderedDict(pair=_Pair(b=1, a=2), record=_Record(z=1, a=2)),
        {1: "int keys", 2: "go to TFF"},
        np.float32(5),
        (),
    ],
)
def test_flatten_with_name_is_tffs(value):
    got = metrics_release.flatten_with_name(value)
    want = tff.program.structure_utils.flatten_with_name(value)
    assert [name for name, _ in got] == [name for name, _ in want]
    assert all(g is w for (_, g), (_, w) in zip(got, want))


# ---------------------------------------------------------------------------------------------
# The CSV file.
# ---------------------------------------------------------------------------------------------


def test_the_file_is_byte_for_byte_what_tffs_csv_manager_writes(tmp_path):
    ours, theirs = tmp_path / "ours.csv", tmp_path / "theirs.csv"
    reference = tff.program.CSVFileReleaseManager(
        str(theirs), save_mode=tff.program.CSVSaveMode.WRITE, key_fieldname=KEY
    )
    manager = _manager(ours)
    for key in range(1, 6):
        # Rounds 2 and 5 bring evaluation columns: the header grows mid-file.
        asyncio.run(reference.release(_metrics(key, key in (2, 5)), key))
        manager.add(_metrics(key, key in (2, 5)), key)
        manager.flush()
    assert ours.read_bytes() == theirs.read_bytes()
    rows = _rows(ours)
    assert list(rows[0])[0] == KEY and [r[KEY] for r in rows] == ["1", "2", "3", "4", "5"]
    assert [r["personalization/mean"] for r in rows] == ["", "2.5", "", "", "5.5"]


def test_rows_are_appended_in_place_not_rewritten(tmp_path):
    path = tmp_path / "m.csv"
    _write_rows(path, range(1, 4))
    before, inode = path.read_bytes(), path.stat().st_ino
    manager = _manager(path, keep_keys_up_to=3)
    manager.add(_metrics(4), 4)
    manager.flush()
    assert path.stat().st_ino == inode  # Not replaced by a rewritten file.
    after = path.read_bytes()
    assert after.startswith(before) and after.count(b"\n") == before.count(b"\n") + 1
    assert [r[KEY] for r in _rows(path)] == ["1", "2", "3", "4"]


def test_a_new_column_rewrites_the_file_once_then_appends_again(tmp_path):
    path = tmp_path / "m.csv"
    _write_rows(path, range(1, 3))
    manager = _manager(path)
    inode = path.stat().st_ino
    manager.add(_metrics(3, evaluated=True), 3)
    manager.flush()
    assert path.stat().st_ino != inode  # Replaced through a temporary file...
    assert manager.fieldnames[-1] == "personalization/mean"
    with open(path, newline="") as f:
        assert all(len(row) == len(manager.fieldnames) for row in csv.reader(f))  # ...all padded.
    inode, before = path.stat().st_ino, path.read_bytes()
    manager.add(_metrics(4), 4)  # No new column: appended under the wider header.
    manager.flush()
    assert path.stat().st_ino == inode and path.read_bytes().startswith(before)
    assert [r["personalization/mean"] for r in _rows(path)] == ["", "", "3.5", ""]
    assert sorted(os.listdir(tmp_path)) == ["m.csv"]  # No temporary left.


def test_rows_are_buffered_until_flush(tmp_path):
    path = tmp_path / "m.csv"
    manager = _manager(path)
    manager.add(_metrics(1), 1)
    manager.add(_metrics(2), 2)
    assert _rows(path) == []
    manager.flush()
    assert [r[KEY] for r in _rows(path)] == ["1", "2"]


class _CountingFile:
    """A file object that counts the characters read and written through it."""

    def __init__(self, file, counts):
        self._file, self._counts = file, counts

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._file.close()

    def __getattr__(self, name):
        return getattr(self._file, name)

    def __iter__(self):
        for line in self._file:
            self._counts["read"] += len(line)
            yield line

    def read(self, *args):
        data = self._file.read(*args)
        self._counts["read"] += len(data)
        return data

    def write(self, data):
        self._counts["written"] += len(data)
        return self._file.write(data)


@pytest.mark.parametrize("existing_rows", [10, 2000])
def test_work_per_release_does_not_grow_with_the_rows_already_written(
    tmp_path, monkeypatch, existing_rows
):
    path = tmp_path / "m.csv"
    _write_rows(path, range(1, existing_rows + 1))
    manager = _manager(path, keep_keys_up_to=existing_rows)  # Start-up reads the file once.
    counts = collections.Counter()
    monkeypatch.setattr(
        metrics_release,
        "open",
        lambda *a, **k: _CountingFile(builtins.open(*a, **k), counts),
        raising=False,
    )
    for key in range(existing_rows + 1, existing_rows + 11):
        manager.add(_metrics(key), key)
        manager.flush()
    assert counts["read"] == 0
    # Ten rows' worth of text, whatever the size of the file: ~50 characters a row.
    assert 10 * 30 < counts["written"] < 10 * 80
    assert len(_rows(path)) == existing_rows + 10


def test_a_durable_flush_fsyncs_the_appended_rows(tmp_path, monkeypatch):
    path = tmp_path / "m.csv"
    _write_rows(path, [1])
    manager = _manager(path)
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    manager.add(_metrics(2), 2)
    manager.flush()
    assert synced == []  # An ordinary append: a kill cannot lose it, only a power cut.
    manager.add(_metrics(3), 3)
    manager.flush(durable=True)
    assert len(synced) == 1
    manager.flush(durable=True)  # Nothing new to sync.
    assert len(synced) == 1


# ---------------------------------------------------------------------------------------------
# Start-up: repair and resume.
# ---------------------------------------------------------------------------------------------


def test_a_torn_last_row_is_dropped_at_start_up(tmp_path):
    path = tmp_path / "m.csv"
    _write_rows(path, range(1, 4))
    intact = path.read_bytes()
    with open(path, "ab") as f:
        f.write(b"4,0.25,40")  # A kill in the middle of an append: no line end.
    manager = _manager(path, keep_keys_up_to=10)
    assert path.read_bytes() == intact
    manager.add(_metrics(4), 4)
    manager.flush()
    rows = _rows(path)
    assert [r[KEY] for r in rows] == ["1", "2", "3", "4"]
    assert rows[-1]["client_work/num_examples"] == "40" and rows[-1]["clients/sampled"] == "3"


def test_a_temporary_left_by_a_killed_rewrite_is_removed_at_start_up(tmp_path):
    path = tmp_path / "m.csv"
    _write_rows(path, range(1, 3))
    (tmp_path / "m.csv.tmp4242").write_text("round_num,a\r\n1,")
    (tmp_path / "other.csv.tmp4242").write_text("not ours")
    _manager(path)
    assert sorted(os.listdir(tmp_path)) == ["m.csv", "other.csv.tmp4242"]


def test_resume_drops_the_rows_after_the_restored_round_once(tmp_path, monkeypatch):
    path = tmp_path / "m.csv"
    _write_rows(path, range(1, 8), evaluated=(6,))
    manager = _manager(path, keep_keys_up_to=4)
    assert [r[KEY] for r in _rows(path)] == ["1", "2", "3", "4"]
    assert "personalization/mean" in manager.fieldnames  # The header is kept.
    replaced = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda *a: (replaced.append(a), real_replace(*a)))
    for key in range(5, 9):
        manager.add(_metrics(key), key)
        manager.flush()
    assert replaced == []  # Rounds 5.. are appended: no more rewrites.
    assert [r[KEY] for r in _rows(path)] == [str(k) for k in range(1, 9)]


def test_an_intact_file_is_not_touched_at_start_up(tmp_path):
    path = tmp_path / "m.csv"
    _write_rows(path, range(1, 4))
    before = path.stat()
    _manager(path, keep_keys_up_to=3)
    _manager(path)
    after = path.stat()
    assert (after.st_ino, after.st_mtime_ns, after.st_size) == (
        before.st_ino,
        before.st_mtime_ns,
        before.st_size,
    )


def test_a_new_file_has_the_key_column_and_its_directory(tmp_path):
    path = tmp_path / "results" / "e" / "m.csv"
    _manager(path)
    assert path.read_bytes() == f"{KEY}\r\n".encode()


def test_a_key_at_or_below_an_earlier_one_replaces_the_rows_from_there(tmp_path):
    # What tff.program.CSVFileReleaseManager does; the program itself never releases a key twice.
    path = tmp_path / "m.csv"
    manager = _manager(path)
    for key in (1, 2, 3):
        manager.add(_metrics(key), key)
    manager.flush()
    manager.add(_metrics(4), 4)
    manager.add(_metrics(2), 2)  # Drops written rows 2, 3 and the buffered row 4.
    manager.flush()
    assert [r[KEY] for r in _rows(path)] == ["1", "2"]


def test_a_file_without_the_key_column_is_a_one_line_error(tmp_path):
    path = tmp_path / "m.csv"
    path.write_bytes(b"step,loss\r\n1,0.5\r\n")
    with pytest.raises(metrics_release.MetricsFileError, match=f"no {KEY} column") as raised:
        _manager(path)
    assert "\n" not in str(raised.value)
    assert path.read_bytes() == b"step,loss\r\n1,0.5\r\n"


def test_a_row_without_an_integer_key_is_an_error(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text(f"{KEY},loss\r\n1,0.5\r\nx,0.4\r\n")
    with pytest.raises(metrics_release.MetricsFileError, match="line 3"):
        _manager(path)


# ---------------------------------------------------------------------------------------------
# TensorBoard, and both together.
# ---------------------------------------------------------------------------------------------


def _events(logdir) -> dict[str, list[tuple[int, object]]]:
    """{tag: [(step, value)]} of every summary in `logdir`."""
    found = collections.defaultdict(list)
    for path in sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*"))):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                plugin = value.metadata.plugin_data.plugin_name
                array = tf.make_ndarray(value.tensor)
                found[value.tag].append((event.step, plugin, array.dtype.name, array.tolist()))
    return dict(found)


def test_tensorboard_summaries_are_those_tffs_manager_writes(tmp_path):
    value = collections.OrderedDict(
        loss=np.float32(0.25),
        count=np.int64(7),
        flag=True,
        weights=np.array([1.0, 2.0, 3.0], np.float32),
        name=b"not numeric",
        nested=collections.OrderedDict(mean=np.float64(0.125)),
    )
    ours = metrics_release.TensorBoardReleaseManager(str(tmp_path / "ours"))
    theirs = tff.program.TensorBoardReleaseManager(str(tmp_path / "theirs"))
    for step in (1, 2):
        ours.write(value, step)
        asyncio.run(theirs.release(value, step))
    ours.close()
    theirs._summary_writer.close()  # Its only handle on the events file.
    got, want = _events(tmp_path / "ours"), _events(tmp_path / "theirs")
    assert set(got) == set(want) == {"loss", "count", "flag", "weights", "nested/mean"}
    assert got == want
    assert got["count"] == [(1, "scalars", "float32", 7.0), (2, "scalars", "float32", 7.0)]
    assert got["weights"][0][1] == "histograms"


def test_release_writes_both_outputs_at_once(tmp_path):
    manager = metrics_release.MetricsReleaseManager(
        str(tmp_path / "m.csv"), str(tmp_path / "logs"), key_fieldname=KEY
    )
    assert isinstance(manager, tff.program.ReleaseManager)
    asyncio.run(manager.release(_metrics(1), 1))
    assert [r[KEY] for r in _rows(tmp_path / "m.csv")] == ["1"]
    manager.release_sync(_metrics(2), 2)
    assert len(_rows(tmp_path / "m.csv")) == 1  # Buffered until flush.
    manager.close()
    assert [r[KEY] for r in _rows(tmp_path / "m.csv")] == ["1", "2"]
    assert [step for step, *_ in _events(tmp_path / "logs")["client_work/train_loss"]] == [1, 2]


def test_no_event_loop_is_started_by_the_synchronous_methods(tmp_path, monkeypatch):
    def no_loop(*args, **kwargs):
        raise AssertionError("an event loop was started")

    monkeypatch.setattr(asyncio, "run", no_loop)
    monkeypatch.setattr(asyncio, "new_event_loop", no_loop)
    manager = metrics_release.MetricsReleaseManager(
        str(tmp_path / "m.csv"), str(tmp_path / "logs"), key_fieldname=KEY
    )
    for key in range(1, 4):
        manager.release_sync(_metrics(key), key)
        manager.flush()
    manager.close()
    assert len(_rows(pathlib.Path(tmp_path / "m.csv"))) == 3
