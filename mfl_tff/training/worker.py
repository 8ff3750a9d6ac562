"""TFF's C++ worker (`worker_binary`) as a process this Python process owns.

TFF's default runtime starts `worker_binary` lazily from inside a closure, points the worker's
stdout and stderr at ours, and stops it only from a `__del__`. A worker that outlives Python keeps
our stdout open, so `python script.py | tee log` never finishes. Here the worker is an object:

* `WorkerService` starts `worker_binary` on a free port, sends its output to a log file (or
  nowhere, never our stdout), waits until it answers gRPC, and stops it with SIGINT and then
  SIGKILL.
* Every started worker is registered: `atexit` and a SIGTERM handler stop the ones still running,
  and `stop_all_workers()` does it on demand. `live_worker_pids()` lists the `worker_binary`
  children of this process, for tests and diagnostics.
* `wait_for_worker(target, timeout_s)` checks that a worker somebody else runs answers.

`mfl_tff.training.runtime` builds TFF execution contexts on top of these workers.

Note: nothing of ours runs if this process is killed with SIGKILL. The worker then survives unless
the whole process group is killed (it stays in ours for that reason), but as its output does not
go to our stdout, it no longer keeps a pipe open.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import pathlib
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Optional, Union

import grpc
import portpicker
import psutil
import tensorflow_federated as tff

__all__ = [
    "INTRA_OP_THREADS_ENV",
    "WorkerExitedError",
    "WorkerService",
    "configured_intra_op_threads",
    "default_intra_op_threads",
    "live_worker_pids",
    "stop_all_workers",
    "wait_for_worker",
    "worker_binary_path",
]

_LOG = logging.getLogger(__name__)

WORKER_BINARY_NAME = "worker_binary"

# The same limits TFF's `local_cpp_executor_factory` puts on its channel: model weights and
# federated data sets travel as single messages, and gRPC's 4 MB default is far too small.
_GRPC_MAX_MESSAGE_LENGTH_BYTES = 2 * 1000 * 1000 * 1000
GRPC_CHANNEL_OPTIONS = (
    ("grpc.max_message_length", _GRPC_MAX_MESSAGE_LENGTH_BYTES),
    ("grpc.max_receive_message_length", _GRPC_MAX_MESSAGE_LENGTH_BYTES),
    ("grpc.max_send_message_length", _GRPC_MAX_MESSAGE_LENGTH_BYTES),
)

# Polling interval while a worker starts; it listens within ~0.1 s on this project's machines.
_STARTUP_POLL_S = 0.05

PathLike = Union[str, "os.PathLike[str]"]


class WorkerExitedError(RuntimeError):
    """A worker this process started has exited (crashed, or killed by someone else)."""


def worker_binary_path() -> pathlib.Path:
    """Returns the path of `worker_binary` in the installed `tensorflow_federated` package.

    Raises:
        RuntimeError: If the installed package has no executable `data/worker_binary` (for
            example a source checkout without the built binary).
    """
    path = pathlib.Path(tff.__file__).resolve().parent / "data" / WORKER_BINARY_NAME
    if not path.is_file():
        raise RuntimeError(
            f"TFF's {WORKER_BINARY_NAME} was not found at {path}; the installed "
            f"tensorflow_federated {tff.__version__} package does not ship it."
        )
    if not os.access(path, os.X_OK):
        raise RuntimeError(f"TFF's {WORKER_BINARY_NAME} at {path} is not executable.")
    return path


# ---------------------------------------------------------------------------------------------
# Registry of running workers, stopped at process exit.
# ---------------------------------------------------------------------------------------------

# Re-entrant because the SIGTERM handler runs on the main thread between bytecodes and may
# interrupt code on that same thread that holds the lock.
_REGISTRY_LOCK = threading.RLock()
_LIVE_SERVICES: set[WorkerService] = set()
_ATEXIT_REGISTERED = False
_SIGTERM_INSTALLED = False


def _register(service: WorkerService) -> None:
    with _REGISTRY_LOCK:
        _LIVE_SERVICES.add(service)
    _install_exit_hooks()


def _unregister(service: WorkerService) -> None:
    with _REGISTRY_LOCK:
        _LIVE_SERVICES.discard(service)


def _install_exit_hooks() -> None:
    """Installs the `atexit` hook and the SIGTERM handler the first time a worker starts.

    Done lazily rather than at import so that importing this module does not change how the
    process reacts to signals.
    """
    global _ATEXIT_REGISTERED, _SIGTERM_INSTALLED
    with _REGISTRY_LOCK:
        if not _ATEXIT_REGISTERED:
            atexit.register(stop_all_workers)
            _ATEXIT_REGISTERED = True
        if _SIGTERM_INSTALLED:
            return
        # Python only lets the main thread set handlers. If the first worker is started from
        # another thread, a later start from the main thread installs it.
        if threading.current_thread() is not threading.main_thread():
            return
        # Someone else's handler (a framework, a launcher) stays in charge; atexit still runs if
        # that handler exits through `sys.exit`.
        if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
            _SIGTERM_INSTALLED = True
            return
        signal.signal(signal.SIGTERM, _handle_sigterm)
        _SIGTERM_INSTALLED = True


def _handle_sigterm(signum: int, frame: object) -> None:
    """Stops all workers, then dies of SIGTERM exactly as the default disposition would.

    The default SIGTERM action ends the process without running `atexit` hooks, so without this
    handler `kill PID` would leave the workers behind.
    """
    del frame  # Unused.
    stop_all_workers()
    # Best effort: lines still in Python's buffers would otherwise never reach `| tee`. This can
    # fail if the signal interrupted a write on the same stream.
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            if stream is not None:
                stream.flush()
    # Re-deliver with the default action so the parent sees "killed by SIGTERM" (-15, or 143 in a
    # shell), the same status it would have seen without our handler.
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)
    # Not reached on Linux, which delivers a signal sent to oneself before `kill` returns.
    os._exit(128 + signum)


def stop_all_workers() -> None:
    """Stops every `WorkerService` of this process that is still running.

    Safe to call at any time and more than once; registered with `atexit` and called from the
    SIGTERM handler.
    """
    with _REGISTRY_LOCK:
        services = list(_LIVE_SERVICES)
    for service in services:
        try:
            service.stop()
        except Exception:  # One failing stop must not leave the others running.
            _LOG.exception("Failed to stop %r", service)


def live_worker_pids() -> list[int]:
    """Returns the pids of running `worker_binary` processes that are children of this process.

    Only direct children: workers of our own child processes belong to those. Zombies (exited,
    not yet reaped) do not count: they hold no port and no pipe.
    """
    pids = []
    for child in psutil.Process().children(recursive=False):
        try:
            if child.status() == psutil.STATUS_ZOMBIE:
                continue
            if child.name() == WORKER_BINARY_NAME:
                pids.append(child.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue  # Exited while we looked, or not ours to inspect.
    return sorted(pids)


def _ignores_sigint(pid: int) -> bool:
    """Whether process `pid` ignores SIGINT, from the SigIgn mask in /proc (Linux).

    Elsewhere, or if the mask cannot be read, assumes it does not.
    """
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("SigIgn:"):
                    return bool(int(line.split()[1], 16) & (1 << (signal.SIGINT - 1)))
    except (OSError, ValueError, IndexError):
        pass
    return False


# ---------------------------------------------------------------------------------------------
# The worker process.
# ---------------------------------------------------------------------------------------------


INTRA_OP_THREADS_ENV = "TF_NUM_INTRAOP_THREADS"


def default_intra_op_threads() -> int:
    """Threads per op of a local worker: half the machine's cores, since the driver and the
    worker's other ops share them.

    TensorFlow's default, every core, made a worker on 2 cores spend 1.3-1.45x the CPU per round
    on digits_fewshot mfl (worker CPU 80.7-90.8 against 62.8 ms a round) and run 1.24x slower
    in process; the MLP tasks' states came out equal to 1e-9 (a checksum of the whole state), but
    a convolution's reductions follow the thread count, so CNN results move at float precision.
    """
    return max(1, (os.cpu_count() or 2) // 2)


def _worker_environment(intra_op_threads: Optional[int]) -> dict[str, str]:
    """The environment a local worker starts with: ours, with its threads per op
    (`intra_op_threads`, else `TF_NUM_INTRAOP_THREADS` if set, else the default)."""
    env = dict(os.environ)
    if intra_op_threads is not None:
        env[INTRA_OP_THREADS_ENV] = str(intra_op_threads)
    else:
        env.setdefault(INTRA_OP_THREADS_ENV, str(default_intra_op_threads()))
    return env


def configured_intra_op_threads() -> int:
    """Threads per op of a local worker started now without `intra_op_threads=`, read from the
    environment it would get; 0 (TensorFlow's own default, as for a session) if that value is
    not an integer, since TensorFlow then ignores it."""
    try:
        return int(_worker_environment(None)[INTRA_OP_THREADS_ENV])
    except ValueError:
        return 0


class WorkerService:
    """A running `worker_binary` (TFF's C++ executor service) owned by this process.

    The constructor starts the worker and returns once it answers gRPC, so an instance is always
    either serving or stopped, never half-started. Like `subprocess.Popen`, it is also a context
    manager whose exit stops the worker.

    The worker (TFF's binary, not ours) listens on all interfaces, without authentication; on a
    shared network, firewall the port.

    Attributes:
        target: gRPC target of the worker, "localhost:PORT".
        port: TCP port the worker listens on.
        log_path: File that receives the worker's stdout and stderr, or None if discarded.
    """

    def __init__(
        self,
        *,
        log_path: Optional[PathLike] = None,
        port: Optional[int] = None,
        startup_timeout_s: float = 60.0,
        stop_timeout_s: float = 10.0,
        max_concurrent_computation_calls: int = -1,
        intra_op_threads: Optional[int] = None,
    ) -> None:
        """Starts the worker and waits until it serves.

        Args:
            log_path: File to append the worker's stdout and stderr to. None discards them. They
                never go to our stdout: a worker holding our stdout keeps `| tee` from ending.
            port: Port to serve on; a free one (portpicker) if None.
            startup_timeout_s: How long to wait for the worker to answer gRPC.
            stop_timeout_s: How long `stop()` waits after SIGINT before SIGKILL, and again after
                SIGKILL.
            max_concurrent_computation_calls: Passed to the worker; non-positive means no limit
                (TFF's default).
            intra_op_threads: Threads each TensorFlow op of the worker may split into
                (`TF_NUM_INTRAOP_THREADS`). None: that variable if it is set, else
                `default_intra_op_threads()`.

        Raises:
            RuntimeError: If the binary is missing, or the worker exits during startup.
            TimeoutError: If the worker does not answer within `startup_timeout_s`.
        """
        binary = worker_binary_path()
        self.port = port if port is not None else portpicker.pick_unused_port()
        self.target = f"localhost:{self.port}"
        self.log_path = pathlib.Path(log_path) if log_path is not None else None
        self._stop_timeout_s = stop_timeout_s
        # Re-entrant so that the SIGTERM handler can stop a worker whose `stop()` it interrupted.
        self._lock = threading.RLock()
        args = [
            str(binary),
            f"--port={self.port}",
            f"--max_concurrent_computation_calls={max_concurrent_computation_calls}",
        ]
        if self.log_path is not None:
            # Appended to, so that several workers (or runs) can share one log file.
            output = open(self.log_path, "ab")  # Closed right after the fork.
        else:
            output = subprocess.DEVNULL
        try:
            # stdin from /dev/null too: the worker must not hold any of our standard streams.
            # The worker stays in our process group so that a signal to the whole job (Ctrl-C in
            # a terminal, `kill -- -PGID`) reaches it even if Python cannot clean up.
            env = _worker_environment(intra_op_threads)
            self._process = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=output,
                close_fds=True,
                env=env,
            )
        finally:
            if self.log_path is not None:
                output.close()  # The child has its own copy of the descriptor.
        self.pid = self._process.pid
        _register(self)
        _LOG.info("Started %s (pid %d) serving %s", WORKER_BINARY_NAME, self.pid, self.target)
        try:
            self._wait_until_serving(startup_timeout_s)
        except BaseException:
            # Including KeyboardInterrupt: a worker that never became usable must not linger.
            self.stop()
            raise

    def _where_to_look(self) -> str:
        if self.log_path is not None:
            return f"see its log {self.log_path}"
        return "pass log_path to keep its output"

    def _wait_until_serving(self, timeout_s: float) -> None:
        """Blocks until the worker accepts TCP connections and its gRPC channel is READY."""
        deadline = time.monotonic() + timeout_s
        # A plain TCP probe first: a gRPC channel that fails its first connect backs off for ~1 s
        # before retrying, which would add a second to every start.
        while True:
            self.check_alive()
            try:
                with socket.create_connection(("localhost", self.port), timeout=_STARTUP_POLL_S):
                    break
            except OSError:
                pass
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"{WORKER_BINARY_NAME} (pid {self.pid}) did not listen on port {self.port} "
                    f"within {timeout_s} s; {self._where_to_look()}."
                )
            time.sleep(_STARTUP_POLL_S)
        remaining = max(deadline - time.monotonic(), _STARTUP_POLL_S)
        if not channel_ready(self.target, remaining):
            self.check_alive()
            raise TimeoutError(
                f"{WORKER_BINARY_NAME} (pid {self.pid}) listens on port {self.port} but did not "
                f"answer gRPC within {timeout_s} s; {self._where_to_look()}."
            )

    @property
    def running(self) -> bool:
        """Whether the worker process is still alive."""
        return self._process.poll() is None

    @property
    def returncode(self) -> Optional[int]:
        """The worker's exit status once it has exited (negative: killed by that signal)."""
        return self._process.poll()

    def check_alive(self) -> None:
        """Raises `WorkerExitedError` (a RuntimeError) if the worker process has exited."""
        code = self._process.poll()
        if code is not None:
            raise WorkerExitedError(
                f"{WORKER_BINARY_NAME} (pid {self.pid}, {self.target}) exited with status {code}; "
                f"{self._where_to_look()}."
            )

    def stop(self) -> Optional[int]:
        """Stops the worker: SIGINT, a bounded wait, then SIGKILL. Idempotent.

        SIGINT is what TFF itself sends; the worker's gRPC server exits on it at once. A process
        started with SIGINT ignored (any `cmd &` in a shell without job control) passes that on to
        the worker through `exec`, and such a worker gets SIGTERM instead. SIGKILL follows if the
        worker is still alive after `stop_timeout_s`.

        Returns:
            The worker's exit status (negative: the signal that ended it), or None if it could not
            be reaped in time (it then stays registered for `stop_all_workers`).
        """
        with self._lock:
            process = self._process
            if process.poll() is None:
                polite = signal.SIGTERM if _ignores_sigint(self.pid) else signal.SIGINT
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(polite)
                try:
                    process.wait(timeout=self._stop_timeout_s)
                except subprocess.TimeoutExpired:
                    _LOG.warning(
                        "%s (pid %d) still running %.1f s after %s; sending SIGKILL",
                        WORKER_BINARY_NAME,
                        self.pid,
                        self._stop_timeout_s,
                        polite.name,
                    )
                    with contextlib.suppress(ProcessLookupError):
                        process.kill()
                    try:
                        process.wait(timeout=self._stop_timeout_s)
                    except subprocess.TimeoutExpired:
                        # Only in a stuck kernel state (uninterruptible I/O).
                        _LOG.error("%s (pid %d) survived SIGKILL", WORKER_BINARY_NAME, self.pid)
                        return None
                _LOG.info(
                    "Stopped %s (pid %d), status %s",
                    WORKER_BINARY_NAME,
                    self.pid,
                    process.returncode,
                )
            _unregister(self)
            return process.returncode

    def __enter__(self) -> WorkerService:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running else f"exited {self.returncode}"
        return f"WorkerService(target={self.target!r}, pid={self.pid}, {state})"


def channel_ready(target: str, timeout_s: float) -> bool:
    """Whether a gRPC server at `target` accepts a channel within `timeout_s`.

    Probes over a fresh channel that is closed again, never over the channel a stub uses:
    `grpc.channel_ready_future` on a channel that already has a subscriber sets a pending
    "try to connect" flag in grpcio, and closing that channel before grpcio's polling thread has
    consumed the flag makes the thread die with "Cannot invoke RPC: Channel closed!".
    """
    channel = grpc.insecure_channel(target, options=GRPC_CHANNEL_OPTIONS)
    future = grpc.channel_ready_future(channel)
    try:
        future.result(timeout=timeout_s)
        return True
    except grpc.FutureTimeoutError:
        return False
    finally:
        future.cancel()
        channel.close()


def check_target(target: object) -> None:
    """Raises ValueError unless `target` looks like a gRPC target "HOST:PORT"."""
    if not isinstance(target, str) or not target.strip():
        raise ValueError(f"Expected a gRPC target such as 'HOST:PORT', got {target!r}.")
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"Expected a gRPC target such as 'HOST:PORT', got {target!r}.")


def wait_for_worker(target: str, timeout_s: float) -> None:
    """Returns once a TFF worker answers gRPC at `target`.

    Raises:
        ValueError: If `target` is not "HOST:PORT".
        ConnectionError: If nothing answers within `timeout_s` (gRPC connects lazily and TFF
            would retry an unreachable worker forever, so callers check first).
    """
    check_target(target)
    if not channel_ready(target, timeout_s):
        raise ConnectionError(f"No TFF worker answered at {target} within {timeout_s:g} s.")
