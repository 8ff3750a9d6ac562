"""End-to-end tests of `python -m experiments.train`, run as the subprocess a user would start.

One tiny reference run (FedAvg on 6 digits clients, 3 per round, 4 rounds) is checked against
DESIGN.md's file contract. The same command interrupted by Ctrl-C and then by `kill -9`, and rerun
each time, must end with the reference's final model and metrics. Each kind of bad input must
end with status 2 and one line on stderr naming the flag or file, no traceback, nothing written
and nothing changed. After every run, the TFF worker it started must be gone.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time
from concurrent import futures

import dp_accounting
import numpy as np
import psutil
import pytest
import tensorflow as tf

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
# Bounds for a 2-core machine that other TensorFlow processes may share.
RUN_TIMEOUT_S = 240.0
PID_GONE_TIMEOUT_S = 10.0
TOTAL_ROUNDS = 6
ROUNDS_PER_EVAL = 3
EXPERIMENT = "tiny"
TINY_FLAGS = (
    "--task=digits",
    "--algorithm=fedavg",
    "--num_train_clients=6",
    "--num_eval_clients=3",
    "--clients_per_round=3",
    f"--total_rounds={TOTAL_ROUNDS}",
    "--inner_steps=2",
    f"--rounds_per_eval={ROUNDS_PER_EVAL}",
    "--rounds_per_checkpoint=1",
    "--checkpoints_to_keep=0",
    f"--experiment_name={EXPERIMENT}",
)
# Flag names users and scripts depend on (issue 4); hparams.csv must record every one.
CONTRACT_FLAGS = (
    "task",
    "algorithm",
    "total_rounds",
    "clients_per_round",
    "inner_steps",
    "local_epochs",
    "alpha_granularity",
    "adaptive_update",
    "inner_lr",
    "meta_optimizer",
    "meta_lr",
    "server_optimizer",
    "server_lr",
    "num_train_clients",
    "num_eval_clients",
    "shots",
    "dirichlet_concentration",
    "data_cache_dir",
    "eval_adaptation_steps",
    "rounds_per_eval",
    "rounds_per_checkpoint",
    "root_output_dir",
    "experiment_name",
    "seed",
    "aggregator",
    "execution",
    "verbose",
    "cohort_size",
    "noise_multiplier",
    "clip_norm",
    "dp_delta",
)
WORKER_PID = re.compile(r"TFF worker_binary pid (\d+)")


def _command(*flags: str) -> list[str]:
    return [sys.executable, "-m", "experiments.train", *flags]


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(REPO_ROOT))


def _run(*flags: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        _command(*flags),
        cwd=REPO_ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
    )


def _restore_default_sigint() -> None:
    # A runner started in the background (`cmd &` without job control) ignores SIGINT, and
    # children inherit that; the binary must see Ctrl-C as a user's terminal delivers it.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start(*flags: str, stdout) -> subprocess.Popen:
    """Starts the binary in its own session, so the test can kill its process group."""
    return subprocess.Popen(
        _command(*flags),
        cwd=REPO_ROOT,
        env=_env(),
        stdout=stdout,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        preexec_fn=_restore_default_sigint,
    )


def _worker_pid(stdout: str) -> int:
    match = WORKER_PID.search(stdout)
    assert match, f"the binary did not report its worker:\n{stdout}"
    return int(match.group(1))


def _assert_gone(pid: int) -> None:
    """Fails unless process `pid` has exited (a zombie waiting for a dead parent counts)."""
    deadline = time.monotonic() + PID_GONE_TIMEOUT_S
    while True:
        try:
            process = psutil.Process(pid)
            if process.status() == psutil.STATUS_ZOMBIE or process.name() != "worker_binary":
                return
        except psutil.NoSuchProcess:
            return
        assert time.monotonic() < deadline, f"worker_binary {pid} outlived the binary"
        time.sleep(0.1)


def _wait_for(path: pathlib.Path, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while not path.exists():
        assert process.poll() is None, f"exited with {process.returncode} before {path} existed"
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.05)


def _saved_rounds(checkpoints: pathlib.Path) -> list[int]:
    """Rounds with a complete checkpoint (a save in progress has a temporary name)."""
    names = (re.fullmatch(r"program_state_(\d+)", p.name) for p in checkpoints.iterdir())
    return sorted(int(m.group(1)) for m in names if m)


def _rows(path: pathlib.Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _checkpoint_tensors(root: pathlib.Path, round_num: int) -> dict[str, np.ndarray]:
    """The numeric tensors of one saved program state, by variable name."""
    prefix = root / "checkpoints" / EXPERIMENT / f"program_state_{round_num}" / "variables"
    reader = tf.train.load_checkpoint(str(prefix / "variables"))
    tensors = {}
    for name in reader.get_variable_to_shape_map():
        value = reader.get_tensor(name)
        if isinstance(value, np.ndarray) and value.dtype.kind in "fiu":
            tensors[name] = value
    return tensors


def _tree_digest(root: pathlib.Path) -> str:
    """Hash of every path and file content under `root` (new, changed or removed files show)."""
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        digest.update(str(path.relative_to(root)).encode())
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run: (root_output_dir, completed process)."""
    root = tmp_path_factory.mktemp("reference")
    completed = _run(*TINY_FLAGS, f"--root_output_dir={root}")
    assert completed.returncode == 0, completed.stderr
    _assert_gone(_worker_pid(completed.stdout))
    return root, completed


# ---------------------------------------------------------------------------------------------
# The file contract.
# ---------------------------------------------------------------------------------------------


def test_metrics_csv_has_round_num_first_and_one_row_per_round(reference):
    root, _ = reference
    path = root / "results" / EXPERIMENT / "experiment.metrics.csv"
    with open(path, newline="") as f:
        header = next(csv.reader(f))
    assert header[0] == "round_num"
    assert len(header) == len(set(header)) > 2
    rows = _rows(path)
    assert [int(r["round_num"]) for r in rows] == list(range(1, TOTAL_ROUNDS + 1))
    assert all(float(r["client_work/train_loss"]) > 0 for r in rows)
    evaluated = [bool(r["personalization/after_adaptation/mean"]) for r in rows]
    assert evaluated == [r % ROUNDS_PER_EVAL == 0 for r in range(1, TOTAL_ROUNDS + 1)]


def test_hparams_csv_records_every_flag(reference):
    root, _ = reference
    rows = _rows(root / "results" / EXPERIMENT / "hparams.csv")
    assert len(rows) == 1
    missing = set(CONTRACT_FLAGS) - set(rows[0])
    assert not missing
    assert rows[0]["task"] == "digits" and rows[0]["total_rounds"] == str(TOTAL_ROUNDS)
    assert rows[0]["root_output_dir"] == str(root)


def test_personalization_json_has_the_design_shape(reference):
    root, _ = reference
    with open(root / "results" / EXPERIMENT / "personalization.json") as f:
        report = json.load(f)
    assert report["task"] == "digits" and report["algorithm"] == "fedavg"
    assert report["metric"] == "accuracy"
    assert report["num_clients"] == 3 and report["rounds"] == TOTAL_ROUNDS
    for key in ("before_adaptation", "after_adaptation"):
        assert set(report[key]) >= {"mean", "p10", "median", "p90"}
        assert all(isinstance(report[key][k], float) for k in ("mean", "p10", "median", "p90"))
        assert 0.0 <= report[key]["mean"] <= 1.0
    curve = report["steps_curve"]
    assert len(curve) == 3 and all(isinstance(v, float) for v in curve)  # Steps 0..inner_steps.
    assert curve[0] == pytest.approx(report["before_adaptation"]["mean"])


def test_checkpoints_and_tensorboard_are_written(reference):
    root, _ = reference
    saved = _saved_rounds(root / "checkpoints" / EXPERIMENT)
    assert saved == list(range(1, TOTAL_ROUNDS + 1))
    assert any(t.shape == (64, 64) for t in _checkpoint_tensors(root, TOTAL_ROUNDS).values())
    events = list((root / "logdir" / EXPERIMENT).glob("events.out.tfevents.*"))
    assert events
    steps = {
        event.step
        for path in events
        for event in tf.compat.v1.train.summary_iterator(str(path))
        if any(v.tag == "client_work/train_loss" for v in event.summary.value)
    }
    assert steps == set(range(1, TOTAL_ROUNDS + 1))


def test_progress_is_one_line_per_round_and_quiet(reference):
    _, completed = reference
    lines = [line for line in completed.stdout.splitlines() if line.startswith("round")]
    assert len(lines) == TOTAL_ROUNDS
    pattern = re.compile(
        rf"round \d/{TOTAL_ROUNDS}  elapsed \d+:\d\d  eta (\?|\d+:\d\d)  train loss \d"
    )
    assert all(pattern.match(line) for line in lines), lines
    with_evaluation = [i + 1 for i, line in enumerate(lines) if "held-out accuracy" in line]
    assert with_evaluation == [ROUNDS_PER_EVAL, TOTAL_ROUNDS]
    # TensorFlow's C++ start-up noise (cuDNN/cuBLAS registration, CPU feature notes) is hidden.
    assert completed.stderr.strip() == "", completed.stderr


# ---------------------------------------------------------------------------------------------
# Resume.
# ---------------------------------------------------------------------------------------------


def test_rerun_after_ctrl_c_and_kill_9_ends_like_the_uninterrupted_run(tmp_path, reference):
    reference_root, _ = reference
    flags = (*TINY_FLAGS, f"--root_output_dir={tmp_path}")
    checkpoints = tmp_path / "checkpoints" / EXPERIMENT
    log = tmp_path / "stdout.txt"

    # 1. Ctrl-C once the first round is saved: exit 130, a hint to rerun, the worker stopped.
    with open(log, "w") as stdout:
        process = _start(*flags, stdout=stdout)
        try:
            _wait_for(checkpoints / "program_state_1", process)
            process.send_signal(signal.SIGINT)
            _, stderr = process.communicate(timeout=RUN_TIMEOUT_S)
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr
    saved = max(_saved_rounds(checkpoints))
    last_line = stderr.strip().splitlines()[-1]
    assert last_line == f"Interrupted; rerun the same command to resume from round {saved}."
    _assert_gone(_worker_pid(log.read_text()))

    # 2. Rerun, and kill -9 the whole job (as a terminal or a scheduler would) once it has saved
    # a round of its own.
    assert saved < TOTAL_ROUNDS - 1, f"Ctrl-C came too late (round {saved}) to test kill -9"
    with open(log, "w") as stdout:
        process = _start(*flags, stdout=stdout)
        try:
            _wait_for(checkpoints / f"program_state_{saved + 1}", process)
        finally:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate(timeout=RUN_TIMEOUT_S)
    assert process.returncode == -signal.SIGKILL
    text = log.read_text()
    assert f"Resuming after round {saved}" in text
    _assert_gone(_worker_pid(text))

    # 3. Rerun to the end.
    completed = _run(*flags)
    assert completed.returncode == 0, completed.stderr
    assert "Resuming after round" in completed.stdout
    _assert_gone(_worker_pid(completed.stdout))

    resumed = _checkpoint_tensors(tmp_path, TOTAL_ROUNDS)
    expected = _checkpoint_tensors(reference_root, TOTAL_ROUNDS)
    assert resumed.keys() == expected.keys()
    for name, value in expected.items():
        np.testing.assert_allclose(resumed[name], value, rtol=0, atol=1e-6, err_msg=name)

    got = _rows(tmp_path / "results" / EXPERIMENT / "experiment.metrics.csv")
    want = _rows(reference_root / "results" / EXPERIMENT / "experiment.metrics.csv")
    assert [r["round_num"] for r in got] == [r["round_num"] for r in want]
    for got_row, want_row in zip(got, want):
        assert got_row.keys() == want_row.keys()
        for key, value in want_row.items():
            if value:
                assert float(got_row[key]) == pytest.approx(float(value), abs=1e-6), key
            else:
                assert got_row[key] == "", key
    with open(tmp_path / "results" / EXPERIMENT / "personalization.json") as f:
        got_report = json.load(f)
    with open(reference_root / "results" / EXPERIMENT / "personalization.json") as f:
        want_report = json.load(f)
    assert got_report["after_adaptation"]["mean"] == pytest.approx(
        want_report["after_adaptation"]["mean"], abs=1e-6
    )


# ---------------------------------------------------------------------------------------------
# Bad input.
# ---------------------------------------------------------------------------------------------

# name -> (flags besides the reference's root, text the error line must contain). Unless a case
# says otherwise it targets a new experiment in the reference's output directory, which must
# neither change nor gain a file.
BAD_INPUT = {
    "unknown_task": (("--task=no_such_task",), "--task"),
    "unknown_algorithm": (("--algorithm=no_such_algorithm",), "--algorithm"),
    "zero_rounds": (("--total_rounds=0",), "--total_rounds"),
    "negative_clients_per_round": (("--clients_per_round=-2",), "--clients_per_round"),
    "not_a_number": (("--total_rounds=four",), "--total_rounds"),
    "more_clients_per_round_than_clients": (
        ("--task=digits", "--algorithm=fedavg", "--clients_per_round=81"),
        "--clients_per_round",
    ),
    "unknown_optimizer": (("--meta_optimizer=adamw",), "--meta_optimizer"),
    "missing_emnist_cache": (("--task=emnist", "--data_cache_dir={empty}"), "emnist_all.sqlite"),
    "unwritable_output_dir": (("--root_output_dir={file}/out",), "--root_output_dir"),
    "checkpoint_of_another_model_shape": (
        (*TINY_FLAGS[:-1], "--model=cnn", "--experiment_name=copied"),
        f"checkpoints/copied/program_state_{TOTAL_ROUNDS}",
    ),
    "resume_with_a_changed_flag": ((*TINY_FLAGS, "--inner_lr=0.1"), "--inner_lr"),
    "dp_without_noise_multiplier": (("--aggregator=dp",), "--noise_multiplier"),
    "dp_clip_norm_not_a_number": (
        ("--aggregator=dp", "--noise_multiplier=1", "--clip_norm=big"),
        "--clip_norm",
    ),
    "dp_delta_out_of_range": (
        ("--aggregator=dp", "--noise_multiplier=1", "--dp_delta=1"),
        "--dp_delta",
    ),
    "robust_with_cohorts": (("--aggregator=robust", "--cohort_size=5"), "--cohort_size"),
    "remote_without_worker": (("--execution=remote",), "--worker"),
    "worker_not_host_port": (("--execution=remote", "--worker=localhost"), "--worker"),
    "worker_without_remote": (("--worker=localhost:8000",), "--execution=remote"),
    # Nothing listens on port 1; the check gives up after --worker_timeout, before any write.
    "unreachable_worker": (
        ("--execution=remote", "--worker=localhost:1", "--worker_timeout=2"),
        "no TFF worker answered",
    ),
}


@pytest.fixture(scope="module")
def bad_runs(reference, tmp_path_factory):
    """Runs every BAD_INPUT case (a few at a time) against the reference's output directory.

    Returns `{name: completed process}` and whether the directory was left exactly as it was.
    """
    root, _ = reference
    scratch = tmp_path_factory.mktemp("bad_input")
    (scratch / "empty").mkdir()
    (scratch / "file").write_text("a file where a directory should be\n")
    # Another experiment's checkpoints, placed before the directory is fingerprinted. (A damaged
    # checkpoint takes the same path through the binary; tests/program_test.py covers it.)
    shutil.copytree(root / "checkpoints" / EXPERIMENT, root / "checkpoints" / "copied")
    before = _tree_digest(root)

    def run(flags):
        flags = [f.format(empty=scratch / "empty", file=scratch / "file") for f in flags]
        if not any(f.startswith("--root_output_dir") for f in flags):
            flags.append(f"--root_output_dir={root}")
        if not any(f.startswith("--experiment_name") for f in flags):
            flags.append("--experiment_name=bad_input")
        return _run(*flags)

    with futures.ThreadPoolExecutor(max_workers=3) as pool:
        results = dict(zip(BAD_INPUT, pool.map(run, (f for f, _ in BAD_INPUT.values()))))
    return results, _tree_digest(root) == before


@pytest.mark.parametrize("case", sorted(BAD_INPUT))
def test_bad_input_is_one_line_naming_the_problem(bad_runs, case):
    results, _ = bad_runs
    completed = results[case]
    expected = BAD_INPUT[case][1]
    assert completed.returncode == 2, (completed.stdout, completed.stderr)
    assert "Traceback" not in completed.stderr, completed.stderr
    last = completed.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and expected in last, completed.stderr
    # Everything is checked before the worker starts, so there is no worker to leak.
    assert not WORKER_PID.search(completed.stdout)


def test_bad_input_leaves_existing_output_unchanged(bad_runs):
    _, unchanged = bad_runs
    assert unchanged


# ---------------------------------------------------------------------------------------------
# Differential privacy and robust aggregation.
# ---------------------------------------------------------------------------------------------

DP_RUN = dict(noise_multiplier=1.0, clients_per_round=4, num_train_clients=20, rounds=3)
AGGREGATOR_RUNS = {
    "dp": (
        "--task=digits_fewshot",
        "--algorithm=mfl",
        f"--num_train_clients={DP_RUN['num_train_clients']}",
        "--num_eval_clients=3",
        f"--clients_per_round={DP_RUN['clients_per_round']}",
        f"--total_rounds={DP_RUN['rounds']}",
        "--inner_steps=2",
        "--rounds_per_eval=0",
        "--aggregator=dp",
        f"--noise_multiplier={DP_RUN['noise_multiplier']}",
        "--clip_norm=0.5",
        "--experiment_name=dp",
    ),
    "robust": (*TINY_FLAGS[:-1], "--aggregator=robust", "--experiment_name=robust"),
}


@pytest.fixture(scope="module")
def aggregator_runs(tmp_path_factory):
    """`{kind: (results directory, completed process)}` of a tiny run with each aggregator."""
    root = tmp_path_factory.mktemp("aggregators")

    def run(kind):
        return _run(*AGGREGATOR_RUNS[kind], f"--root_output_dir={root}")

    with futures.ThreadPoolExecutor(max_workers=2) as pool:
        completed = dict(zip(AGGREGATOR_RUNS, pool.map(run, AGGREGATOR_RUNS)))
    for kind, process in completed.items():
        assert process.returncode == 0, (kind, process.stderr)
        _assert_gone(_worker_pid(process.stdout))
    return {kind: (root / "results" / kind, completed[kind]) for kind in AGGREGATOR_RUNS}


def test_dp_run_reports_its_privacy_budget(aggregator_runs):
    results, completed = aggregator_runs["dp"]
    with open(results / "personalization.json") as f:
        report = json.load(f)
    privacy = report["privacy"]
    assert set(privacy) == {
        "epsilon",
        "delta",
        "noise_multiplier",
        "sampling_rate",
        "rounds",
        "accountant",
    }
    q = DP_RUN["clients_per_round"] / DP_RUN["num_train_clients"]
    delta = 1 / DP_RUN["num_train_clients"]  # --dp_delta's default
    assert privacy["sampling_rate"] == pytest.approx(q)
    assert privacy["delta"] == pytest.approx(delta)
    assert privacy["noise_multiplier"] == DP_RUN["noise_multiplier"]
    assert privacy["rounds"] == DP_RUN["rounds"]
    # Computed here with dp_accounting directly, one round at a time.
    accountant = dp_accounting.rdp.RdpAccountant()
    for _ in range(DP_RUN["rounds"]):
        accountant.compose(
            dp_accounting.PoissonSampledDpEvent(
                q, dp_accounting.GaussianDpEvent(DP_RUN["noise_multiplier"])
            )
        )
    assert privacy["epsilon"] == pytest.approx(accountant.get_epsilon(delta), rel=1e-9)
    rows = _rows(results / "experiment.metrics.csv")
    epsilons = [float(r["privacy/epsilon"]) for r in rows]
    assert len(epsilons) == DP_RUN["rounds"] and epsilons == sorted(epsilons)
    assert epsilons[-1] == pytest.approx(privacy["epsilon"])
    assert all(int(r["clients/dropped"]) == 0 for r in rows)
    assert f"epsilon {privacy['epsilon']:.4g} after {DP_RUN['rounds']} rounds" in completed.stdout
    assert "Traceback" not in completed.stderr


def test_robust_run_reports_zeroed_and_clipped_clients(aggregator_runs):
    results, completed = aggregator_runs["robust"]
    with open(results / "personalization.json") as f:
        report = json.load(f)
    assert "privacy" not in report
    assert 0.0 <= report["after_adaptation"]["mean"] <= 1.0
    rows = _rows(results / "experiment.metrics.csv")
    assert len(rows) == TOTAL_ROUNDS
    for column in (
        "aggregator/zeroed_count",
        "aggregator/zeroing/clipped_count",
        "clients/dropped",
    ):
        assert all(r[column] != "" for r in rows), column
    assert "privacy/epsilon" not in rows[0]
    assert completed.stderr.strip() == "", completed.stderr
