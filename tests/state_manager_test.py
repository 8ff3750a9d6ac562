"""Tests of `mfl_tff.training.state_manager`: every dtype and string round-trips in its structure,
saves are atomic and fsynced, `keep_total` prunes, and files that are damaged, foreign, of another
structure or of the earlier SavedModel format are refused with a reason."""

from __future__ import annotations

import asyncio
import collections
import os

import attrs
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_federated as tff

from mfl_tff.training import state_manager

PREFIX = "program_state_"
NUMERIC_DTYPES = (
    tf.bool,
    tf.int8,
    tf.int16,
    tf.int32,
    tf.int64,
    tf.uint8,
    tf.uint16,
    tf.uint32,
    tf.uint64,
    tf.bfloat16,
    tf.float16,
    tf.float32,
    tf.float64,
    tf.complex64,
    tf.complex128,
)


@attrs.define
class _Record:
    zeta: object
    alpha: object


def _manager(tmp_path, keep_total: int = 0) -> state_manager.ArrayProgramStateManager:
    return state_manager.ArrayProgramStateManager(
        str(tmp_path / "checkpoints"), prefix=PREFIX, keep_total=keep_total
    )


def _state():
    """Every numeric dtype (scalar and array), strings of every kind, nested containers."""
    rng = np.random.default_rng(0)
    numeric = collections.OrderedDict()
    for dtype in NUMERIC_DTYPES:
        array = rng.normal(size=(2, 3)) * 100
        if dtype.is_complex:
            array = array + 1j * rng.normal(size=(2, 3))
        numeric[dtype.name] = array.astype(dtype.as_numpy_dtype)
        numeric[dtype.name + "_scalar"] = dtype.as_numpy_dtype(array[0, 0])
    strings = collections.OrderedDict(
        # What a tf.string scalar tensor reads as (the DP aggregator's state has one).
        scalar=b"DpEvent",
        nul_ended=b"ab\x00\x00",
        empty=b"",
        array=np.array([[b"x", b"\x00y\xff"], [b"", b"long" * 100]], dtype=object),
        text="caf\u00e9",
    )
    return (
        7,
        collections.OrderedDict(
            numeric=numeric,
            strings=strings,
            nested=[(), _Record(zeta=np.zeros((0, 4), np.float32), alpha=np.int32(3))],
        ),
    )


def _template(state):
    return tf.nest.map_structure(lambda _: None, state)


def _assert_equal(got, want):
    tf.nest.assert_same_structure(got, want, check_types=True)
    for g, w in zip(tf.nest.flatten(got), tf.nest.flatten(want)):
        if isinstance(w, (bytes, str, int)):
            assert type(g) is type(w) or isinstance(g, np.integer), (g, w)
            assert g == w
            continue
        w = np.asarray(w)
        assert np.ndim(g) == w.ndim and np.shape(g) == w.shape
        assert np.asarray(g).dtype == w.dtype, (np.asarray(g).dtype, w.dtype)
        if w.dtype == object:
            assert np.asarray(g).tolist() == w.tolist()
        else:
            assert np.asarray(g).tobytes() == w.tobytes()  # Bit for bit (NaN-safe).


def test_every_dtype_and_string_round_trips_in_its_structure(tmp_path):
    manager = _manager(tmp_path)
    state = _state()
    manager.write(state, 7)
    loaded = manager.read(7, _template(state))
    _assert_equal(loaded, state)
    # Scalars read back as numpy scalars (as `tf.Tensor.numpy()` gives them), arrays as arrays.
    numeric = loaded[1]["numeric"]
    assert isinstance(numeric["float32_scalar"], np.float32)
    assert numeric["bfloat16"].dtype == tf.bfloat16.as_numpy_dtype
    assert isinstance(loaded[1]["strings"]["scalar"], bytes)
    assert isinstance(loaded[1]["nested"][1], _Record)
    assert int(loaded[0]) == 7


def test_tensors_and_a_tensor_spec_template(tmp_path):
    manager = _manager(tmp_path)
    state = collections.OrderedDict(
        w=tf.constant([[1.0, 2.0]]), s=tf.constant(b"name"), n=tf.constant(3)
    )
    manager.write(state, 1)
    template = tf.nest.map_structure(tf.TensorSpec.from_tensor, state)
    loaded = manager.read(1, template)
    assert loaded["w"].tolist() == [[1.0, 2.0]] and loaded["s"] == b"name" and loaded["n"] == 3


def test_the_async_interface(tmp_path):
    manager = _manager(tmp_path)
    assert isinstance(manager, tff.program.ProgramStateManager)
    assert asyncio.run(manager.get_versions()) is None
    assert asyncio.run(manager.load_latest(None)) == (None, 0)
    asyncio.run(manager.save(collections.OrderedDict(a=np.int32(1)), 3))
    asyncio.run(manager.save(collections.OrderedDict(a=np.int32(2)), 5))
    assert asyncio.run(manager.get_versions()) == [3, 5]
    structure = collections.OrderedDict(a=None)
    assert asyncio.run(manager.load(3, structure)) == {"a": 1}
    assert asyncio.run(manager.load_latest(structure)) == ({"a": 2}, 5)
    with pytest.raises(tff.program.ProgramStateNotFoundError):
        asyncio.run(manager.load(4, structure))
    with pytest.raises(tff.program.ProgramStateExistsError):
        asyncio.run(manager.save(collections.OrderedDict(a=np.int32(9)), 5))


@pytest.mark.parametrize("keep_total, kept", [(0, [1, 2, 3, 4, 5]), (2, [4, 5]), (1, [5])])
def test_keep_total_keeps_the_most_recent_versions(tmp_path, keep_total, kept):
    manager = _manager(tmp_path, keep_total=keep_total)
    for version in range(1, 6):
        manager.write((version, np.zeros(3)), version)
    assert manager.versions() == kept
    assert sorted(os.listdir(tmp_path / "checkpoints")) == [f"{PREFIX}{v}" for v in kept]


def test_a_save_is_fsynced_and_renamed_into_place(tmp_path, monkeypatch):
    manager = _manager(tmp_path)
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd)))
    monkeypatch.setattr(
        os,
        "replace",
        lambda a, b: (events.append(("replace", os.path.basename(b))), real_replace(a, b)),
    )
    manager.write((1, np.ones(2)), 1)
    # The data reaches the disk before the name does: no power cut can leave a torn version.
    assert events == ["fsync", ("replace", f"{PREFIX}1")]


def test_a_kill_during_a_save_leaves_the_earlier_versions_and_its_temporary_is_removed(
    tmp_path, monkeypatch
):
    manager = _manager(tmp_path)
    manager.write((1, np.ones(2)), 1)

    def killed(file, **arrays):
        file.write(b"PK\x03\x04 torn")
        raise KeyboardInterrupt  # Stands for the kill: the temporary is written, not renamed.

    monkeypatch.setattr(np, "savez", killed)
    with pytest.raises(KeyboardInterrupt):
        manager.write((2, np.ones(2)), 2)
    monkeypatch.undo()
    directory = tmp_path / "checkpoints"
    # A real kill skips the clean-up that the exception ran: leave a temporary as it would.
    (directory / f".{PREFIX}2.tmp99999").write_bytes(b"PK\x03\x04 torn")
    assert manager.versions() == [1]
    manager.write((2, np.ones(2)), 2)
    assert sorted(os.listdir(directory)) == [f"{PREFIX}1", f"{PREFIX}2"]


def test_reading_creates_nothing(tmp_path):
    manager = _manager(tmp_path)
    assert manager.versions() == []
    with pytest.raises(tff.program.ProgramStateNotFoundError):
        manager.read(1, None)
    assert not (tmp_path / "checkpoints").exists()


def test_another_structure_is_refused_with_the_first_difference(tmp_path):
    manager = _manager(tmp_path)
    manager.write(collections.OrderedDict(a=np.ones(2), b=np.ones(3)), 1)
    with pytest.raises(state_manager.StructureMismatchError, match="holds 2 tensors where this"):
        manager.read(1, collections.OrderedDict(a=None, b=None, c=None))
    with pytest.raises(state_manager.StructureMismatchError, match="'b' where this state has 'x'"):
        manager.read(1, collections.OrderedDict(a=None, x=None))


@pytest.mark.parametrize(
    "damage, reason",
    [
        (lambda data: data[: len(data) // 2], "damaged or not a state file"),
        (lambda data: b"", "damaged or not a state file"),
        (lambda data: data[:-30] + b"\x00" * 30, "damaged or not a state file"),
    ],
)
def test_a_damaged_file_is_refused_with_a_one_line_reason(tmp_path, damage, reason):
    manager = _manager(tmp_path)
    manager.write((1, np.arange(1000.0)), 1)
    path = manager.path(1)
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(damage(data))
    with pytest.raises(state_manager.StateFileError, match=reason) as raised:
        manager.read(1, (None, None))
    assert "\n" not in str(raised.value) and raised.value.path == path


def test_a_flipped_byte_in_an_array_is_caught_by_the_zip_checksum(tmp_path):
    manager = _manager(tmp_path)
    manager.write((1, np.arange(1000.0)), 1)
    path = manager.path(1)
    with open(path, "rb") as f:
        data = bytearray(f.read())
    data[len(data) // 2] ^= 0xFF  # Inside the 8 kB array.
    with open(path, "wb") as f:
        f.write(bytes(data))
    with pytest.raises(state_manager.StateFileError, match="damaged"):
        manager.read(1, (None, None))


def test_a_foreign_npz_file_is_refused(tmp_path):
    directory = tmp_path / "checkpoints"
    directory.mkdir()
    with open(directory / f"{PREFIX}4", "wb") as f:
        np.savez(f, weights=np.ones(3))
    with pytest.raises(state_manager.StateFileError, match="not a mfl_tff.program_state"):
        _manager(tmp_path).read(4, None)


def test_a_saved_model_directory_of_earlier_versions_is_refused(tmp_path):
    directory = tmp_path / "checkpoints"
    old = tff.program.FileProgramStateManager(str(directory), prefix=PREFIX)
    asyncio.run(old.save((3, np.ones(2, np.float32)), 3))
    manager = _manager(tmp_path)
    assert manager.versions() == [3]
    with pytest.raises(state_manager.StateFileError, match="SavedModel directory"):
        manager.read(3, (None, None))


def test_a_leaf_that_is_no_tensor_is_refused_before_writing(tmp_path):
    manager = _manager(tmp_path)
    with pytest.raises(TypeError, match="'1/a'"):
        manager.write((1, {"a": object()}), 1)
    with pytest.raises(TypeError, match="'1/b'"):
        manager.write((1, {"b": np.array([b"x", 2], dtype=object)}), 1)
    assert manager.versions() == []


def test_read_flat_names_each_leaf_by_its_path(tmp_path):
    manager = _manager(tmp_path)
    manager.write((4, collections.OrderedDict(w=[np.ones(2), np.zeros(1)], name=b"dp")), 4)
    named = state_manager.read_flat(manager.path(4))
    assert [name for name, _ in named] == ["0", "1/name", "1/w/0", "1/w/1"]
    assert named[1][1] == b"dp" and named[2][1].tolist() == [1.0, 1.0]
