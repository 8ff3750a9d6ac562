"""experiments/train.py with --execution=remote: TFF's worker_binary started separately.

The workers here are TFF's own binary on free loopback ports, started as another host's operator
would start them (`worker_binary --port=N`, from a shell: `testing.operator_worker`).
The training binary must compute what a local run computes, on one worker or several sharing each
round's clients, must not start or stop a worker of its own, and must turn a worker that dies
mid-run into one clear line and a non-zero exit within a bounded time, with the rounds saved so
far intact. What cannot run on several workers is refused before anything is written.

All scenarios are jobs that conftest.py starts early (each is a subprocess that mostly waits);
the tests check what they observed.
"""

from __future__ import annotations

import contextlib
import functools
import pathlib
import signal
import subprocess
from typing import Optional

import pytest

from tests import testing

ROUNDS = 3
EXPERIMENT = testing.TINY_EXPERIMENT
# The binary must give up this long after its worker stops answering...
WORKER_TIMEOUT_S = 3
# ...and be gone well within this (TFF itself would retry forever).
EXIT_BOUND_S = 120


@contextlib.contextmanager
def _operator_workers(count: int, log_path: Optional[pathlib.Path] = None):
    """`count` operator workers (`testing.operator_worker`), stopped afterwards."""
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(testing.operator_worker(log_path)) for _ in range(count)]


def _remote_run(scratch: pathlib.Path, num_workers: int = 1) -> dict:
    """A 3-round tiny run on workers started here; the workers' state afterwards."""
    with _operator_workers(num_workers, log_path=scratch / "worker.log") as services:
        targets = [service.target for service in services]
        completed = testing.run_binary(
            "train",
            *testing.tiny_flags(ROUNDS),
            f"--root_output_dir={scratch}",
            "--execution=remote",
            f"--worker={','.join(targets)}",
        )
        still_running = all(service.running for service in services)
    return dict(
        root=scratch,
        run=completed,
        target=targets[0],
        targets=targets,
        still_running=still_running,
    )


def _worker_dies(scratch: pathlib.Path, num_workers: int = 1) -> dict:
    """A long run whose (last) remote worker is killed once round 1 is saved: how the binary
    ended."""
    flags = (
        *testing.tiny_flags(500),
        f"--root_output_dir={scratch}",
        "--execution=remote",
        f"--worker_timeout={WORKER_TIMEOUT_S}",
    )
    checkpoints = scratch / "checkpoints" / EXPERIMENT
    with _operator_workers(num_workers) as services:
        targets = ",".join(service.target for service in services)
        with open(scratch / "stdout.txt", "w") as stdout:
            process = testing.start_binary("train", *flags, f"--worker={targets}", stdout=stdout)
            workers = testing.OwnWorkers(process.pid)
            try:
                testing.wait_for_path(checkpoints / "program_state_1", process, workers)
                services[-1].process.send_signal(signal.SIGKILL)
                try:
                    _, stderr = process.communicate(timeout=EXIT_BOUND_S)
                except subprocess.TimeoutExpired:
                    pytest.fail("the binary hung after its worker died")
            finally:
                testing.kill_group(process)
    return dict(
        root=scratch,
        returncode=process.returncode,
        stderr=stderr,
        own_workers=dict(workers.workers),
        saved=testing.saved_rounds(checkpoints),
        killed=services[-1].target,
    )


def _refused(scratch: pathlib.Path) -> dict:
    """A run on several workers that must be refused before anything is written (several rounds
    in one call are refused before any worker is contacted: tests/train_test.py's bad input)."""
    root = scratch / "out"
    runs = {}
    # The first worker answers, the second does not: the error names the second.
    with testing.operator_worker() as service:
        runs["silent_second"] = testing.run_binary(
            "train",
            *testing.tiny_flags(ROUNDS),
            f"--root_output_dir={root}",
            "--execution=remote",
            f"--worker={service.target},localhost:1",
            "--worker_timeout=2",
        )
    return dict(root=root, runs=runs)


BACKGROUND_JOBS = {
    "remote": {"run": _remote_run},
    "worker_dies": {"run": _worker_dies},
    "two_workers": {"run": functools.partial(_remote_run, num_workers=2)},
    "one_of_two_dies": {"run": functools.partial(_worker_dies, num_workers=2)},
    "refused": {"run": _refused},
}


@pytest.fixture(scope="module")
def remote(background):
    return background.results(__name__, "remote")["run"]


@pytest.fixture(scope="module")
def worker_dies(background):
    return background.results(__name__, "worker_dies")["run"]


@pytest.fixture(scope="module")
def two_workers(background):
    return background.results(__name__, "two_workers")["run"]


@pytest.fixture(scope="module")
def one_of_two_dies(background):
    return background.results(__name__, "one_of_two_dies")["run"]


@pytest.fixture(scope="module")
def refused(background):
    return background.results(__name__, "refused")["run"]


def test_remote_run_equals_local_run_and_leaves_the_worker_to_its_owner(remote, train_reference):
    completed = remote["run"]
    assert completed.returncode == 0, completed.stderr
    # The worker belongs to whoever started it: the binary neither started one of its own nor
    # stopped this one.
    assert remote["still_running"]
    assert not completed.workers.workers
    assert not testing.WORKER_PID.search(completed.stdout)
    assert f"TFF worker at {remote['target']} (remote)" in completed.stdout

    # The local run is the reference: training does not depend on --total_rounds, so its
    # round-3 checkpoint is the final state of a 3-round local run.
    root, (local_root, _) = remote["root"], train_reference
    assert testing.saved_rounds(root / "checkpoints" / EXPERIMENT)[-1] == ROUNDS
    got = testing.checkpoint_tensors(root, EXPERIMENT, ROUNDS)
    want = testing.checkpoint_tensors(local_root, EXPERIMENT, ROUNDS)
    assert got.keys() == want.keys() and got
    worst = testing.max_abs_diff(got, want)
    print(f"max |remote - local| over the final state: {worst:.3g}")
    assert worst <= 1e-6, f"remote and local final states differ by {worst}"
    got_rows = testing.csv_rows(root / "results" / EXPERIMENT / "experiment.metrics.csv")
    want_rows = testing.csv_rows(local_root / "results" / EXPERIMENT / "experiment.metrics.csv")
    assert [r["round_num"] for r in got_rows] == [r["round_num"] for r in want_rows[:ROUNDS]]
    for got_row, want_row in zip(got_rows, want_rows):
        assert float(got_row["client_work/train_loss"]) == pytest.approx(
            float(want_row["client_work/train_loss"]), abs=1e-6
        )


def test_worker_dying_mid_run_is_one_line_and_a_bounded_exit(worker_dies):
    stderr = worker_dies["stderr"]
    assert worker_dies["returncode"] == 3, stderr
    assert "Traceback" not in stderr, stderr
    # It was told to use the remote worker: it never started one of its own.
    assert not worker_dies["own_workers"]
    last = testing.last_line(stderr)
    saved = worker_dies["saved"][-1]
    assert last.startswith("The TFF worker was lost ("), stderr
    assert last.endswith(f"rerun the same command to resume from round {saved}."), stderr
    # The saved rounds are intact: a later run resumes from them.
    assert testing.checkpoint_tensors(worker_dies["root"], EXPERIMENT, saved)


def test_two_workers_equal_local_run_and_leave_the_workers_to_their_owner(
    two_workers, train_reference
):
    completed = two_workers["run"]
    assert completed.returncode == 0, completed.stderr
    assert two_workers["still_running"]
    assert not completed.workers.workers
    assert f"TFF workers at {', '.join(two_workers['targets'])} (remote;" in completed.stdout
    root, (local_root, _) = two_workers["root"], train_reference
    got = testing.checkpoint_tensors(root, EXPERIMENT, ROUNDS)
    want = testing.checkpoint_tensors(local_root, EXPERIMENT, ROUNDS)
    assert got.keys() == want.keys() and got
    worst = testing.max_abs_diff(got, want)
    print(f"max |two workers - local| over the final state: {worst:.3g}")
    # Partial sums are added in another order (and cohorts are split between the workers).
    assert worst <= 1e-6, f"two-worker and local final states differ by {worst}"


def test_one_of_two_workers_dying_is_one_line_naming_it_and_exit_3(one_of_two_dies):
    stderr = one_of_two_dies["stderr"]
    assert one_of_two_dies["returncode"] == 3, stderr
    assert "Traceback" not in stderr, stderr
    assert not one_of_two_dies["own_workers"]
    last = testing.last_line(stderr)
    saved = one_of_two_dies["saved"][-1]
    assert last.startswith("The TFF worker was lost (No TFF worker answered at "), stderr
    assert one_of_two_dies["killed"] in last, stderr
    assert last.endswith(f"rerun the same command to resume from round {saved}."), stderr
    assert testing.checkpoint_tensors(one_of_two_dies["root"], EXPERIMENT, saved)


def _assert_refused(run, expected: str) -> None:
    assert run.returncode == 2, run.stderr
    assert "Traceback" not in run.stderr, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], run.stderr


def test_what_cannot_run_on_several_workers_is_refused_before_writing(refused):
    _assert_refused(refused["runs"]["silent_second"], "no TFF worker answered at localhost:1")
    assert not refused["root"].exists()
