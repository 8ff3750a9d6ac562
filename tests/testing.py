"""Helpers shared by the tests: binaries run as subprocesses, the TFF workers they start, digests,
numeric comparisons, and small EMNIST files. Fixtures built on these are in conftest.py.

Not collected by pytest (the suite collects `*_test.py` only).

Worker-leak checks look only at processes the test itself started: the machine may run other TFF
jobs beside the suite, and their `worker_binary` processes come and go as they please. A child's
worker is found through the child while the child runs (an orphaned worker is reparented to init,
so after the child exits it can no longer be found that way), and is then checked gone by its
`psutil.Process`, which also tells a reused pid from the worker that had it.
"""

from __future__ import annotations

import collections
import contextlib
import csv
import dataclasses
import hashlib
import os
import pathlib
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent import futures
from typing import Any, Optional, Union

import dp_accounting
import numpy as np
import portpicker
import psutil
import tensorflow as tf
import tensorflow_federated as tff

from mfl_tff.algorithms import aggregation, builders
from mfl_tff.training import worker

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
WORKER_BINARY_NAME = worker.WORKER_BINARY_NAME
# What experiments/train.py prints once its worker is up.
WORKER_PID = re.compile(r"TFF worker_binary pid (\d+)")
# Bounds for a 2-core machine that other TensorFlow processes may share.
RUN_TIMEOUT_S = 300.0
PID_GONE_TIMEOUT_S = 10.0
# How often a running child's descendants are listed (one listing costs a few ms).
POLL_S = 0.2


# ---------------------------------------------------------------------------------------------
# Binaries as subprocesses, and the workers they start.
# ---------------------------------------------------------------------------------------------


def binary_env() -> dict[str, str]:
    """The environment `make test` gives a binary: the repository importable, TF's C++ quiet."""
    return dict(os.environ, PYTHONPATH=str(REPO_ROOT), TF_CPP_MIN_LOG_LEVEL="3")


def binary_command(module: str, *flags: str) -> list[str]:
    """`python -m experiments.<module> FLAGS...`."""
    return [sys.executable, "-m", f"experiments.{module}", *flags]


class OwnWorkers:
    """The `worker_binary` processes below one child process, recorded while the child runs."""

    def __init__(self, pid: int) -> None:
        try:
            self._root: Optional[psutil.Process] = psutil.Process(pid)
        except psutil.NoSuchProcess:
            self._root = None
        self.workers: dict[int, psutil.Process] = {}

    def record(self) -> None:
        """Adds the child's current worker descendants (none once the child is gone)."""
        if self._root is None:
            return
        try:
            descendants = self._root.children(recursive=True)
        except psutil.NoSuchProcess:
            return
        for process in descendants:
            try:
                if process.name() == WORKER_BINARY_NAME:
                    self.workers.setdefault(process.pid, process)
            except psutil.NoSuchProcess:
                continue

    def add_printed(self, stdout: str) -> list[int]:
        """Adds the worker pids the child printed (`TFF worker_binary pid N`); returns them.

        Polling has normally seen them already. A printed worker that has exited counts as gone;
        one still running counts as the child's only if its parent is the child, or init (which
        adopts orphans): a pid reused by another job's worker has that job for its parent.
        """
        pids = [int(m) for m in WORKER_PID.findall(stdout)]
        for pid in pids:
            if pid in self.workers:
                continue
            try:
                process = psutil.Process(pid)
                parents = {1} if self._root is None else {1, self._root.pid}
                if process.name() == WORKER_BINARY_NAME and process.ppid() in parents:
                    self.workers[pid] = process
            except psutil.NoSuchProcess:
                continue
        return pids

    def assert_gone(self, timeout_s: float = PID_GONE_TIMEOUT_S) -> None:
        assert_gone(self.workers.values(), timeout_s)


def _alive(process: psutil.Process) -> bool:
    """Whether `process` (this very process, not a later one with its pid) still runs."""
    try:
        # A zombie has exited; it waits only for its (possibly dead) parent to reap it.
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def assert_gone(processes: Iterable[psutil.Process], timeout_s: float = PID_GONE_TIMEOUT_S) -> None:
    """Fails unless every one of `processes` exits within `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    for process in processes:
        while _alive(process):
            assert time.monotonic() < deadline, f"worker_binary {process.pid} outlived its owner"
            time.sleep(0.05)


def kill_leftovers(processes: Iterable[psutil.Process]) -> None:
    """SIGKILLs what is still alive of `processes`, so one failing test leaks nothing."""
    for process in processes:
        if _alive(process):
            try:
                process.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass


@dataclasses.dataclass
class OperatorWorker:
    """A `worker_binary --port=N` started as another host's operator would start it."""

    target: str
    process: psutil.Process

    @property
    def running(self) -> bool:
        return _alive(self.process)


@contextlib.contextmanager
def operator_worker(log_path: Optional[pathlib.Path] = None) -> Iterator[OperatorWorker]:
    """TFF's worker_binary on a free loopback port, started by a shell rather than by this process.

    Not `WorkerService`: that registers the worker with this process's library and makes it a
    child of this process, where the tests of the library (`live_worker_pids`,
    `stop_all_workers`) would see it. Yields once the worker answers gRPC; stops it afterwards.
    """
    port = portpicker.pick_unused_port()
    output = open(log_path, "ab") if log_path is not None else subprocess.DEVNULL
    shell = subprocess.Popen(
        ["sh", "-c", '"$@" & wait', "sh", str(worker.worker_binary_path()), f"--port={port}"],
        stdin=subprocess.DEVNULL,
        stdout=output,
        stderr=output,
        start_new_session=True,
    )
    if log_path is not None:
        output.close()
    children: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 30
        while not (children := psutil.Process(shell.pid).children()):
            assert shell.poll() is None and time.monotonic() < deadline, "no worker started"
            time.sleep(0.05)
        target = f"localhost:{port}"
        worker.wait_for_worker(target, timeout_s=60)
        yield OperatorWorker(target, children[0])
    finally:
        kill_group(shell)  # The worker is in the shell's process group.
        assert_gone(children)


@dataclasses.dataclass
class Run:
    """A finished binary: what `subprocess.run` gives, and the workers seen below it."""

    args: list[str]
    returncode: int
    stdout: str
    stderr: str
    workers: OwnWorkers


def run_binary(module: str, *flags: str, timeout: float = RUN_TIMEOUT_S) -> Run:
    """Runs `python -m experiments.<module> FLAGS...` to its end and checks its workers are gone.

    Fails if the binary takes longer than `timeout` (its process group is killed) or if a worker
    it started (seen below it while it ran, or printed by it) outlives it.
    """
    process = start_binary(module, *flags, stdout=subprocess.PIPE)
    workers = OwnWorkers(process.pid)
    stdout, stderr = communicate_recording(process, workers, timeout)
    workers.add_printed(stdout)
    try:
        workers.assert_gone()
    finally:
        kill_leftovers(workers.workers.values())
    return Run(process.args, process.returncode, stdout, stderr, workers)


# Every binary started, so that an interrupted session can stop the ones still running.
_STARTED: list[subprocess.Popen] = []
_STARTED_LOCK = threading.Lock()


def start_binary(module: str, *flags: str, stdout) -> subprocess.Popen:
    """Starts `python -m experiments.<module> FLAGS...` in its own session (so that a test can kill
    its process group, the binary and everything it started), stdout to `stdout`, stderr to a
    pipe. Ctrl-C reaches it as it would from a terminal: conftest.py makes sure the runner does
    not ignore SIGINT (children inherit that).
    """
    process = subprocess.Popen(
        binary_command(module, *flags),
        cwd=REPO_ROOT,
        env=binary_env(),
        stdin=subprocess.DEVNULL,
        stdout=stdout,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    with _STARTED_LOCK:
        _STARTED[:] = [p for p in _STARTED if p.poll() is None] + [process]
    return process


def communicate_recording(
    process: subprocess.Popen, workers: OwnWorkers, timeout: float = RUN_TIMEOUT_S
) -> tuple[Any, Any]:
    """`process.communicate()`, listing its worker descendants every POLL_S while it runs."""
    deadline = time.monotonic() + timeout
    while True:
        workers.record()
        try:
            # Retrying after TimeoutExpired loses no output (subprocess's documented contract).
            return process.communicate(timeout=POLL_S)
        except subprocess.TimeoutExpired:
            if time.monotonic() > deadline:
                kill_group(process)
                kill_leftovers(workers.workers.values())
                raise AssertionError(f"{process.args} ran longer than {timeout:.0f} s") from None


def kill_group(process: subprocess.Popen) -> None:
    """SIGKILLs the process group of `process` (started with `start_new_session=True`)."""
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait(timeout=30)


def wait_for_path(
    path: pathlib.Path,
    process: subprocess.Popen,
    workers: OwnWorkers,
    timeout: float = RUN_TIMEOUT_S,
) -> None:
    """Waits (recording `workers`) until `path` exists; fails if `process` exits first."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        workers.record()
        assert process.poll() is None, f"exited with {process.returncode} before {path} existed"
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.05)
    workers.record()


def last_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[-1] if lines else ""


# The tiny configuration of experiments/train.py the end-to-end tests share: FedAvg on 6 digits
# clients, 3 per round, evaluated every 3 rounds, a checkpoint after every round (all kept).
TINY_TOTAL_ROUNDS = 6
TINY_ROUNDS_PER_EVAL = 3
TINY_EXPERIMENT = "tiny"
TINY_FLAGS = (
    "--task=digits",
    "--algorithm=fedavg",
    "--num_train_clients=6",
    "--num_eval_clients=3",
    "--clients_per_round=3",
    f"--total_rounds={TINY_TOTAL_ROUNDS}",
    "--inner_steps=2",
    f"--rounds_per_eval={TINY_ROUNDS_PER_EVAL}",
    "--rounds_per_checkpoint=1",
    "--checkpoints_to_keep=0",
    f"--experiment_name={TINY_EXPERIMENT}",
)


def tiny_flags(total_rounds: int) -> tuple[str, ...]:
    """TINY_FLAGS with another --total_rounds (the rounds trained do not depend on it)."""
    return tuple(
        f"--total_rounds={total_rounds}" if f.startswith("--total_rounds=") else f
        for f in TINY_FLAGS
    )


class Background:
    """Expensive jobs (a binary, a notebook) started early in threads of their own.

    Most of the suite runs in the pytest process on one core; a job started at the beginning of
    the session runs on the other one meanwhile, and is usually done by the time its test asks
    for it. A job is a function of a fresh scratch directory (made in the main thread) that
    returns what its tests check; its exception, if it raises one, is raised where the result is
    asked for. A job still waiting for a thread when it is asked for runs in the asking thread.
    """

    def __init__(self, tmp_path_factory, max_workers: int) -> None:
        self._factory = tmp_path_factory
        self._pool = futures.ThreadPoolExecutor(max_workers, thread_name_prefix="background")
        self._jobs: dict[str, tuple[Callable[[pathlib.Path], Any], pathlib.Path]] = {}
        self._futures: dict[str, futures.Future] = {}

    def _register(self, key: str, job: Callable[[pathlib.Path], Any]) -> None:
        if key not in self._jobs:
            scratch = self._factory.mktemp(re.sub(r"\W+", "_", key)[-40:])
            self._jobs[key] = (job, scratch)

    def start(self, key: str, job: Callable[[pathlib.Path], Any]) -> None:
        """Queues `job` under `key` (unless it is already known)."""
        if key in self._jobs:
            return
        self._register(key, job)
        self._futures[key] = self._pool.submit(job, self._jobs[key][1])

    def result(self, key: str, job: Callable[[pathlib.Path], Any]) -> Any:
        """What `job` returned (running it here if it was not started, or not yet taken up)."""
        self._register(key, job)
        future = self._futures.get(key)
        if future is None or future.cancel():
            future = futures.Future()
            try:
                future.set_result(self._jobs[key][0](self._jobs[key][1]))
            except BaseException as e:  # Kept, so that every test asking gets the same failure.
                future.set_exception(e)
            self._futures[key] = future
        return future.result()

    def results(self, module_name: str, fixture_name: str) -> Mapping[str, Any]:
        """`{job name: result}` of the jobs module `module_name` declares for `fixture_name` (in
        its `BACKGROUND_JOBS`, see conftest.py). Read lazily: a job that failed fails only the
        tests that read its result."""
        jobs = sys.modules[module_name].BACKGROUND_JOBS[fixture_name]
        return _Results(self, module_name, fixture_name, jobs)

    def close(self) -> None:
        """Drops the jobs nobody started, and stops the binaries of the running ones: at the end
        of a session nobody will read their results (a session stopped early, by Ctrl-C or -x)."""
        self._pool.shutdown(wait=False, cancel_futures=True)
        with _STARTED_LOCK:
            started = list(_STARTED)
        for process in started:
            kill_group(process)
        self._pool.shutdown(wait=True)


def job_key(module_name: str, fixture_name: str, job_name: str) -> str:
    return f"{module_name}:{fixture_name}:{job_name}"


class _Results(Mapping):
    """The results of some jobs of a `Background`, each read (and waited for) when looked up."""

    def __init__(self, background: Background, module_name: str, fixture_name: str, jobs: dict):
        self._background = background
        self._prefix = (module_name, fixture_name)
        self._jobs = jobs

    def __getitem__(self, name: str) -> Any:
        return self._background.result(job_key(*self._prefix, name), self._jobs[name])

    def __iter__(self):
        return iter(self._jobs)

    def __len__(self) -> int:
        return len(self._jobs)


# ---------------------------------------------------------------------------------------------
# Files the binaries write.
# ---------------------------------------------------------------------------------------------


def tree_digest(root: pathlib.Path) -> str:
    """Hash of every path and file content under `root` (new, changed or removed files show)."""
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        digest.update(str(path.relative_to(root)).encode())
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()


def csv_rows(path: pathlib.Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def saved_rounds(checkpoints: pathlib.Path) -> list[int]:
    """Rounds with a complete checkpoint (a save in progress has a temporary name)."""
    names = (re.fullmatch(r"program_state_(\d+)", p.name) for p in checkpoints.iterdir())
    return sorted(int(m.group(1)) for m in names if m)


def checkpoint_tensors(
    root: pathlib.Path, experiment: str, round_num: int
) -> dict[str, np.ndarray]:
    """The numeric tensors of one saved program state under ROOT/checkpoints, by name.

    Reads either format the binary has written: a `.npz`-style file of the state's leaves with
    their paths (mfl_tff.training.state_manager), or TFF's SavedModel directory.
    """
    path = root / "checkpoints" / experiment / f"program_state_{round_num}"
    tensors = {}
    if path.is_dir():
        reader = tf.train.load_checkpoint(str(path / "variables" / "variables"))
        for name in reader.get_variable_to_shape_map():
            tensors[name] = reader.get_tensor(name)
    else:
        with np.load(path, allow_pickle=False) as saved:
            names = saved["__paths__"].tolist()
            tensors = {name: saved[str(i)] for i, name in enumerate(names) if str(i) in saved}
    return {
        name: value
        for name, value in tensors.items()
        if isinstance(value, np.ndarray) and value.dtype.kind in "fiu"
    }


# ---------------------------------------------------------------------------------------------
# Numbers.
# ---------------------------------------------------------------------------------------------

Nested = Union[np.ndarray, Sequence[Any], dict[str, Any], float]


def max_abs_diff(a: Nested, b: Nested) -> float:
    """The largest |a - b| over two nested structures of arrays of the same structure and shapes.

    Lists and tuples count as the same structure (TFF returns one where Keras gives the other);
    dicts must have the same keys.
    """
    tf.nest.assert_same_structure(a, b, check_types=False)
    worst = 0.0
    for x, y in zip(tf.nest.flatten(a), tf.nest.flatten(b)):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        assert x.shape == y.shape, (x.shape, y.shape)
        worst = max(worst, float(np.max(np.abs(x - y), initial=0.0)))
    return worst


def flat(values: Iterable[Any]) -> np.ndarray:
    """Arrays raveled and concatenated into one float64 vector."""
    return np.concatenate([np.ravel(np.asarray(v, np.float64)) for v in values])


def copy_client(client):
    """A deep copy of a packed client (its arrays may then be changed in place)."""
    return tf.nest.map_structure(np.copy, client)


# Options of the aggregator tests (aggregation_test.py, faults_test.py,
# secure_aggregation_test.py): server steps are SGD at rate 1 (and mfl's meta step on alpha too),
# so a round moves the model and alpha by exactly minus the aggregate; one inner step keeps mfl's
# second-order builds quick (aggregation does not depend on the step count).
AGGREGATOR_TEST_OPTIONS = dict(
    inner_lr=0.4,
    inner_steps=1,
    meta_optimizer="sgd",
    meta_lr=1.0,
    server_optimizer="sgd",
    server_lr=1.0,
)
# Clients per round of those tests (conftest.py's `fewshot_clients`).
AGGREGATOR_TEST_CLIENTS = 4
_WITH_AGGREGATORS: dict = {}


def with_aggregators(task, algorithm: str, kind: str, clients_per_round: int, **settings):
    """The process of `algorithm` on `task` with AGGREGATOR_TEST_OPTIONS and `kind` aggregators
    (`settings` go to `aggregation.build_aggregators`).

    Built once per configuration in a session: building is the slow part of those tests, and the
    two modules share their mean-aggregated processes.
    """
    key = (algorithm, kind, tuple(sorted(settings.items())))
    cached = _WITH_AGGREGATORS.get(key)
    if cached is None or cached[0] is not task:
        if kind == "dp":
            settings = dict(settings, clients_per_round=clients_per_round)
        aggregators = aggregation.build_aggregators(
            kind, learns_alpha=algorithm in builders.LEARNS_ALPHA, **settings
        )
        options = builders.AlgorithmOptions(
            **AGGREGATOR_TEST_OPTIONS,
            model_aggregator=aggregators.model,
            meta_aggregator=aggregators.meta,
        )
        cached = (task, builders.build_algorithm(algorithm, task, options)[0])
        _WITH_AGGREGATORS[key] = cached
    return cached[1]


def model_and_meta(process, state) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """The trainable model weights and (for algorithms that learn them) the meta-parameters of
    `state`, flat: alpha, then the meta-model's own parameters when it has some."""
    theta = flat(process.get_model_weights(state).trainable)
    hparams = process.get_hparams(state) if process.get_hparams is not None else {}
    if "alpha" not in hparams:
        return theta, None
    return theta, flat(tf.nest.flatten([hparams["alpha"], hparams.get("meta_model", ())]))


# The keys of personalization.json (docs/architecture.md, "File contracts").
PERSONALIZATION_KEYS = {
    "task",
    "algorithm",
    "metric",
    "num_clients",
    "rounds",
    "before_adaptation",
    "after_adaptation",
    "steps_curve",
}
DISTRIBUTION_KEYS = {"mean", "p10", "median", "p90"}
PRIVACY_REPORT_KEYS = {
    "epsilon",
    "delta",
    "noise_multiplier",
    "sampling_rate",
    "rounds",
    "accountant",
}


def rdp_epsilon_round_by_round(q: float, z: float, rounds: int, delta: float) -> float:
    """Poisson-sampled Gaussian rounds composed one at a time with dp_accounting's RDP accountant
    (not one self-composed event, as the module under test does)."""
    accountant = dp_accounting.rdp.RdpAccountant()
    for _ in range(rounds):
        accountant.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)))
    return accountant.get_epsilon(delta)


# ---------------------------------------------------------------------------------------------
# Small files in TFF's EMNIST SQLite format.
# ---------------------------------------------------------------------------------------------

NUM_WRITERS = 12
NUM_EVAL = 3
# The 62-class splits have two writers more, as the real file does (3,400 vs 3,383).
NUM_WRITERS_ALL = 14

Writers = dict[str, tuple[np.ndarray, np.ndarray]]


def random_writers(rng: np.random.Generator, ids: list[str], num_classes: int) -> Writers:
    writers = {}
    for cid in ids:
        n = int(rng.integers(3, 16))
        pixels = rng.random((n, 28, 28), dtype=np.float32)
        labels = rng.integers(0, num_classes, size=n).astype(np.int32)
        writers[cid] = (pixels, labels)
    return writers


def write_emnist_file(path: str, splits: dict[str, Writers], scratch: str) -> None:
    """Writes `splits` ({split name: {writer: (pixels, labels)}}) in TFF's EMNIST SQLite format.

    `save_to_sql_client_data` gives each client one split, but the real file has the same writer in
    several splits, so each split is saved on its own and the rows are merged into one file.
    """
    parts = []
    for i, (split_name, writers) in enumerate(splits.items()):
        part = os.path.join(scratch, f"part{i}.sqlite")

        def dataset_fn(cid, writers=writers):
            pixels, labels = writers[cid]
            # Same element spec as TFF's parsed EMNIST: label int32 [], pixels float32 [28, 28].
            return tf.data.Dataset.from_tensor_slices(
                collections.OrderedDict(label=labels, pixels=pixels)
            )

        tff.simulation.datasets.save_to_sql_client_data(
            list(writers),
            dataset_fn,
            part,
            split_names_by_client_id={cid: split_name for cid in writers},
        )
        parts.append(part)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tf.io.gfile.copy(parts[0], path)
    with sqlite3.connect(path) as con:
        for part in parts[1:]:
            con.execute("ATTACH DATABASE ? AS part;", (part,))
            con.execute("INSERT INTO examples SELECT * FROM part.examples;")
            con.execute("INSERT INTO client_metadata SELECT * FROM part.client_metadata;")
            con.commit()
            con.execute("DETACH DATABASE part;")


# ---------------------------------------------------------------------------------------------
# Algorithms: rounds, clients as TFF's own algorithms take them, and float64 references of the
# built-in MLPs (dense layers written out, real examples picked by boolean indexing, not masks).
# ---------------------------------------------------------------------------------------------


def run_rounds(process, client_values, rounds: int, state=None):
    """`rounds` rounds of a LearningProcess from `state` (default: its initial state).

    Returns (final state, [each round's output]).
    """
    state = process.initialize() if state is None else state
    outputs = []
    for _ in range(rounds):
        output = process.next(state, client_values)
        state = output.state
        outputs.append(output)
    return state, outputs


def as_dataset(client, parts: Sequence[str] = ("support", "query")) -> tf.data.Dataset:
    """A packed client's real examples as a `tf.data` dataset, the batches of `parts` in order,
    as TFF's own algorithms (the references of the packed ones) take clients."""
    from mfl_tff.data import packing  # Here: the helpers above need no mfl_tff.

    dataset = packing.to_dataset(client[parts[0]])
    for part in parts[1:]:
        dataset = dataset.concatenate(packing.to_dataset(client[part]))
    return dataset


def f64(values: Iterable[Any]) -> list[tf.Tensor]:
    """Arrays as float64 constants."""
    return [tf.constant(np.asarray(v, np.float64)) for v in values]


def real_examples(part, batch: Optional[int] = None) -> tuple[tf.Tensor, tf.Tensor]:
    """The real examples (x float64, y float64 or integer) of one batch of a packed part, or of
    all its batches."""
    x, y, mask = part["x"], part["y"], part["mask"]
    if batch is not None:
        x, y, mask = x[batch : batch + 1], y[batch : batch + 1], mask[batch : batch + 1]
    keep = mask.reshape(-1) > 0
    x = x.reshape((-1,) + x.shape[2:])[keep]
    y = y.reshape((-1,) + y.shape[2:])[keep]
    y = y.astype(np.float64) if np.issubdtype(y.dtype, np.floating) else y
    return tf.constant(x, tf.float64), tf.constant(y)


def real_batches(part) -> list[Optional[tuple[tf.Tensor, tf.Tensor]]]:
    """`real_examples` of every batch of a packed part; None for an all-padding batch."""
    return [
        real_examples(part, b) if part["mask"][b].any() else None
        for b in range(part["mask"].shape[0])
    ]


def mlp_output(weights: Sequence[tf.Tensor], x: tf.Tensor) -> tf.Tensor:
    """A ReLU MLP's output: (kernel, bias) per dense layer, inputs flattened, last layer linear."""
    h = tf.reshape(x, [tf.shape(x)[0], -1])
    for i in range(0, len(weights), 2):
        h = tf.matmul(h, weights[i]) + weights[i + 1]
        if i + 2 < len(weights):
            h = tf.nn.relu(h)
    return h


def mlp_cross_entropy(weights: Sequence[tf.Tensor], examples) -> tf.Tensor:
    """Mean softmax cross-entropy of integer labels: logsumexp(z) - z[label]."""
    x, y = examples
    logits = mlp_output(weights, x)
    return tf.reduce_mean(tf.reduce_logsumexp(logits, axis=1) - tf.gather(logits, y, batch_dims=1))


def mlp_squared_error(weights: Sequence[tf.Tensor], examples) -> tf.Tensor:
    """Mean squared error of float targets shaped like the output."""
    x, y = examples
    return tf.reduce_mean(tf.square(mlp_output(weights, x) - y))


def packed_sample(task) -> list:
    """Three training clients packed for their fixed split and rounds 1 and 2, and two held-out:
    what the data tests digest and compare between a task's variants."""
    ids = task.train_data.client_ids[:3]
    packed = [task.train_clients(ids, r) for r in (None, 1, 2)]
    return packed + [task.eval_clients(task.eval_data.client_ids[:2])]


def digest(values) -> str:
    """sha256 of a structure of arrays: dtypes, shapes and bytes."""
    digest = hashlib.sha256()
    for a in tf.nest.flatten(values):
        digest.update(str((a.dtype, a.shape)).encode())
        digest.update(np.ascontiguousarray(a).tobytes())
    return digest.hexdigest()


def assert_identical(want, got) -> None:
    """The same structure, dtypes, shapes and values, bit for bit."""
    tf.nest.assert_same_structure(want, got)
    for w, g in zip(tf.nest.flatten(want), tf.nest.flatten(got)):
        g = np.asarray(g)
        assert w.dtype == g.dtype and w.shape == g.shape
        np.testing.assert_array_equal(w, g)
