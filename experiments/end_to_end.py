"""The training program's per-round cost as a user pays it, for `experiments/benchmark.py`.

`python -m experiments.train` runs as a child process with its default checkpoint and release
settings, so checkpoints, metric releases and packing are all included. The steady cost per
round is read inside one run, between two of its progress lines: the run resumes from a
checkpoint, trains `short + span` rounds, and when the lines of rounds `start + short` and
`start + short + span` arrive, the wall clock and the CPU times of the driver and its worker are
read, so

    ms per round = (time at line start + short + span - time at line start + short) / span,

and the same for the driver's and the worker's CPU. Start-up, tracing, compilation (tens of
seconds, and not the same twice, for a 10-round mfl call), the final evaluation and shut-down all
fall outside the span. To measure at round ~50,000 without running
50,000 rounds, the checkpoint is re-labelled as round 50,000 and the metrics CSV is seeded with
50,000 rows: what could grow with the round number (the CSV, the checkpoint directory, the
round counter) is then as large as in a real run of that length.
"""

from __future__ import annotations

import collections
import contextlib
import csv
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Optional

import numpy as np
import psutil
from absl import flags as absl_flags

from mfl_tff.training import program

_PROGRESS = re.compile(r"round\s+(\d+)/\d+")


def _cpu_s(process: psutil.Process) -> tuple[float, float]:
    """CPU seconds so far of `process` and of its worker_binary children."""
    times = process.cpu_times()
    worker = 0.0
    for child in process.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if child.name() == "worker_binary":
                child_times = child.cpu_times()
                worker += child_times.user + child_times.system
    return times.user + times.system, worker


def span_marks(command: Sequence[str], cwd: str, rounds: Sequence[int]) -> dict:
    """Runs `command` (a training run) and reads the clock and CPU at its progress `rounds`.

    Returns:
      `{round: (wall_s, driver_cpu_s, worker_cpu_s)}`, read when the progress line of that
      round arrived.

    Raises:
      RuntimeError: If the run fails or never prints the progress line of one of `rounds`.
    """
    # Unbuffered, so that a progress line arrives when it is printed.
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONUNBUFFERED="1")
    child = subprocess.Popen(
        command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    process = psutil.Process(child.pid)
    marks, tail = {}, collections.deque(maxlen=40)
    for line in child.stdout:
        tail.append(line)
        match = _PROGRESS.match(line)
        if match and int(match.group(1)) in rounds and int(match.group(1)) not in marks:
            marks[int(match.group(1))] = (time.perf_counter(), *_cpu_s(process))
    child.wait()
    if child.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({child.returncode}): {''.join(tail)}")
    missing = sorted(set(rounds) - set(marks))
    if missing:
        raise RuntimeError(f"{' '.join(command)} printed no progress line for rounds {missing}.")
    return marks


def bool_flag(flags: Sequence[str], name: str) -> Optional[bool]:
    """Boolean flag `--name` as absl reads it from `flags` (`--name`, `--noname`,
    `--name=VALUE`; the last one wins), or None if it is not among them."""
    value, parser = None, absl_flags.BooleanParser()
    for flag in flags:
        given, has_value, text = flag.lstrip("-").partition("=")
        if given == name:
            value = parser.parse(text) if has_value else True
        elif given == f"no{name}" and not has_value:
            value = False
    return value


def _copy_experiment(root: str, source: str, target: str) -> None:
    for part in ("results", "checkpoints", "logdir"):
        src = os.path.join(root, part, source)
        if os.path.exists(src):
            shutil.copytree(src, os.path.join(root, part, target))


def _relabel_checkpoint(checkpoint_dir: str, to_round: int) -> None:
    """The latest checkpoint re-labelled as round `to_round` (its saved round number too)."""
    latest = program.checkpoint_rounds(checkpoint_dir)[-1]
    source = os.path.join(checkpoint_dir, f"{program.CHECKPOINT_PREFIX}{latest}")
    with np.load(source) as saved:
        arrays = {key: saved[key] for key in saved.files}
    # Leaf 0 of the saved `(round_num, state)` is the round number.
    arrays["0"] = np.asarray(to_round, dtype=arrays["0"].dtype)
    target = os.path.join(checkpoint_dir, f"{program.CHECKPOINT_PREFIX}{to_round}")
    with open(target, "wb") as f:
        np.savez(f, **arrays)
    os.remove(source)


def _seed_metrics_csv(path: str, rows: int) -> None:
    """Extends the metrics CSV to `rows` rounds by repeating its last row."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        fields, existing = reader.fieldnames, list(reader)
    last = existing[-1]
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        for round_num in range(len(existing) + 1, rows + 1):
            writer.writerow(dict(last, round_num=round_num))


def measure(
    *,
    task: str,
    algorithm: str,
    workdir: str,
    flags: Sequence[str] = (),
    warm_rounds: int = 100,
    short: int = 20,
    span: int = 400,
    far_round: int = 50_000,
) -> dict:
    """Steady cost per round of the training program near round `warm_rounds` and `far_round`.

    The runs print a progress line every round (the default `--rounds_per_log`); `flags` that
    change it must keep lines at the span's ends, which `short` and `span` rounds after a
    resume are.

    The runs stand for a run of `far_round` rounds and make its choices: unless `flags` set
    them, they fuse their rounds and vectorize their cohorts when the program would for
    `far_round` rounds (`program.default_fuse_rounds`, `program.default_vectorize_cohorts`),
    not for the `2 * short + span` rounds each of them trains.

    Returns:
      `{"near": {...}, "far": {...}, "fused": bool, "vectorized": bool}`: each span with
      `round`, `ms_per_round`, `driver_cpu_ms_per_round` and `worker_cpu_ms_per_round`; `fused`
      and `vectorized` say what the runs did.
    """
    root = os.path.join(workdir, f"{task}_{algorithm}")
    shutil.rmtree(root, ignore_errors=True)
    base = [sys.executable, "-m", "experiments.train", f"--task={task}"]
    base += [f"--algorithm={algorithm}", f"--root_output_dir={root}", "--rounds_per_eval=0"]
    chosen = collections.OrderedDict()
    for key, name, default in (
        ("fused", "fuse_rounds", program.default_fuse_rounds),
        ("vectorized", "vectorize_cohorts", program.default_vectorize_cohorts),
    ):
        explicit = bool_flag(flags, name)
        chosen[key] = explicit if explicit is not None else default(far_round)
        if explicit is None:
            base.append(f"--{name}={str(chosen[key]).lower()}")
    base += list(flags)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def run(name: str, total: int, rounds: Sequence[int]) -> dict:
        command = base + [f"--experiment_name={name}", f"--total_rounds={total}"]
        return span_marks(command, repo, rounds)

    run("warm", warm_rounds, [warm_rounds])
    report = collections.OrderedDict()
    for label, start in (("near", warm_rounds), ("far", far_round)):
        _copy_experiment(root, "warm", label)
        if label == "far":
            _relabel_checkpoint(os.path.join(root, "checkpoints", label), far_round)
            metrics_csv = os.path.join(root, "results", label, "experiment.metrics.csv")
            _seed_metrics_csv(metrics_csv, far_round)
        # The run goes `short` rounds past the span: its last round is evaluated, and that
        # evaluation must not fall inside the span.
        first, last = start + short, start + short + span
        marks = run(label, last + short, [first, last])
        wall, driver, worker = (b - a for a, b in zip(marks[first], marks[last]))
        report[label] = collections.OrderedDict(
            round=first,
            ms_per_round=1000 * wall / span,
            driver_cpu_ms_per_round=1000 * driver / span,
            worker_cpu_ms_per_round=1000 * worker / span,
        )
    shutil.rmtree(root, ignore_errors=True)
    report.update(chosen)
    return report
