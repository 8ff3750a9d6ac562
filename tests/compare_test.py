"""End-to-end test of experiments/compare.py: the report files, their shape, and bad input."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import psutil

ROOT = pathlib.Path(__file__).resolve().parent.parent
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _run(*flags: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run(
        [sys.executable, "-m", "experiments.compare", *flags],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _workers() -> set[int]:
    return {p.pid for p in psutil.process_iter(["name"]) if p.info["name"] == "worker_binary"}


def test_compare_writes_a_row_per_algorithm_and_a_png(tmp_path):
    before = _workers()
    result = _run(
        "--algorithms=fedavg,mfl",
        "--total_rounds=2",
        "--rounds_per_eval=1",
        "--num_eval_clients=4",
        "--clients_per_round=3",
        "--cohort_size=3",
        "--inner_steps=1",
        f"--output_dir={tmp_path}",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    table = (tmp_path / "comparison.md").read_text().splitlines()
    rows = [line for line in table if line.startswith("| fedavg") or line.startswith("| mfl")]
    assert [row.split("|")[1].strip() for row in rows] == ["fedavg", "mfl"]
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[1] == "2"  # rounds
        for value in cells[2:6]:  # before/after mean and p10 are accuracies
            assert 0.0 <= float(value) <= 1.0
    png = (tmp_path / "comparison.png").read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 10_000
    # The printed table is the written one.
    assert "\n".join(rows) in result.stdout
    assert _workers() <= before


def test_unknown_algorithm_is_one_line_error_and_writes_nothing(tmp_path):
    out = tmp_path / "out"
    result = _run("--algorithms=fedavg,nope", f"--output_dir={out}", timeout=120)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert "nope" in last and "fedavg" in last and "Traceback" not in result.stderr
    assert not out.exists()
