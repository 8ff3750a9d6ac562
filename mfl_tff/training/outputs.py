"""An experiment's output files: where they go, checks that write nothing, atomic writes.

One experiment writes (docs/architecture.md, "File contracts"), under `ROOT = root_output_dir`:

* `ROOT/results/E/experiment.metrics.csv`: metrics per round (`mfl_tff.training.program`).
* `ROOT/results/E/hparams.csv`: the run's settings, one column each (`write_hparams`).
* `ROOT/results/E/personalization.json`: the final held-out evaluation (`write_json`).
* `ROOT/checkpoints/E/`: program state (`mfl_tff.training.program`).
* `ROOT/logdir/E/`: TensorBoard.

Bad input must not damage what earlier runs wrote, so binaries run every check here
(`check_output_dirs`, `hparams_differences`) before writing anything, and every file here is
written to a temporary name and renamed over the old one, so a kill leaves the old or the new file,
never half of one. This module imports no TensorFlow.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import tempfile
from collections.abc import Callable, Collection, Mapping
from typing import Any, Optional


class ProgramError(Exception):
    """An expected failure the user can fix (bad output directory, settings file, checkpoint).

    Its message is one line naming the file and the fix; binaries print it without a traceback.
    """


class OutputDirError(ProgramError):
    """An output directory cannot be created or written."""


@dataclasses.dataclass(frozen=True)
class OutputPaths:
    """Where one experiment's files go (docs/architecture.md, "File contracts")."""

    root_output_dir: str
    experiment_name: str

    @property
    def results_dir(self) -> str:
        return os.path.join(self.root_output_dir, "results", self.experiment_name)

    @property
    def metrics_csv(self) -> str:
        return os.path.join(self.results_dir, "experiment.metrics.csv")

    @property
    def hparams_csv(self) -> str:
        return os.path.join(self.results_dir, "hparams.csv")

    @property
    def personalization_json(self) -> str:
        return os.path.join(self.results_dir, "personalization.json")

    @property
    def worker_log(self) -> str:
        """The TFF worker's stdout and stderr (kept out of ours)."""
        return os.path.join(self.results_dir, "worker.log")

    @property
    def checkpoint_dir(self) -> str:
        return os.path.join(self.root_output_dir, "checkpoints", self.experiment_name)

    @property
    def logdir(self) -> str:
        """TensorBoard's directory."""
        return os.path.join(self.root_output_dir, "logdir", self.experiment_name)

    def directories(self) -> tuple[str, str, str]:
        return (self.results_dir, self.checkpoint_dir, self.logdir)


def check_output_dirs(paths: OutputPaths) -> None:
    """Raises OutputDirError unless every output directory exists or can be created.

    Writes nothing the user could lose: at most an empty probe file, removed at once, in the
    nearest existing ancestor of a missing directory (permission bits alone do not tell, for
    example for root on a read-only file system).
    """
    for directory in paths.directories():
        existing = os.path.abspath(directory)
        while not os.path.lexists(existing):
            existing = os.path.dirname(existing)
        if not os.path.isdir(existing):
            raise OutputDirError(
                f"cannot create {directory}: {existing} exists and is not a directory; "
                "choose another output directory."
            )
        try:
            with tempfile.TemporaryFile(dir=existing):
                pass
        except OSError as e:
            raise OutputDirError(
                f"cannot write to {existing} ({e.strerror or e}); choose a writable output "
                "directory."
            ) from None


def _format_hparam(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(value)


def read_hparams(path: str) -> Optional[dict[str, str]]:
    """The settings saved by `write_hparams` (strings), or None if there is no such file.

    Raises:
      ProgramError: If the file exists but is not a two-line CSV.
    """
    if not os.path.exists(path):
        return None
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except (OSError, csv.Error, UnicodeDecodeError) as e:
        raise ProgramError(f"cannot read {path} ({e}); restore it or remove it.") from None
    if len(rows) != 1:
        raise ProgramError(
            f"{path} should hold one row of settings, it holds {len(rows)}; restore it or "
            "remove it."
        )
    return dict(rows[0])


def hparams_differences(
    path: str, hparams: Mapping[str, Any], may_differ: Collection[str] = ()
) -> list[tuple[str, str, str]]:
    """Settings whose saved value in `path` differs from `hparams`: `[(name, saved, current)]`.

    Settings missing on either side are not compared (they come from another version of the
    binary), nor are those in `may_differ` (for example the number of rounds, which a user may
    raise to train further). No file: no differences.
    """
    saved = read_hparams(path)
    if saved is None:
        return []
    differences = []
    for name, value in hparams.items():
        if name in may_differ or name not in saved:
            continue
        current = _format_hparam(value)
        if saved[name] != current:
            differences.append((name, saved[name], current))
    return differences


def write_hparams(path: str, hparams: Mapping[str, Any]) -> None:
    """Writes `hparams` as a CSV with one column per setting and one row of values, atomically."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    _write_atomically(
        path,
        lambda f: _write_csv_row(f, {k: _format_hparam(v) for k, v in hparams.items()}),
    )


def _write_csv_row(f, row: Mapping[str, str]) -> None:
    writer = csv.DictWriter(f, fieldnames=list(row))
    writer.writeheader()
    writer.writerow(row)


def _write_atomically(path: str, write: Callable[[Any], None]) -> None:
    """Writes through `write(file)` to a temporary file next to `path`, then renames it.

    The temporary file is opened normally (not with `mkstemp`, which makes it private), so the
    result has the permissions every other output file gets from the umask.
    """
    temp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(temp, "w", newline="") as f:
            write(f)
        os.replace(temp, path)
    except BaseException:
        if os.path.exists(temp):
            os.remove(temp)
        raise


def write_json(path: str, document: Mapping[str, Any]) -> None:
    """Writes `document` as strict JSON (non-finite numbers become null), atomically."""

    def finite(value):
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, Mapping):
            return {k: finite(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [finite(v) for v in value]
        return value

    os.makedirs(os.path.dirname(path), exist_ok=True)
    _write_atomically(
        path, lambda f: f.write(json.dumps(finite(document), indent=2, allow_nan=False) + "\n")
    )
