"""The training program's per-round cost as a user pays it, for `experiments/benchmark.py`.

`python -m experiments.train` runs as a child process with its default checkpoint and release
settings, so checkpoints, metric releases and packing are all included. The steady cost per
round is a difference of two runs that share everything else (start-up, tracing, compilation,
the final evaluation, shut-down): both resume from the same checkpoint, one trains `short`
rounds and the other `short + span`, so

    ms per round = (wall(long) - wall(short)) / span,

and the same for the driver's and the worker's CPU. To measure at round ~50,000 without running
50,000 rounds, the checkpoint is re-labelled as round 50,000 and the metrics CSV is seeded with
50,000 rows: what could grow with the round number (the CSV, the checkpoint directory, the
round counter) is then as large as in a real run of that length.
"""

from __future__ import annotations

import collections
import csv
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence

import numpy as np
import psutil

from mfl_tff.training import program


def _measure(command: Sequence[str], cwd: str) -> dict:
    """Runs `command`; its wall time and the CPU of its process and of its worker_binary."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    begin = time.perf_counter()
    child = subprocess.Popen(
        command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    process = psutil.Process(child.pid)
    cpu = collections.defaultdict(float)
    # CPU times can only be read while a process lives: poll, keeping the last reading of each.
    while child.poll() is None:
        try:
            times = process.cpu_times()
            cpu["driver"] = times.user + times.system
            for worker in process.children(recursive=True):
                if worker.name() == "worker_binary":
                    times = worker.cpu_times()
                    cpu[f"worker{worker.pid}"] = times.user + times.system
        except psutil.Error:
            pass
        time.sleep(0.2)
    output = child.stdout.read()
    if child.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({child.returncode}): {output[-2000:]}")
    wall = time.perf_counter() - begin
    worker_cpu = sum(v for k, v in cpu.items() if k.startswith("worker"))
    return dict(wall_s=wall, driver_cpu_s=cpu["driver"], worker_cpu_s=worker_cpu)


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

    Returns:
      `{"near": {...}, "far": {...}}`, each with `round`, `ms_per_round`,
      `driver_cpu_ms_per_round` and `worker_cpu_ms_per_round`.
    """
    root = os.path.join(workdir, f"{task}_{algorithm}")
    shutil.rmtree(root, ignore_errors=True)
    base = [sys.executable, "-m", "experiments.train", f"--task={task}"]
    base += [f"--algorithm={algorithm}", f"--root_output_dir={root}", "--rounds_per_eval=0"]
    base += list(flags)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def run(name: str, total: int) -> dict:
        command = base + [f"--experiment_name={name}", f"--total_rounds={total}"]
        return _measure(command, repo)

    run("warm", warm_rounds)
    report = collections.OrderedDict()
    for label, start in (("near", warm_rounds), ("far", far_round)):
        for name in (f"{label}_short", f"{label}_long"):
            _copy_experiment(root, "warm", name)
            if label == "far":
                _relabel_checkpoint(os.path.join(root, "checkpoints", name), far_round)
                metrics_csv = os.path.join(root, "results", name, "experiment.metrics.csv")
                _seed_metrics_csv(metrics_csv, far_round)
        shorter = run(f"{label}_short", start + short)
        longer = run(f"{label}_long", start + short + span)
        report[label] = collections.OrderedDict(
            round=start + short,
            ms_per_round=1000 * (longer["wall_s"] - shorter["wall_s"]) / span,
            driver_cpu_ms_per_round=1000
            * (longer["driver_cpu_s"] - shorter["driver_cpu_s"])
            / span,
            worker_cpu_ms_per_round=1000
            * (longer["worker_cpu_s"] - shorter["worker_cpu_s"])
            / span,
        )
    shutil.rmtree(root, ignore_errors=True)
    return report
