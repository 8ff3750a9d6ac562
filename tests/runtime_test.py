"""Tests of `mfl_tff.training.runtime`: TFF computations on a worker we own, and stopping it.

The property that matters most is that no `worker_binary` outlives its owner: an orphaned worker
holds the parent's stdout, and `python script.py | tee log` then never ends. The subprocess tests
read the child's stdout through a pipe to its end, so a leaked worker shows up as a missing EOF as
well as a live pid.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import numpy as np
import portpicker
import psutil
import pytest
import tensorflow_federated as tff

from mfl_tff.training import runtime
from tests import testing

# Generous bounds for a 2-core machine where several Python processes import TensorFlow at once.
CHILD_TIMEOUT_S = 90.0
PID_GONE_TIMEOUT_S = 5.0


def _sum_of_squares_closed_form(n: int) -> float:
    """1^2 + 2^2 + ... + n^2."""
    return n * (n + 1) * (2 * n + 1) / 6


@pytest.fixture(scope="module")
def sum_of_squares() -> tff.Computation:
    """A federated computation: the sum over clients of the square of each client's value."""

    @tff.tensorflow.computation(np.float32)
    def square(x):
        return x * x

    @tff.federated_computation(tff.FederatedType(np.float32, tff.CLIENTS))
    def computation(values):
        return tff.federated_sum(tff.federated_map(square, values))

    return computation


@contextlib.contextmanager
def _deadline(seconds: int) -> Iterator[None]:
    """Fails the test instead of hanging if the block takes longer than `seconds`."""

    def on_alarm(signum, frame):
        raise TimeoutError(f"Blocked for more than {seconds} s.")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _wait_until_gone(pid: int, timeout_s: float = PID_GONE_TIMEOUT_S) -> bool:
    """Whether process `pid` no longer exists within `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while psutil.pid_exists(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def _is_worker(pid: int) -> bool:
    try:
        process = psutil.Process(pid)
        return (
            process.name() == runtime.WORKER_BINARY_NAME
            and process.status() != psutil.STATUS_ZOMBIE
        )
    except psutil.NoSuchProcess:
        return False


# ---------------------------------------------------------------------------------------------
# In this process.
# ---------------------------------------------------------------------------------------------


def test_local_execution_computes_and_stops_worker(sum_of_squares):
    baseline = set(runtime.live_worker_pids())
    context_before = tff.framework.get_context_stack().current
    with _deadline(60):
        with runtime.local_execution() as service:
            assert service.running
            assert service.target == f"localhost:{service.port}"
            assert set(runtime.live_worker_pids()) - baseline == {service.pid}
            assert psutil.Process(service.pid).ppid() == os.getpid()
            result = sum_of_squares([float(i) for i in range(1, 8)])
            # A second cardinality makes a second executor on the same worker.
            result_3 = sum_of_squares([1.0, 2.0, 3.0])
    assert result == pytest.approx(_sum_of_squares_closed_form(7))
    assert result_3 == pytest.approx(_sum_of_squares_closed_form(3))
    assert not service.running
    assert set(runtime.live_worker_pids()) - baseline == set()
    assert not psutil.pid_exists(service.pid)
    # What was in effect before is back, not a context pointing at the stopped worker.
    assert tff.framework.get_context_stack().current is context_before


def test_exception_in_block_stops_worker(sum_of_squares):
    baseline = set(runtime.live_worker_pids())
    with _deadline(60):
        with pytest.raises(ValueError, match="boom"):
            with runtime.local_execution() as service:
                assert sum_of_squares([2.0]) == pytest.approx(4.0)
                raise ValueError("boom")
    assert not service.running
    assert set(runtime.live_worker_pids()) - baseline == set()
    assert not psutil.pid_exists(service.pid)


def test_dead_worker_raises_instead_of_retrying_forever(sum_of_squares):
    # TFF retries UNAVAILABLE without end; a worker that died must surface as an error.
    with _deadline(60):
        with runtime.local_execution() as service:
            assert sum_of_squares([1.0, 1.0]) == pytest.approx(2.0)
            os.kill(service.pid, signal.SIGKILL)
            while service.running:
                time.sleep(0.05)
            # Same number of clients: the cached executor's RPC fails first, so this goes
            # through TFF's retry loop.
            with pytest.raises(RuntimeError, match="exited with status"):
                sum_of_squares([1.0, 1.0])
    assert service.returncode == -signal.SIGKILL


def test_worker_output_goes_to_log_file_not_our_stdout(tmp_path, sum_of_squares):
    log_path = tmp_path / "worker.log"
    with _deadline(60):
        with runtime.local_execution(log_path=log_path) as service:
            sum_of_squares([1.0])
            assert os.readlink(f"/proc/{service.pid}/fd/1") == os.path.realpath(log_path)
            assert os.readlink(f"/proc/{service.pid}/fd/2") == os.path.realpath(log_path)
        with runtime.WorkerService() as quiet:
            assert os.readlink(f"/proc/{quiet.pid}/fd/1") == os.devnull
    # Its content is not checked here: JAX (imported by TFF) sets TF_CPP_MIN_LOG_LEVEL=1, which
    # the worker inherits, so a healthy worker logs nothing. See the startup-failure test.
    assert log_path.is_file()


def test_remote_execution_without_a_worker_raises_connection_error():
    port = portpicker.pick_unused_port()
    started = time.monotonic()
    with _deadline(30):
        with pytest.raises(ConnectionError, match=f"localhost:{port}"):
            with runtime.remote_execution(f"localhost:{port}", timeout_s=3):
                pytest.fail("entered the block without a worker")
    assert time.monotonic() - started < 10


def test_remote_execution_matches_local_and_leaves_worker_running(sum_of_squares):
    values = [0.5, 1.5, -2.0, 3.0]
    with _deadline(60):
        with runtime.local_execution():
            local = sum_of_squares(values)
        with runtime.WorkerService() as service:
            with runtime.remote_execution(service.target, timeout_s=10) as context:
                assert tff.framework.get_context_stack().current is context
                remote = sum_of_squares(values)
            # The remote worker belongs to someone else: using it must not stop it.
            assert service.running
    assert local == pytest.approx(0.25 + 2.25 + 4.0 + 9.0)
    assert remote == local
    assert not psutil.pid_exists(service.pid)


def test_create_execution_context_installed_by_hand(sum_of_squares):
    with _deadline(60):
        with runtime.WorkerService() as service:
            context = runtime.create_execution_context(service.target, default_num_clients=3)
            with tff.framework.get_context_stack().install(context):
                assert sum_of_squares([4.0, 5.0]) == pytest.approx(41.0)


# ---------------------------------------------------------------------------------------------
# Whole processes: normal exit (with a worker nobody stops), SIGTERM, Ctrl-C.
# ---------------------------------------------------------------------------------------------

_CHILD_SCRIPT = """
import signal
import sys
import time

import numpy as np
import tensorflow_federated as tff

from mfl_tff.training import runtime
from tests import testing

# Python's own Ctrl-C behaviour, even if the test runner was started with SIGINT ignored.
signal.signal(signal.SIGINT, signal.default_int_handler)


@tff.tensorflow.computation(np.float32)
def square(x):
    return x * x


@tff.federated_computation(tff.FederatedType(np.float32, tff.CLIENTS))
def sum_of_squares(values):
    return tff.federated_sum(tff.federated_map(square, values))


def say(*words):
    print(*words, flush=True)


scenario = sys.argv[1]
with runtime.local_execution() as service:
    say("WORKER", service.pid, *runtime.live_worker_pids())
    say("RESULT", sum_of_squares([1.0, 2.0, 3.0, 4.0]))
    if scenario == "normal":
        # Started and never stopped: only the atexit hook can stop this one.
        forgotten = runtime.WorkerService()
        say("FORGOTTEN", forgotten.pid)
    else:
        say("WAITING")
        time.sleep(120)
say("AFTER", *runtime.live_worker_pids())
"""

_SCENARIOS = ("normal", "sigterm", "sigint")


class _Child:
    """A Python child process running `_CHILD_SCRIPT`, with bounded reads of its stdout."""

    def __init__(self, scenario: str, stderr_path: pathlib.Path) -> None:
        self.stderr_path = stderr_path
        with open(stderr_path, "wb") as stderr:
            self.process = subprocess.Popen(
                [sys.executable, "-c", _CHILD_SCRIPT, scenario],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=stderr,
                cwd=testing.REPO_ROOT,
                env=testing.binary_env(),
            )
        self._buffer = b""
        self._eof = False
        # Every worker pid the child reported, for cleanup if a test fails half-way.
        self.worker_pids: set[int] = set()

    def _fill(self, deadline: float) -> None:
        """Reads what the child has written, waiting at most until `deadline`."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(self._failure("timed out reading the child's stdout"))
        readable, _, _ = select.select([self.process.stdout], [], [], remaining)
        if readable:
            chunk = os.read(self.process.stdout.fileno(), 65536)
            if chunk:
                self._buffer += chunk
            else:
                self._eof = True

    def read_tagged(self, tag: str, timeout_s: float = CHILD_TIMEOUT_S) -> list[str]:
        """Returns the words after `tag` of the first stdout line that starts with it."""
        deadline = time.monotonic() + timeout_s
        while True:
            while b"\n" in self._buffer:
                line, self._buffer = self._buffer.split(b"\n", 1)
                words = line.decode().split(" ", 1)
                if words[0] == tag:
                    return words[1].split(" ") if len(words) > 1 else []
            if self._eof:
                raise AssertionError(self._failure(f"stdout ended without {tag}"))
            self._fill(deadline)

    def read_pid(self, tag: str) -> int:
        """Returns the worker pid on the line tagged `tag`."""
        pid = int(self.read_tagged(tag)[0])
        self.worker_pids.add(pid)
        return pid

    def wait_for_eof(self, timeout_s: float = CHILD_TIMEOUT_S) -> str:
        """Reads stdout to its end; returns what was left. Fails if the pipe stays open."""
        deadline = time.monotonic() + timeout_s
        while not self._eof:
            self._fill(deadline)
        return self._buffer.decode()

    def wait(self, timeout_s: float = CHILD_TIMEOUT_S) -> int:
        return self.process.wait(timeout=timeout_s)

    def _failure(self, what: str) -> str:
        stderr = self.stderr_path.read_text(errors="replace")[-3000:]
        return f"{what}; child status {self.process.poll()}; stderr tail:\n{stderr}"

    def cleanup(self) -> None:
        """Ends the child (SIGTERM lets its handler stop the worker) and any worker it left."""
        workers = set(self.worker_pids)
        with contextlib.suppress(psutil.NoSuchProcess):
            for process in psutil.Process(self.process.pid).children(recursive=True):
                with contextlib.suppress(psutil.NoSuchProcess):
                    if process.name() == runtime.WORKER_BINARY_NAME:
                        workers.add(process.pid)
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=15)
        self.process.stdout.close()
        for pid in workers:
            if _is_worker(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def children(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, _Child]]:
    """All child scenarios, started together so that their TensorFlow imports overlap."""
    scratch = tmp_path_factory.mktemp("children")
    started = {}
    try:
        for scenario in _SCENARIOS:
            started[scenario] = _Child(scenario, scratch / f"{scenario}.stderr")
        yield started
    finally:
        for child in started.values():
            child.cleanup()


@pytest.fixture(scope="module", autouse=True)
def _start_children_early(request: pytest.FixtureRequest) -> None:
    """Starts the child processes first, so that their TensorFlow imports overlap other tests."""
    if any("children" in item.fixturenames for item in request.session.items):
        request.getfixturevalue("children")


def _assert_worker_was_child_of(child: _Child, worker_pid: int) -> None:
    # Checked while the child is still blocked in its block or about to exit: the pid it reports
    # must be a live worker_binary whose parent is the child.
    process = psutil.Process(worker_pid)
    assert process.name() == runtime.WORKER_BINARY_NAME
    assert process.ppid() == child.process.pid


def test_child_exiting_normally_leaves_no_worker(children):
    child = children["normal"]
    worker_pid = child.read_pid("WORKER")
    assert float(child.read_tagged("RESULT")[0]) == _sum_of_squares_closed_form(4)
    forgotten_pid = child.read_pid("FORGOTTEN")
    # After the block the child saw only the worker it never stopped.
    assert child.read_tagged("AFTER") == [str(forgotten_pid)]
    child.wait_for_eof()
    assert child.wait() == 0
    assert _wait_until_gone(worker_pid), f"worker {worker_pid} outlived its parent"
    assert _wait_until_gone(forgotten_pid), f"unstopped worker {forgotten_pid} outlived its parent"


def _signal_waiting_child(child: _Child, signum: int) -> int:
    """Sends `signum` to the child blocked in its block (to the Python process only, not its
    group: the worker must be stopped by our code); returns its exit status."""
    worker_pid = child.read_pid("WORKER")
    child.read_tagged("WAITING")
    _assert_worker_was_child_of(child, worker_pid)
    child.process.send_signal(signum)
    rest = child.wait_for_eof()
    status = child.wait()
    assert "AFTER" not in rest
    assert _wait_until_gone(worker_pid), f"worker {worker_pid} outlived its parent"
    return status


def test_child_killed_by_sigterm_leaves_no_worker(children):
    status = _signal_waiting_child(children["sigterm"], signal.SIGTERM)
    # The handler re-delivers SIGTERM, so the parent sees the usual "killed by SIGTERM".
    assert status == -signal.SIGTERM


def test_child_interrupted_by_ctrl_c_leaves_no_worker(children):
    child = children["sigint"]
    status = _signal_waiting_child(child, signal.SIGINT)
    assert status != 0
    assert "KeyboardInterrupt" in child.stderr_path.read_text(errors="replace")
