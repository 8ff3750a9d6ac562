"""End-to-end test of experiments/benchmark.py in --quick mode: the JSON's shape, keys and types,
the printed tables, one-line errors, and no worker left behind. Timings are not asserted."""

from __future__ import annotations

import functools
import json
import math
import pathlib

import pytest

from tests import testing


def _positive(value) -> bool:
    return isinstance(value, float) and math.isfinite(value) and value > 0


def _check_timing(timing: dict) -> None:
    assert set(timing) >= {"median", "min", "max"}
    assert all(_positive(timing[k]) for k in ("median", "min", "max"))
    assert timing["min"] <= timing["median"] <= timing["max"]


BAD_FLAGS = {
    "unknown_algorithm": (("--algorithms=fedavg,nope",), ("nope", "fedavg")),
    "too_many_clients": (("--quick", "--clients_per_round=9"), ("--num_train_clients",)),
}


CASES = {"quick": ("--quick",), **{case: flags for case, (flags, _) in BAD_FLAGS.items()}}


def _run(case: str, scratch: pathlib.Path):
    """One benchmark run: (Run, its --output path). `run_binary` checks its workers are gone."""
    out = scratch / case / "bench.json"
    return testing.run_binary("benchmark", *CASES[case], f"--output={out}"), out


# Started early by conftest.py, one process a job.
BACKGROUND_JOBS = {"runs": {case: functools.partial(_run, case) for case in CASES}}


@pytest.fixture(scope="module")
def runs(background):
    """{case: (Run, output path)} of the --quick run and each BAD_FLAGS case."""
    return background.results(__name__, "runs")


@pytest.fixture(scope="module")
def quick(runs):
    """The --quick run: (parsed JSON, stdout)."""
    result, out = runs["quick"]
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.workers.workers, "the benchmark started no worker of its own"
    # Nothing else was written next to the JSON.
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


@pytest.mark.parametrize("case", sorted(BAD_FLAGS))
def test_bad_flag_is_one_line_error_naming_the_fix_and_writes_nothing(runs, case):
    result, out = runs[case]
    assert result.returncode != 0
    last = testing.last_line(result.stderr)
    assert all(word in last for word in BAD_FLAGS[case][1]), result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists() and not out.parent.exists()
