"""Program state as flat arrays in one `.npz` file per version, written atomically.

`ArrayProgramStateManager` implements `tff.program.ProgramStateManager`. TFF 0.87's
`tff.program.FileProgramStateManager` saves through `tf.saved_model`, which traces a module at
every save (a third of a second for a small model); this manager writes the state's leaves with
`numpy.savez` instead, in milliseconds:

* `ROOT/PREFIX<version>`: a zip of `.npy` members (no pickle): each leaf of the flattened state,
  its path in the structure, its dtype name, and a format tag. The file name has no extension so
  that a version's file keeps the name the SavedModel directory had.
* A save writes `ROOT/.PREFIX<version>.tmp<pid>`, fsyncs it and renames it to the final name, so
  a kill (or a power cut) at any moment leaves either the complete new version or none of it; a
  temporary left behind by a kill is removed by the next save. The directory is not fsynced (half
  the cost of a save): a power cut may undo the last rename, which leaves the previous version,
  as a kill just before the rename would.

Loading maps the saved leaves onto a structure template (`load(version, structure)`, as the
interface asks), in `dm-tree` order: mappings by sorted key, sequences and `attrs` classes in
order. Every numeric dtype round-trips (bfloat16 too, whose `.npy` form is raw bytes), and so do
string tensors (bytes, stored as concatenated bytes plus lengths, so NULs and any length survive)
and Python `str` leaves.
"""

from __future__ import annotations

import os
import re
import zipfile
from typing import Any, Optional

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff
import tree

FORMAT = "mfl_tff.program_state.v1"
_FORMAT_KEY = "__format__"
_PATHS_KEY = "__paths__"
_DTYPES_KEY = "__dtypes__"
# Leaf kinds, in the dtype list: numeric arrays keep their dtype name; these mark encoded strings.
_BYTES, _TEXT = "<bytes>", "<text>"


class StateFileError(Exception):
    """A saved version cannot be loaded (damaged, not written by this manager, another structure).

    Attributes:
      path: The file.
      reason: What is wrong, in a few words (no path; one line).
    """

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


class StructureMismatchError(StateFileError):
    """A saved version holds another structure than the template (another model or algorithm)."""


def _path_name(path: tuple) -> str:
    return "/".join(map(str, path)) or "<root>"


def _encode_strings(values: np.ndarray, encode) -> tuple[np.ndarray, np.ndarray]:
    """`(bytes, lengths)`: the elements' bytes concatenated, and each element's length (shape kept).

    `.npy` files would hold strings as fixed-width `S`/`U` arrays, which drop trailing NULs, or
    as pickled objects, which loading must not run; bytes plus lengths keep any string exactly.
    """
    parts = [encode(v) for v in values.reshape(-1).tolist()]
    data = np.frombuffer(b"".join(parts), dtype=np.uint8)
    lengths = np.array([len(p) for p in parts], dtype=np.int64).reshape(values.shape)
    return data, lengths


def _decode_strings(data: np.ndarray, lengths: np.ndarray, decode) -> Any:
    """The inverse of `_encode_strings`: a scalar for shape (), else an object array."""
    raw = data.tobytes()
    ends = np.cumsum(lengths.reshape(-1))
    if ends.size and ends[-1] != len(raw):
        raise ValueError(f"string lengths sum to {ends[-1]}, the data has {len(raw)} bytes")
    starts = np.concatenate([[0], ends[:-1]]).astype(np.int64)
    items = [decode(raw[s:e]) for s, e in zip(starts, ends)]
    if lengths.ndim == 0:
        return items[0]
    out = np.empty(len(items), dtype=object)
    out[:] = items
    return out.reshape(lengths.shape)


def _numpy_dtype(name: str) -> np.dtype:
    try:
        return np.dtype(name)
    except TypeError:  # bfloat16 and TF's other extension types are known to TF, not numpy.
        return np.dtype(tf.as_dtype(name).as_numpy_dtype)


def _is_tensor_dtype(dtype: np.dtype) -> bool:
    if dtype.kind in "biufc":
        return True
    try:  # bfloat16 and TF's other extension dtypes (numpy kind "V").
        tf_dtype = tf.as_dtype(dtype)
    except TypeError:
        return False
    return tf_dtype.is_floating or tf_dtype.is_integer or tf_dtype.is_complex


def _as_numpy(value: Any) -> Any:
    """Leaves as numpy values, the way TF tensors read back (`tf.Tensor.numpy()`)."""
    if isinstance(value, tf.Tensor):
        return value.numpy()
    return value


class ArrayProgramStateManager(tff.program.ProgramStateManager):
    """A `tff.program.ProgramStateManager` writing each version as one atomic `.npz` file.

    Versions are non-negative integers (the training program uses round numbers). The
    synchronous `versions`, `read` and `write` do the work; the interface's `async` methods call
    them, so a synchronous round loop needs no event loop per save.
    """

    def __init__(self, root_dir: str, prefix: str = "program_state_", keep_total: int = 0):
        """Manages versions in `root_dir` (created by the first save, not here).

        Args:
          root_dir: The directory of the versions.
          prefix: File names are `prefix` + version.
          keep_total: After each save, only this many most recent versions are kept (0: all).

        Raises:
          ValueError: If `root_dir` is empty or `keep_total` negative.
        """
        if not root_dir:
            raise ValueError("root_dir must not be empty.")
        if keep_total < 0:
            raise ValueError(f"keep_total must be >= 0, got {keep_total}.")
        self._root_dir = os.fspath(root_dir)
        self._prefix = prefix
        self._keep_total = keep_total
        self._name = re.compile(re.escape(prefix) + r"(\d+)")
        self._temporary = re.compile(r"\." + re.escape(prefix) + r"\d+\.tmp\d+")

    def path(self, version: int) -> str:
        """The file of `version` (whether or not it exists)."""
        return os.path.join(self._root_dir, f"{self._prefix}{int(version)}")

    def versions(self) -> list[int]:
        """The saved versions, ascending (none, or no directory: empty). Reads only."""
        try:
            names = os.listdir(self._root_dir)
        except FileNotFoundError:
            return []
        found = (self._name.fullmatch(name) for name in names)
        return sorted(int(m.group(1)) for m in found if m)

    # -- tff.program.ProgramStateManager --------------------------------------------------------

    async def get_versions(self) -> Optional[list[int]]:
        """The saved versions, ascending, or None if there are none (the interface's contract)."""
        return self.versions() or None

    async def load(self, version: int, structure: Any) -> Any:
        """`read(version, structure)`; raises `tff.program.ProgramStateNotFoundError` if absent."""
        return self.read(version, structure)

    async def save(self, program_state: Any, version: int) -> None:
        """Materializes value references in `program_state`, then `write`s it."""
        materialized = await tff.program.materialize_value(program_state)
        # The file is small and written in milliseconds: the event loop may wait for it.
        self.write(materialized, version)

    # -- The work. ---------------------------------------------------------------------------

    def write(self, program_state: Any, version: int) -> None:
        """Saves `program_state` (materialized: numpy values, tensors, strings) as `version`.

        Then removes versions beyond `keep_total` and temporaries left by killed saves.

        Raises:
          tff.program.ProgramStateExistsError: If `version` is already saved.
          TypeError: If a leaf is neither numeric nor a string.
        """
        final = self.path(version)
        if os.path.exists(final):
            raise tff.program.ProgramStateExistsError(version=int(version), path=self._root_dir)
        arrays, paths, dtypes = {}, [], []
        for i, (path, leaf) in enumerate(tree.flatten_with_path(program_state)):
            paths.append(_path_name(path))
            dtypes.append(self._put_leaf(arrays, str(i), _as_numpy(leaf), paths[-1]))
        arrays[_FORMAT_KEY] = np.array(FORMAT)
        arrays[_PATHS_KEY] = np.array(paths, dtype=str)
        arrays[_DTYPES_KEY] = np.array(dtypes, dtype=str)
        os.makedirs(self._root_dir, exist_ok=True)
        temporary = os.path.join(self._root_dir, f".{self._prefix}{int(version)}.tmp{os.getpid()}")
        try:
            with open(temporary, "wb") as f:
                np.savez(f, **arrays)
                f.flush()
                os.fsync(f.fileno())
            os.replace(temporary, final)
        except BaseException:
            if os.path.exists(temporary):
                os.remove(temporary)
            raise
        self._remove_old()

    def read(self, version: int, structure: Any) -> Any:
        """The state saved as `version`, in the structure of `structure`.

        Args:
          version: A saved version.
          structure: A template with the saved state's structure (its leaves are not read;
            `tf.TensorSpec`s are typical).

        Raises:
          tff.program.ProgramStateNotFoundError: If `version` is not saved.
          StateFileError: If the file is damaged, not written by this manager, or holds another
            structure than `structure`.
        """
        path = self.path(version)
        if not os.path.exists(path):
            raise tff.program.ProgramStateNotFoundError(int(version))
        named = read_flat(path)
        expected = tree.flatten_with_path(structure)
        if len(named) != len(expected):
            raise StructureMismatchError(
                path, f"it holds {len(named)} tensors where this state has {len(expected)}"
            )
        for i, ((want_path, _), (saved_path, _)) in enumerate(zip(expected, named)):
            if _path_name(want_path) != saved_path:
                raise StructureMismatchError(
                    path,
                    f"tensor {i} is {saved_path!r} where this state has {_path_name(want_path)!r}",
                )
        return tree.unflatten_as(structure, [leaf for _, leaf in named])

    # -- Helpers. ----------------------------------------------------------------------------

    @staticmethod
    def _put_leaf(arrays: dict, key: str, leaf: Any, name: str) -> str:
        """Adds `leaf`'s members to `arrays` and returns its dtype entry."""
        if isinstance(leaf, (bytes, str)):
            # Not `np.asarray`: its fixed-width `S`/`U` array would drop trailing NULs.
            value = np.empty((), dtype=object)
            value[()] = leaf
        else:
            value = np.asarray(leaf)
        if value.dtype.kind in "SUO":
            items = value.reshape(-1).tolist()
            if all(isinstance(v, bytes) for v in items):
                kind, encode = _BYTES, bytes
            elif all(isinstance(v, str) for v in items):
                kind, encode = _TEXT, lambda s: s.encode("utf-8")
            else:
                raise TypeError(f"state leaf {name!r} is a {type(leaf).__name__}, not a tensor")
            arrays[key + ".data"], arrays[key + ".lengths"] = _encode_strings(value, encode)
            return kind
        if not _is_tensor_dtype(value.dtype):
            raise TypeError(f"state leaf {name!r} has dtype {value.dtype}, not a tensor dtype")
        arrays[key] = value
        return value.dtype.name

    def _remove_old(self) -> None:
        for name in os.listdir(self._root_dir):
            if self._temporary.fullmatch(name):
                os.remove(os.path.join(self._root_dir, name))
        if self._keep_total:
            for version in self.versions()[: -self._keep_total]:
                path = self.path(version)
                if os.path.isdir(path):  # An earlier format's SavedModel directory.
                    tf.io.gfile.rmtree(path)
                else:
                    os.remove(path)


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text[:200]


def read_flat(path: str) -> list[tuple[str, Any]]:
    """`[(name, leaf), ...]` of a state file, in saved order, without a structure template.

    Names are the leaves' paths in the saved structure (`'1/global_model_weights/trainable/0'`);
    leaves are what `ArrayProgramStateManager.read` returns. For inspection and tests.

    Raises:
      StateFileError: If the file is damaged or not a state file (or a SavedModel directory).
    """
    if os.path.isdir(path):
        raise StateFileError(
            path,
            "it is a SavedModel directory (tff.program.FileProgramStateManager), the format of "
            "earlier versions of mfl_tff, which this one does not read",
        )
    try:
        with np.load(path, allow_pickle=False) as saved:
            members = {name: saved[name] for name in saved.files}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as e:
        raise StateFileError(path, f"it is damaged or not a state file ({_one_line(e)})") from None
    tag = members.get(_FORMAT_KEY)
    if tag is None or tag.shape != () or str(tag) != FORMAT:
        raise StateFileError(path, f"it is not a {FORMAT} state file")
    paths, dtypes = members.get(_PATHS_KEY), members.get(_DTYPES_KEY)
    if paths is None or dtypes is None or paths.shape != dtypes.shape or paths.ndim != 1:
        raise StateFileError(path, "it is damaged (its table of tensors is missing)")
    named = []
    for i, (name, dtype) in enumerate(zip(paths.tolist(), dtypes.tolist())):
        try:
            named.append((name, _get_leaf(members, str(i), dtype)))
        except (KeyError, ValueError, TypeError) as e:
            raise StateFileError(path, f"tensor {name!r} is damaged ({_one_line(e)})") from None
    return named


def _get_leaf(members: dict, key: str, dtype: str) -> Any:
    """The leaf stored under `key`, as `tf.Tensor.numpy()` would give it."""
    if dtype in (_BYTES, _TEXT):
        decode = (lambda b: b.decode("utf-8")) if dtype == _TEXT else bytes
        return _decode_strings(members[key + ".data"], members[key + ".lengths"], decode)
    value = members[key]
    want = _numpy_dtype(dtype)
    if value.dtype != want:  # bfloat16 and the like load as raw bytes (`|V2`).
        value = value.view(want)
    return value[()] if value.ndim == 0 else value
