"""experiments/train.py with --execution=remote: TFF's worker_binary started separately.

The worker here is TFF's own binary on a free loopback port, started as another host's operator
would start it (`worker_binary --port=N`, from a shell: `testing.operator_worker`).
The training binary must compute exactly what a local run computes, must not start or stop a worker
of its own, and must turn a worker that dies mid-run into one clear line and a non-zero exit
within a bounded time, with the rounds saved so far intact.

Both scenarios are jobs that conftest.py starts early (each is a subprocess that mostly waits);
the tests check what they observed.
"""

from __future__ import annotations

import pathlib
import signal
import subprocess

import pytest

from tests import testing

ROUNDS = 3
EXPERIMENT = testing.TINY_EXPERIMENT
# The binary must give up this long after its worker stops answering...
WORKER_TIMEOUT_S = 3
# ...and be gone well within this (TFF itself would retry forever).
EXIT_BOUND_S = 120


def _remote_run(scratch: pathlib.Path) -> dict:
    """A 3-round tiny run on a worker started here; the worker's state afterwards."""
    with testing.operator_worker(log_path=scratch / "worker.log") as service:
        completed = testing.run_binary(
            "train",
            *testing.tiny_flags(ROUNDS),
            f"--root_output_dir={scratch}",
            "--execution=remote",
            f"--worker={service.target}",
        )
        still_running = service.running
    return dict(root=scratch, run=completed, target=service.target, still_running=still_running)


def _worker_dies(scratch: pathlib.Path) -> dict:
    """A long run whose remote worker is killed once round 1 is saved: how the binary ended."""
    flags = (
        *testing.tiny_flags(500),
        f"--root_output_dir={scratch}",
        "--execution=remote",
        f"--worker_timeout={WORKER_TIMEOUT_S}",
    )
    checkpoints = scratch / "checkpoints" / EXPERIMENT
    with testing.operator_worker() as service:
        with open(scratch / "stdout.txt", "w") as stdout:
            process = testing.start_binary(
                "train", *flags, f"--worker={service.target}", stdout=stdout
            )
            workers = testing.OwnWorkers(process.pid)
            try:
                testing.wait_for_path(checkpoints / "program_state_1", process, workers)
                service.process.send_signal(signal.SIGKILL)
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
    )


BACKGROUND_JOBS = {"remote": {"run": _remote_run}, "worker_dies": {"run": _worker_dies}}


@pytest.fixture(scope="module")
def remote(background):
    return background.results(__name__, "remote")["run"]


@pytest.fixture(scope="module")
def worker_dies(background):
    return background.results(__name__, "worker_dies")["run"]


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
