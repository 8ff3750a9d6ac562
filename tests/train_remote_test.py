"""experiments/train.py with --execution=remote: TFF's worker_binary started separately.

The worker here is TFF's own binary on a free loopback port, started as another host's operator
would start it (`worker_binary --port=N`, through `WorkerService` only so that the test stops it).
The training binary must compute exactly what a local run computes, must not start or stop a worker
of its own, and must turn a worker that dies mid-run into one clear line and a non-zero exit
within a bounded time, with the rounds saved so far intact.
"""

from __future__ import annotations

import os
import signal
import subprocess

import numpy as np
import pytest

from mfl_tff.training import worker
from tests import train_test as t

ROUNDS = 3
# A 3-round run of the tiny configuration (TINY_FLAGS sets rounds through --total_rounds).
FLAGS = tuple(f for f in t.TINY_FLAGS if not f.startswith("--total_rounds")) + (
    f"--total_rounds={ROUNDS}",
)


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("local")
    completed = t._run(*FLAGS, f"--root_output_dir={root}")
    assert completed.returncode == 0, completed.stderr
    return root


def test_remote_run_equals_local_run_and_leaves_the_worker_to_its_owner(tmp_path, local_run):
    with worker.WorkerService(log_path=tmp_path / "worker.log") as service:
        completed = t._run(
            *FLAGS,
            f"--root_output_dir={tmp_path}",
            "--execution=remote",
            f"--worker={service.target}",
        )
        assert completed.returncode == 0, completed.stderr
        # The worker belongs to whoever started it: the binary neither started one of its own
        # nor stopped this one.
        assert service.running
        assert not t.WORKER_PID.search(completed.stdout)
        assert f"TFF worker at {service.target} (remote)" in completed.stdout
    remote = t._checkpoint_tensors(tmp_path, ROUNDS)
    local = t._checkpoint_tensors(local_run, ROUNDS)
    assert remote.keys() == local.keys() and remote
    worst = max(float(np.max(np.abs(remote[k] - local[k]), initial=0.0)) for k in local)
    print(f"max |remote - local| over the final state: {worst:.3g}")
    assert worst <= 1e-6, f"remote and local final states differ by {worst}"
    got = t._rows(tmp_path / "results" / t.EXPERIMENT / "experiment.metrics.csv")
    want = t._rows(local_run / "results" / t.EXPERIMENT / "experiment.metrics.csv")
    assert [r["round_num"] for r in got] == [r["round_num"] for r in want]


def test_worker_dying_mid_run_is_one_line_and_a_bounded_exit(tmp_path):
    flags = (
        *(f for f in t.TINY_FLAGS if not f.startswith("--total_rounds")),
        "--total_rounds=500",
        f"--root_output_dir={tmp_path}",
        "--execution=remote",
        "--worker_timeout=3",
    )
    checkpoints = tmp_path / "checkpoints" / t.EXPERIMENT
    with worker.WorkerService() as service:
        with open(tmp_path / "stdout.txt", "w") as stdout:
            process = t._start(*flags, f"--worker={service.target}", stdout=stdout)
            try:
                t._wait_for(checkpoints / "program_state_1", process)
                os.kill(service.pid, signal.SIGKILL)
                # Bounded: the binary gives up after --worker_timeout, not after TFF's endless
                # retries.
                _, stderr = process.communicate(timeout=120)
            except subprocess.TimeoutExpired:
                pytest.fail("the binary hung after its worker died")
            finally:
                if process.poll() is None:
                    os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 3, stderr
    assert "Traceback" not in stderr, stderr
    last = stderr.strip().splitlines()[-1]
    saved = max(t._saved_rounds(checkpoints))
    assert last.startswith("The TFF worker was lost ("), stderr
    assert last.endswith(f"rerun the same command to resume from round {saved}."), stderr
    # The saved rounds are intact: a later run resumes from them.
    assert t._checkpoint_tensors(tmp_path, saved)
