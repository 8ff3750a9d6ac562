"""End-to-end test of experiments/benchmark.py in --quick mode: the JSON's shape, keys and types,
the printed tables, one-line errors, and no worker left behind. Timings are not asserted."""

from __future__ import annotations

import json
import math
import os
import pathlib
import subprocess
import sys

import psutil
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _run(*flags: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run(
        [sys.executable, "-m", "experiments.benchmark", *flags],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _workers() -> set[int]:
    return {p.pid for p in psutil.process_iter(["name"]) if p.info["name"] == "worker_binary"}


def _positive(value) -> bool:
    return isinstance(value, float) and math.isfinite(value) and value > 0


def _check_timing(timing: dict) -> None:
    assert set(timing) >= {"median", "min", "max"}
    assert all(_positive(timing[k]) for k in ("median", "min", "max"))
    assert timing["min"] <= timing["median"] <= timing["max"]


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """One --quick run: (parsed JSON, stdout)."""
    before = _workers()
    out = tmp_path_factory.mktemp("benchmark") / "sub" / "bench.json"
    result = _run("--quick", f"--output={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    # The worker this run started is gone, and nothing else was written next to the JSON.
    assert _workers() <= before
    assert sorted(p.name for p in out.parent.iterdir()) == ["bench.json"]
    return json.loads(out.read_text()), result.stdout


def test_json_has_the_issue_keys_with_the_right_types(quick):
    report, _ = quick
    assert set(report) >= {
        "machine",
        "task",
        "clients_per_round",
        "algorithms",
        "peer_fedavg_round_time_s",
        "tf_floor_round_time_s",
        "scaling",
        "memory_mb",
    }
    assert report["machine"]["cpus"] >= 1 and isinstance(report["machine"]["tensorflow"], str)
    assert report["task"] == "digits" and report["clients_per_round"] == 4
    assert _positive(report["peer_fedavg_round_time_s"])
    assert _positive(report["tf_floor_round_time_s"])
    # --quick times fedavg only.
    assert list(report["algorithms"]) == ["fedavg"]
    entry = report["algorithms"]["fedavg"]
    _check_timing(entry["round_time_s"])
    assert entry["round_time_s"]["n"] == 3
    for key in ("ratio_to_peer_fedavg", "ratio_to_tf_floor", "first_round_s"):
        assert _positive(entry[key]), key
    # The ratios are what they claim to be.
    assert entry["ratio_to_peer_fedavg"] == pytest.approx(
        entry["round_time_s"]["median"] / report["peer_fedavg_round_time_s"]
    )
    assert entry["ratio_to_tf_floor"] == pytest.approx(
        entry["round_time_s"]["median"] / report["tf_floor_round_time_s"]
    )
    # First round includes building (tracing) the process.
    assert entry["first_round_s"] == pytest.approx(entry["build_s"] + entry["first_next_s"])


def test_scaling_and_memory_sections(quick):
    report, _ = quick
    assert [s["clients_per_round"] for s in report["scaling"]] == [2, 4]
    for s in report["scaling"]:
        for key in ("round_time_s", "peer_fedavg_round_time_s", "tf_floor_round_time_s"):
            assert _positive(s[key]), key
    # The scaling entry at the main size is the main measurement.
    at_main = [s for s in report["scaling"] if s["clients_per_round"] == 4][0]
    assert at_main["round_time_s"] == report["algorithms"]["fedavg"]["round_time_s"]["median"]
    fit = report["scaling_fit_s"]["fedavg"]
    assert isinstance(fit["fixed"], float) and isinstance(fit["per_unit"], float)

    memory = report["memory_mb"]
    # Round 0, then every 5 rounds up to 25.
    assert memory["rounds"] == [0, 5, 10, 15, 20, 25]
    for proc in ("driver", "worker"):
        values = memory[proc]
        assert len(values) == 6 and all(_positive(float(v)) for v in values)
        assert isinstance(memory[f"{proc}_growth_pct_per_100_rounds"], float)
    # The driver holds TensorFlow and TFF: far more than a few MB; the worker is a real process.
    assert memory["driver"][0] > 100 and memory["worker"][0] > 10


def test_targets_and_printed_tables(quick):
    report, stdout = quick
    targets = {t["target"]: t for t in report["targets"]}
    floor_target = targets["fedavg round / TF floor"]
    assert floor_target["limit"] == 3.0
    assert floor_target["met"] == (floor_target["value"] <= 3.0)
    assert "fedavg driver memory growth % per 100 rounds" in targets
    # The printed tables carry the measured numbers.
    assert "| algorithm | round ms (median) |" in stdout
    ms = report["algorithms"]["fedavg"]["round_time_s"]["median"] * 1e3
    assert f"| fedavg | {ms:.1f} |" in stdout
    assert "| TFF build_weighted_fed_avg (peer) |" in stdout
    assert "| clients per round | ours fedavg ms |" in stdout
    assert "| memory run | rounds |" in stdout


def test_bad_flag_is_one_line_error_and_writes_nothing(tmp_path):
    out = tmp_path / "bench.json"
    result = _run("--algorithms=fedavg,nope", f"--output={out}", timeout=120)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert "nope" in last and "fedavg" in last and "Traceback" not in result.stderr
    assert not out.exists()


def test_too_many_clients_names_the_fix(tmp_path):
    out = tmp_path / "bench.json"
    result = _run("--quick", "--clients_per_round=9", f"--output={out}", timeout=120)
    assert result.returncode != 0
    assert "--num_train_clients" in result.stderr.strip().splitlines()[-1]
    assert not out.exists()
