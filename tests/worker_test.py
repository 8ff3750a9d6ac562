"""Tests of `mfl_tff.training.worker`: TFF's worker_binary as a process we start and stop.

The tests that run computations on workers, and the whole-process exit paths, are in
runtime_test.py. The last tests here check the suite's own worker-leak check.
"""

from __future__ import annotations

import subprocess
import sys
import time

import portpicker
import psutil
import pytest

from mfl_tff.training import worker
from tests import testing


@pytest.mark.timeout(60)
def test_stop_is_idempotent_and_stop_all_workers_stops_everything():
    baseline = set(worker.live_worker_pids())
    first = worker.WorkerService()
    second = worker.WorkerService()
    assert first.port != second.port
    assert set(worker.live_worker_pids()) - baseline == {first.pid, second.pid}
    code = first.stop()
    assert code is not None and first.stop() == code
    worker.stop_all_workers()
    assert not second.running
    assert set(worker.live_worker_pids()) - baseline == set()


@pytest.mark.timeout(60)
def test_worker_threads_per_op_default_to_half_the_cores_unless_set(monkeypatch):
    monkeypatch.delenv(worker.INTRA_OP_THREADS_ENV, raising=False)
    monkeypatch.setattr(worker.os, "cpu_count", lambda: 8)
    assert worker.default_intra_op_threads() == 4
    monkeypatch.setattr(worker.os, "cpu_count", lambda: 1)
    assert worker.default_intra_op_threads() == 1

    def seen(**kwargs) -> str:
        with worker.WorkerService(**kwargs) as service:
            return psutil.Process(service.pid).environ()[worker.INTRA_OP_THREADS_ENV]

    assert seen() == "1"
    # What the benchmark's floor reads to match the worker says what the worker got.
    assert worker.configured_intra_op_threads() == 1
    assert seen(intra_op_threads=3) == "3"
    monkeypatch.setenv(worker.INTRA_OP_THREADS_ENV, "2")  # the user's choice wins
    assert seen() == "2"
    assert worker.configured_intra_op_threads() == 2
    # An empty value reaches the worker as is; TensorFlow reads it as its own default (0).
    monkeypatch.setenv(worker.INTRA_OP_THREADS_ENV, "")
    assert seen() == ""
    assert worker.configured_intra_op_threads() == 0


@pytest.mark.timeout(60)
def test_worker_that_ignores_sigint_is_stopped_without_waiting(monkeypatch, tmp_path):
    # As when our process runs as `cmd &` from a script: the worker inherits SIGINT ignored.
    # A stand-in that ignores SIGINT and accepts TCP but speaks no gRPC, so startup times out
    # and the constructor has to stop it.
    pid_path = tmp_path / "pid"
    script = tmp_path / "fake_worker.py"
    script.write_text(
        "import os, signal, socket, sys, time\n"
        "signal.signal(signal.SIGINT, signal.SIG_IGN)\n"
        f"open({str(pid_path)!r}, 'w').write(str(os.getpid()))\n"
        "port = int(sys.argv[1].split('=')[1])\n"
        "server = socket.socket(socket.AF_INET6)\n"
        "server.bind(('::', port))\n"
        "server.listen()\n"
        "time.sleep(60)\n"
    )
    launcher = tmp_path / "worker_binary"
    launcher.write_text(f'#!/bin/sh\nexec {sys.executable} {script} "$@"\n')
    launcher.chmod(0o755)
    monkeypatch.setattr(worker, "worker_binary_path", lambda: launcher)
    started = time.monotonic()
    with pytest.raises(TimeoutError, match="did not answer gRPC") as error:
        worker.WorkerService(startup_timeout_s=2, stop_timeout_s=20)
    elapsed = time.monotonic() - started
    assert "log_path" in str(error.value)
    assert not psutil.pid_exists(int(pid_path.read_text()))
    # 2 s of startup timeout, then SIGTERM at once instead of 20 s of waiting after SIGINT.
    assert elapsed < 8


@pytest.mark.timeout(60)
def test_worker_exiting_at_startup_names_its_log(monkeypatch, tmp_path):
    launcher = tmp_path / "worker_binary"
    launcher.write_text("#!/bin/sh\necho 'cannot bind' >&2\nexit 3\n")
    launcher.chmod(0o755)
    monkeypatch.setattr(worker, "worker_binary_path", lambda: launcher)
    log_path = tmp_path / "worker.log"
    with pytest.raises(RuntimeError, match="exited with status 3") as error:
        worker.WorkerService(log_path=log_path)
    assert str(log_path) in str(error.value)
    assert "cannot bind" in log_path.read_text()


@pytest.mark.timeout(60)
def test_missing_binary_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(worker, "WORKER_BINARY_NAME", "no_such_worker_binary")
    with pytest.raises(RuntimeError, match="no_such_worker_binary was not found"):
        worker.worker_binary_path()


@pytest.mark.timeout(60)
def test_wait_for_worker_returns_for_a_serving_worker_and_fails_fast_without_one():
    with worker.WorkerService() as service:
        worker.wait_for_worker(service.target, timeout_s=10)
    started = time.monotonic()
    with pytest.raises(ConnectionError, match=f"localhost:{service.port} within 2 s"):
        worker.wait_for_worker(f"localhost:{service.port}", timeout_s=2)
    assert time.monotonic() - started < 8


@pytest.mark.parametrize(
    "target", ["", "localhost", "localhost:", ":8000", "host:port", "h:0", "h:70000", 8000]
)
def test_check_target_rejects_what_is_not_host_port(target):
    with pytest.raises(ValueError, match="HOST:PORT"):
        worker.check_target(target)


@pytest.mark.parametrize(
    "target", ["localhost:8000", "10.0.0.7:1", "[::1]:65535", "w-3.example:50051"]
)
def test_check_target_accepts_host_port(target):
    worker.check_target(target)


# ---------------------------------------------------------------------------------------------
# The suite's own leak check (tests/testing.py), which every end-to-end test relies on.
# ---------------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_own_worker_check_catches_a_worker_its_child_orphaned():
    # A child that starts a worker and exits without stopping it: the worker is reparented to
    # init, where only the record made while the child ran can still find it.
    port = portpicker.pick_unused_port()
    child = subprocess.Popen(
        ["sh", "-c", '"$@" & sleep 2', "sh", str(worker.worker_binary_path()), f"--port={port}"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    own = testing.OwnWorkers(child.pid)
    try:
        testing.communicate_recording(child, own, timeout=30)
        assert len(own.workers) == 1
        (orphan,) = own.workers.values()
        assert orphan.ppid() != child.pid
        with pytest.raises(AssertionError, match="outlived its owner"):
            own.assert_gone(timeout_s=1)
    finally:
        testing.kill_leftovers(own.workers.values())
    own.assert_gone()


@pytest.mark.timeout(60)
def test_own_worker_check_ignores_workers_it_did_not_start():
    # Another job's worker runs beside the suite; a child of ours that starts none has none.
    with testing.operator_worker() as other:
        child = subprocess.Popen(["sleep", "1"], start_new_session=True)
        own = testing.OwnWorkers(child.pid)
        testing.communicate_recording(child, own, timeout=30)
        assert own.workers == {}
        assert own.add_printed(f"TFF worker_binary pid {other.process.pid}\n") == [
            other.process.pid
        ]
        assert own.workers == {}, "another job's worker counted as ours"
        own.assert_gone()
        assert other.running
