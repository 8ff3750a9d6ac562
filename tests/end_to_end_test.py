"""Tests of `experiments.end_to_end`: where its per-round span is read, and the round-50,000 setup.

The training program itself is timed by `experiments/benchmark.py`, never here; these tests run a
stand-in child that prints progress lines as the training program does.
"""

from __future__ import annotations

import asyncio
import csv
import os
import sys
import textwrap

import numpy as np
import pytest
from absl import flags as absl_flags

from experiments import end_to_end
from mfl_tff.training import program, state_manager

# Prints the progress lines of rounds 1..5, burning CPU between rounds 2 and 4 only.
FAKE_RUN = textwrap.dedent(
    """
    import time
    def burn(seconds):
        end = time.process_time() + seconds
        while time.process_time() < end:
            pass
    for r in range(1, 6):
        if r in (3, 4):
            burn(0.3)
        print(f"round {r:>2}/5  elapsed 0:01  eta 0:00  query loss 1.0")
    """
)


def test_span_marks_read_clock_and_cpu_when_each_progress_line_arrives(tmp_path):
    script = tmp_path / "fake.py"
    script.write_text(FAKE_RUN)
    marks = end_to_end.span_marks([sys.executable, str(script)], str(tmp_path), [2, 4])
    assert sorted(marks) == [2, 4]
    wall, driver, worker = (b - a for a, b in zip(marks[2], marks[4]))
    # Rounds 3 and 4 burned 0.6 s of the child's CPU, all inside the span; no worker ran.
    assert 0.5 <= driver <= 1.5
    assert wall >= driver * 0.5
    assert worker == 0.0


def test_span_marks_name_a_round_whose_line_never_came(tmp_path):
    script = tmp_path / "fake.py"
    script.write_text(FAKE_RUN)
    with pytest.raises(RuntimeError, match=r"no progress line for rounds \[7\]"):
        end_to_end.span_marks([sys.executable, str(script)], str(tmp_path), [2, 7])


def test_a_failing_run_raises_with_its_last_output(tmp_path):
    command = [sys.executable, "-c", "print('round 1/2'); raise SystemExit('bad flag')"]
    with pytest.raises(RuntimeError, match="bad flag"):
        end_to_end.span_marks(command, str(tmp_path), [1])


def test_relabelled_checkpoint_resumes_at_the_far_round(tmp_path):
    directory = str(tmp_path)
    state = [np.arange(3, dtype=np.float32), np.float32(2.5)]
    state_manager.ArrayProgramStateManager(directory).write((480, state), 480)
    end_to_end._relabel_checkpoint(directory, 50_000)
    assert program.checkpoint_rounds(directory) == [50_000]
    manager = state_manager.ArrayProgramStateManager(directory)
    restored, version = asyncio.run(
        manager.load_latest((0, [np.zeros(3, np.float32), np.float32(0)]))
    )
    assert version == 50_000 and restored[0] == 50_000
    np.testing.assert_array_equal(restored[1][0], state[0])


def test_seeded_metrics_csv_has_one_row_per_round(tmp_path):
    path = os.path.join(tmp_path, "experiment.metrics.csv")
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["round_num", "loss"])
        writer.writeheader()
        writer.writerows([dict(round_num=1, loss=3.0), dict(round_num=2, loss=2.0)])
    end_to_end._seed_metrics_csv(path, 5)
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["round_num"]) for r in rows] == [1, 2, 3, 4, 5]
    assert [r["loss"] for r in rows[2:]] == ["2.0"] * 3


@pytest.mark.parametrize(
    "given",
    [
        [],
        ["--fuse_rounds"],
        ["--nofuse_rounds"],
        ["--fuse_rounds=True"],
        ["--fuse_rounds=false"],
        ["--fuse_rounds=1"],
        ["--fuse_rounds", "--rounds_per_call=10", "--fuse_rounds=0"],
        ["--novectorize_cohorts", "--fuse_rounds"],
        ["--vectorize_cohorts=true", "--vectorize_cohorts=0"],
    ],
)
def test_a_bool_flag_reads_as_absl_parses_it(given):
    # The reference: absl parsing the same arguments for a boolean flag of its own.
    values = absl_flags.FlagValues()
    absl_flags.DEFINE_bool("fuse_rounds", None, "", flag_values=values)
    absl_flags.DEFINE_bool("vectorize_cohorts", None, "", flag_values=values)
    absl_flags.DEFINE_integer("rounds_per_call", 0, "", flag_values=values)
    values(["prog", *given])
    assert end_to_end.bool_flag(given, "fuse_rounds") is values.fuse_rounds
    assert end_to_end.bool_flag(given, "vectorize_cohorts") is values.vectorize_cohorts


@pytest.mark.parametrize(
    "given, fused, vectorized",
    [
        ([], True, True),
        (["--nofuse_rounds"], False, True),
        (["--vectorize_cohorts=false", "--rounds_per_call=10"], True, False),
    ],
)
def test_the_runs_make_the_choices_of_a_run_of_far_round_rounds(
    given, fused, vectorized, tmp_path, monkeypatch
):
    # Each run trains 2 * short + span rounds, fewer than a long run; what it fuses and
    # vectorizes must be what the program chooses for `far_round` rounds, unless flags say.
    commands = []

    def span_marks(command, cwd, rounds):
        commands.append(command)
        return {r: (float(r), float(r), float(r)) for r in rounds}

    monkeypatch.setattr(end_to_end, "span_marks", span_marks)
    for name in ("_copy_experiment", "_relabel_checkpoint", "_seed_metrics_csv"):
        monkeypatch.setattr(end_to_end, name, lambda *args: None)
    far = 50_000
    report = end_to_end.measure(
        task="sinusoid", algorithm="meta_sgd", workdir=str(tmp_path), flags=given, far_round=far
    )
    assert (report["fused"], report["vectorized"]) == (fused, vectorized)
    assert program.default_fuse_rounds(far) and program.default_vectorize_cohorts(far)
    assert len(commands) == 3
    for command in commands:
        assert end_to_end.bool_flag(command, "fuse_rounds") is fused
        assert end_to_end.bool_flag(command, "vectorize_cohorts") is vectorized
