"""End-to-end test of experiments/compare.py: the report files, their shape, and bad input."""

from __future__ import annotations

import functools
import pathlib

import pytest

from tests import testing

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SMALL = (
    "--algorithms=fedavg,mfl",
    "--total_rounds=2",
    "--rounds_per_eval=1",
    "--num_eval_clients=4",
    "--clients_per_round=3",
    "--cohort_size=3",
    "--inner_steps=1",
)


CASES = {
    "small": SMALL,
    "unknown_algorithm": ("--algorithms=fedavg,nope",),
    # Per-client aggregators need cohorts off (the default 25 is turned off, not an explicit 5):
    # one line before any task is built (the checks are `experiments/aggregator_flags.py`'s,
    # tested with train.py's bad input).
    "secure_with_explicit_cohorts": ("--aggregator=secure", "--cohort_size=5"),
}


def _run(case: str, scratch: pathlib.Path):
    """One comparison: (Run, its --output_dir). `run_binary` checks its workers are gone."""
    out = scratch / case
    return testing.run_binary("compare", *CASES[case], f"--output_dir={out}"), out


# Started early by conftest.py, one process a job.
BACKGROUND_JOBS = {"runs": {case: functools.partial(_run, case) for case in CASES}}


@pytest.fixture(scope="module")
def runs(background):
    """{case: (Run, output dir)} of the small comparison and the bad-flag run."""
    return background.results(__name__, "runs")


def test_compare_writes_a_row_per_algorithm_and_a_png(runs):
    result, out = runs["small"]
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.workers.workers, "the comparison started no worker of its own"
    table = (out / "comparison.md").read_text().splitlines()
    rows = [line for line in table if line.startswith("| fedavg") or line.startswith("| mfl")]
    assert [row.split("|")[1].strip() for row in rows] == ["fedavg", "mfl"]
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[1] == "2"  # rounds
        for value in cells[2:6]:  # before/after mean and p10 are accuracies
            assert 0.0 <= float(value) <= 1.0
        up, down = (float(v) for v in cells[8].split(" / "))
        # Closed form: the 64-64-5 MLP on 8x8 digits has 8,645 float32 parameters, broadcast to
        # each client and uploaded as its update. mfl adds its meta-parameters, broadcast twice
        # and uploaded once: 6 per-layer rates and its default meta-model's network, 7 features
        # (log loss, 6 log gradient norms) -> 16 -> 1 step x 6 tensors.
        params_mb = 4 * (64 * 64 + 64 + 64 * 64 + 64 + 64 * 5 + 5) / 1e6
        meta_mb = 4 * (6 + 7 * 16 + 16 + 16 * 6 + 6) / 1e6 if cells[0] == "mfl" else 0
        assert down == pytest.approx(params_mb + 2 * meta_mb, abs=1e-4)
        assert params_mb + meta_mb < up < params_mb + meta_mb + 1e-4
    # An unset --meta_model is reported as what ran: mfl's default (fedavg has none).
    settings = next(line for line in table if line.startswith("Settings: "))
    assert "meta_model=conditioned " in settings
    png = (out / "comparison.png").read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 10_000
    # The printed table is the written one.
    assert "\n".join(rows) in result.stdout


def test_unknown_algorithm_is_one_line_error_and_writes_nothing(runs):
    result, out = runs["unknown_algorithm"]
    assert result.returncode != 0
    last = testing.last_line(result.stderr)
    assert "nope" in last and "fedavg" in last and "Traceback" not in result.stderr
    assert not out.exists()


@pytest.mark.parametrize("case, expected", [("secure_with_explicit_cohorts", "--cohort_size=5")])
def test_bad_aggregator_combinations_exit_2_with_one_line(runs, case, expected):
    result, out = runs[case]
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert (
        len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0]
    ), result.stderr
    assert not result.workers.workers
    assert not out.exists()
