"""Tests of experiments/quality.py's flags: shot ranges, label noise and the meta-model flags.

The binary's flags share names with experiments/train.py's, so it cannot be imported into the
test process; each case runs it as a subprocess. To check what the flags reach without training,
one case runs its `main` under a small driver that replaces `builders.build_algorithm` (recording
the options and writing one results row through the binary's own `_write_row`) and the TFF
runtime (no worker is started).
"""

from __future__ import annotations

import functools
import json
import pathlib
import subprocess
import sys

import pytest

from tests import testing

DRIVER = r"""
import contextlib, json, sys
from experiments import quality, settings_flags
from mfl_tff.algorithms import builders
from mfl_tff.training import runtime

def build_algorithm(name, task, options):
    report = {
        "before_adaptation": {"mean": 1.0},
        "after_adaptation": {"mean": 0.5, "p10": 0.25},
        "fine_tune": {"after_adaptation": {"mean": 0.75}},
    }
    quality._write_row(task, name, 1, report, 0.0, None, settings_flags.settings(task))
    clients = task.train_clients(task.train_data.client_ids[:40])
    print("BUILT " + json.dumps({
        "meta_model": options.meta_model,
        "client_optimizer": options.client_optimizer,
        "inner_clip_norm": options.inner_clip_norm,
        "meta_clip_norm": options.meta_clip_norm,
        "shots": task.settings.shots,
        "support_sizes": [int(c["support"]["mask"].sum()) for c in clients],
    }))
    sys.exit(0)

builders.build_algorithm = build_algorithm
runtime.local_execution = lambda **kwargs: contextlib.nullcontext()
quality.main(settings_flags.parse_flags(["quality", *sys.argv[1:]]))
"""

DRIVEN = (
    "--task=sinusoid",
    "--algorithms=meta_sgd",
    "--rounds=1",
    "--num_eval_clients=3",
    "--clients_per_round=2",
    "--shots=2:20",
    "--label_noise=0:1",
    "--meta_model=conditioned",
    "--client_optimizer=momentum",
    "--inner_clip_norm=0",
    "--tag=hetero",
)

# name -> (flags, text the one error line must contain): a check of the data flags shared with
# compare.py (experiments/settings_flags.py), and an absl parse error. Each subprocess costs
# seconds of the suite's budget; the flags' parsing is tested in-process in settings_test.py.
BAD_INPUT = {
    "label_noise_on_digits_fewshot": (
        ("--task=digits_fewshot", "--label_noise=0.1"),
        "drop --label_noise",
    ),
    "unknown_meta_model": (("--meta_model=nope",), "--meta_model"),
}


def _driven(scratch: pathlib.Path):
    """The driver's run: (CompletedProcess, the --output markdown path)."""
    output = scratch / "quality.md"
    completed = subprocess.run(
        [sys.executable, "-c", DRIVER, *DRIVEN, f"--output={output}"],
        cwd=testing.REPO_ROOT,
        env=testing.binary_env(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=testing.RUN_TIMEOUT_S,
    )
    return completed, output


def _bad(case: str, scratch: pathlib.Path):
    output = scratch / case / "quality.md"
    return testing.run_binary("quality", *BAD_INPUT[case][0], f"--output={output}"), output


# Started early by conftest.py, one process a job.
BACKGROUND_JOBS = {
    "runs": {
        "driven": _driven,
        **{case: functools.partial(_bad, case) for case in BAD_INPUT},
    }
}


@pytest.fixture(scope="module")
def runs(background):
    return background.results(__name__, "runs")


def test_range_noise_and_meta_model_flags_reach_the_task_options_and_rows(runs):
    completed, output = runs["driven"]
    assert completed.returncode == 0, completed.stderr[-3000:]
    (line,) = (x for x in completed.stdout.splitlines() if x.startswith("BUILT "))
    built = json.loads(line[len("BUILT ") :])
    assert built["shots"] == [2, 20]
    assert all(2 <= size <= 20 for size in built["support_sizes"])
    assert len(set(built["support_sizes"])) > 5
    assert (built["meta_model"], built["client_optimizer"]) == ("conditioned", "momentum")
    assert (built["inner_clip_norm"], built["meta_clip_norm"]) == (0.0, None)
    # The settings line marks --shots as set by a flag.
    assert "shots=2:20*" in completed.stdout
    # The row says which meta-model produced it; the JSON record has every flag as used.
    (row,) = (x for x in output.read_text().splitlines() if x.startswith("| sinusoid"))
    setup = row.strip("|").split("|")[-1].strip()
    assert setup == (
        "hetero meta_model=conditioned client_optimizer=momentum inner_clip_norm=0 label_noise=0:1"
    )
    (record,) = (json.loads(x) for x in output.with_suffix(".jsonl").read_text().splitlines())
    got = record["flags"]
    assert (got["meta_model"], got["client_optimizer"]) == ("conditioned", "momentum")
    assert (got["shots"], got["label_noise"]) == ("2:20", "0:1")
    assert got["inner_lr"] == 0.01  # sinusoid's setting, as used


@pytest.mark.parametrize("case", sorted(BAD_INPUT))
def test_bad_flags_exit_2_with_one_line_and_write_nothing(runs, case):
    run, output = runs[case]
    assert run.returncode == 2, run.stderr
    assert "Traceback" not in run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), run.stderr
    assert BAD_INPUT[case][1] in lines[0], lines[0]
    assert not output.parent.exists() or not output.exists()
    assert not run.workers.workers
