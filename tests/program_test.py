"""Tests of `mfl_tff.training.program` (the run loop) and `mfl_tff.training.outputs` (its files).

The run loop is tested in-process on a tiny FedAvg task (6 digits clients, 3 per round): the files
it writes, when rows are written relative to checkpoints, resume equivalence after a crash (a torn
metrics row; a real kill -9 in the middle of a checkpoint save, in a child process), the
divergence warning, and the checkpoint checks that keep another model's state out. The managers
themselves are tested in `tests/metrics_release_test.py` and `tests/state_manager_test.py`; the
binary on top (flags, exit codes, subprocess resume) in `tests/train_test.py`.
"""

from __future__ import annotations

import asyncio
import csv
import hashlib
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_federated as tff

from mfl_tff.algorithms import aggregation, builders
from mfl_tff.data import digits
from mfl_tff.training import outputs, privacy, program, progress, rounds, state_manager

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent

CLIENTS_PER_ROUND = 3
INNER_LR = 0.4
STEPS = 2


pytestmark = pytest.mark.usefixtures("tff_local_execution")


def _task(model: str = "mlp"):
    return digits.build_digits(num_train_clients=6, num_eval_clients=3, model=model, seed=0)


def _process(task, server_optimizer=None):
    return builders.build_algorithm(
        "fedavg",
        task,
        builders.AlgorithmOptions(
            inner_lr=INNER_LR,
            inner_steps=STEPS,
            cohort_size=CLIENTS_PER_ROUND,
            server_optimizer=server_optimizer,
        ),
    )


@pytest.fixture(scope="module")
def task():
    return _task()


@pytest.fixture(scope="module")
def built(task):
    return _process(task)


def _config(total_rounds: int, **overrides) -> program.ProgramConfig:
    settings = dict(
        total_rounds=total_rounds,
        clients_per_round=CLIENTS_PER_ROUND,
        fine_tune_lr=INNER_LR,
        eval_adaptation_steps=STEPS,
        rounds_per_eval=2,
        rounds_per_checkpoint=1,
        checkpoints_to_keep=0,
    )
    settings.update(overrides)
    return program.ProgramConfig(**settings)


def _rows(path: str) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _tree_digest(root: pathlib.Path) -> str:
    """Hash of every file name and content under `root`."""
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        digest.update(str(path.relative_to(root)).encode())
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()


def _assert_states_equal(a, b, atol=1e-6):
    flat_a, flat_b = tf.nest.flatten(a), tf.nest.flatten(b)
    assert len(flat_a) == len(flat_b) > 0
    for x, y in zip(flat_a, flat_b):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=atol)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, task, built):
    """Three rounds in one go: (paths, report, log lines)."""
    process, spec = built
    paths = outputs.OutputPaths(str(tmp_path_factory.mktemp("uninterrupted")), "run")
    lines = []
    report = program.run_training(process, spec, task, _config(3), paths, log=lines.append)
    return paths, report, lines


# ---------------------------------------------------------------------------------------------
# The run loop.
# ---------------------------------------------------------------------------------------------


def test_run_writes_one_metrics_row_per_round_with_evaluation_columns(uninterrupted):
    paths, _, _ = uninterrupted
    with open(paths.metrics_csv, newline="") as f:
        header = next(csv.reader(f))
    assert header[0] == program.ROUND_KEY
    assert len(header) == len(set(header))
    assert "client_work/train_loss" in header
    rows = _rows(paths.metrics_csv)
    assert [int(r[program.ROUND_KEY]) for r in rows] == [1, 2, 3]
    column = "personalization/after_adaptation/mean"
    # Round 2 is an evaluation round (every 2), round 3 the last; round 1 is neither.
    assert [bool(r[column]) for r in rows] == [False, True, True]
    assert all(np.isfinite(float(r["client_work/train_loss"])) for r in rows)


def test_run_saves_checkpoints_and_writes_the_report(uninterrupted, built):
    paths, report, _ = uninterrupted
    assert program.checkpoint_rounds(paths.checkpoint_dir) == [1, 2, 3]
    round_num, state = program.load_checkpoint(paths.checkpoint_dir, built[0])
    assert round_num == 3 and state is not None
    with open(paths.personalization_json) as f:
        written = json.load(f)
    assert written["rounds"] == 3 and written["algorithm"] == "fedavg"
    assert written["num_clients"] == 3 and written["metric"] == "accuracy"
    assert written["after_adaptation"]["mean"] == pytest.approx(report["after_adaptation"]["mean"])
    assert len(written["steps_curve"]) == STEPS + 1
    assert list(pathlib.Path(paths.logdir).glob("events.out.tfevents.*"))


def test_run_releases_bytes_per_round_and_cumulative_and_reports_them(uninterrupted, task):
    paths, report, _ = uninterrupted
    # Closed form: a float32 per model parameter each way, plus the weight of the mean on upload.
    params = sum(np.size(w) for w in task.model_fn().initial_weights[0])
    rows = _rows(paths.metrics_csv)
    for round_num, row in enumerate(rows, start=1):
        assert int(row["communication/download_bytes_per_client"]) == 4 * params
        assert int(row["communication/upload_model_bytes_per_client"]) == 4 * params + 4
        upload = int(row["communication/upload_bytes_per_client"])
        assert int(row["communication/round_upload_bytes"]) == CLIENTS_PER_ROUND * upload
        assert int(row["communication/cumulative_upload_bytes"]) == (
            round_num * CLIENTS_PER_ROUND * upload
        )
    with open(paths.personalization_json) as f:
        written = json.load(f)["communication"]
    assert written["bytes_per_client_per_round"]["download"] == 4 * params
    assert written["cumulative_bytes"]["upload"] == 3 * CLIENTS_PER_ROUND * upload
    assert report["communication"]["rounds"] == 3


def test_run_logs_one_progress_line_per_round(uninterrupted):
    _, _, lines = uninterrupted
    assert [line.split()[1] for line in lines] == ["1/3", "2/3", "3/3"]
    assert all("elapsed" in line and "eta" in line and "train loss" in line for line in lines)
    assert "held-out accuracy" in lines[1] and "held-out accuracy" not in lines[0]


def _assert_same_rows(got_path: str, want_path: str) -> None:
    got, want = _rows(got_path), _rows(want_path)
    assert [r[program.ROUND_KEY] for r in got] == [r[program.ROUND_KEY] for r in want]
    for got_row, want_row in zip(got, want):
        assert got_row.keys() == want_row.keys()
        for key in want_row:
            if want_row[key]:
                assert float(got_row[key]) == pytest.approx(float(want_row[key]), abs=1e-6), key
            else:
                assert got_row[key] == "", key


def test_resume_after_a_torn_row_and_a_lost_checkpoint_matches_uninterrupted(
    tmp_path, task, built, uninterrupted
):
    process, spec = built
    reference, _, _ = uninterrupted
    paths = outputs.OutputPaths(str(tmp_path), "run")
    program.run_training(process, spec, task, _config(2), paths, log=lambda line: None)
    # What a kill halfway through the append of round 2's row leaves: half a line, and no
    # checkpoint of round 2.
    os.remove(os.path.join(paths.checkpoint_dir, f"{program.CHECKPOINT_PREFIX}2"))
    data = pathlib.Path(paths.metrics_csv).read_bytes()
    last_line = data.rstrip(b"\r\n").rfind(b"\n") + 1
    pathlib.Path(paths.metrics_csv).write_bytes(data[: last_line + (len(data) - last_line) // 2])
    assert [r[program.ROUND_KEY] for r in _rows(paths.metrics_csv)] == ["1", "2"]

    start_round, state = program.load_checkpoint(paths.checkpoint_dir, process)
    assert start_round == 1
    program.run_training(
        process,
        spec,
        task,
        _config(3),
        paths,
        start_round=start_round,
        state=state,
        log=lambda line: None,
    )

    _assert_same_rows(paths.metrics_csv, reference.metrics_csv)
    _assert_states_equal(
        program.load_checkpoint(paths.checkpoint_dir, process)[1],
        program.load_checkpoint(reference.checkpoint_dir, process)[1],
    )


# Run in a child process: trains 3 rounds like `uninterrupted`, and SIGKILLs its whole process
# group (itself and its TFF worker) once half of round 3's checkpoint file is written.
_KILLED_CHILD = """
import os, signal
import numpy as np
from mfl_tff.training import outputs, program, runtime
from tests import program_test as t

real_savez = np.savez

def savez_then_die(file, **arrays):
    real_savez(file, **arrays)
    if int(arrays["0"]) == 3:  # The round number, the first leaf of (round_num, state).
        file.truncate(file.tell() // 2)
        file.flush()
        os.killpg(0, signal.SIGKILL)

np.savez = savez_then_die
task = t._task()
process, spec = t._process(task)
paths = outputs.OutputPaths({root!r}, "run")
with runtime.local_execution():
    program.run_training(process, spec, task, t._config(3), paths)
"""


def _killed_child(scratch: pathlib.Path):
    """The child's run in `scratch`: (CompletedProcess, its OutputPaths)."""
    child = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_KILLED_CHILD.format(root=str(scratch)))],
        cwd=REPO_ROOT,
        env=dict(os.environ, PYTHONPATH=str(REPO_ROOT), TF_CPP_MIN_LOG_LEVEL="3"),
        start_new_session=True,  # Its own process group, which it kills.
        capture_output=True,
        text=True,
        timeout=300,
    )
    return child, outputs.OutputPaths(str(scratch), "run")


# Started early by conftest.py: the child mostly waits on its own worker.
BACKGROUND_JOBS = {"killed_child": {"run": _killed_child}}


@pytest.fixture(scope="module")
def killed_child(background):
    return background.results(__name__, "killed_child")["run"]


def test_resume_after_kill_9_during_a_checkpoint_save_matches_uninterrupted(
    killed_child, task, built, uninterrupted
):
    process, spec = built
    reference, _, _ = uninterrupted
    child, paths = killed_child
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]
    # Round 3's row was written (before its checkpoint), its checkpoint is a torn temporary.
    assert [r[program.ROUND_KEY] for r in _rows(paths.metrics_csv)] == ["1", "2", "3"]
    assert program.checkpoint_rounds(paths.checkpoint_dir) == [1, 2]
    assert any(".tmp" in name for name in os.listdir(paths.checkpoint_dir))

    start_round, state = program.load_checkpoint(paths.checkpoint_dir, process)
    assert start_round == 2
    program.run_training(
        process,
        spec,
        task,
        _config(3),
        paths,
        start_round=start_round,
        state=state,
        log=lambda line: None,
    )

    _assert_same_rows(paths.metrics_csv, reference.metrics_csv)  # Round 3 once.
    _assert_states_equal(
        program.load_checkpoint(paths.checkpoint_dir, process)[1],
        program.load_checkpoint(reference.checkpoint_dir, process)[1],
    )
    assert sorted(os.listdir(paths.checkpoint_dir)) == [
        f"{program.CHECKPOINT_PREFIX}{r}" for r in (1, 2, 3)
    ]


def test_rows_are_written_every_rounds_per_log_and_before_each_checkpoint(
    tmp_path, task, built, monkeypatch
):
    process, spec = built
    paths = outputs.OutputPaths(str(tmp_path), "run")
    rows_seen = {}

    def rows_written():
        if not os.path.exists(paths.metrics_csv):
            return []
        return [int(r[program.ROUND_KEY]) for r in _rows(paths.metrics_csv)]

    real_next_round, real_write = rounds.next_round, state_manager.ArrayProgramStateManager.write
    calls = []

    def next_round(*args, **kwargs):
        # One round per call here (5 rounds, too few to chain): call k trains round k.
        calls.append(1)
        rows_seen[f"before round {len(calls)}"] = rows_written()
        return real_next_round(*args, **kwargs)

    def write(self, program_state, version):
        rows_seen[f"checkpoint {version}"] = rows_written()
        real_write(self, program_state, version)

    monkeypatch.setattr(rounds, "next_round", next_round)
    monkeypatch.setattr(state_manager.ArrayProgramStateManager, "write", write)
    config = _config(5, rounds_per_log=2, rounds_per_checkpoint=3, rounds_per_eval=0)
    program.run_training(process, spec, task, config, paths, log=lambda line: None)
    assert rows_seen == {
        "before round 1": [],
        "before round 2": [],  # Round 1 is buffered (rounds_per_log=2).
        "before round 3": [1, 2],
        "checkpoint 3": [1, 2, 3],  # A checkpoint round writes its rows first.
        "before round 4": [1, 2, 3],
        "before round 5": [1, 2, 3, 4],
        "checkpoint 5": [1, 2, 3, 4, 5],
    }


def test_a_diverging_loss_is_reported_once_and_training_goes_on(tmp_path, task, built, monkeypatch):
    process, spec = built
    real_next_round = rounds.next_round
    # Round r's train loss, as a multiple of round 1's.
    factors = [1.0, 50.0, 150.0, float("nan"), 1.0]

    def next_round(*args, **kwargs):
        # One round per call here (5 rounds, too few to chain): the k-th call trains round k.
        state, metrics = real_next_round(*args, **kwargs)
        metrics = tff.program.structure_utils.map_structure(lambda v: v, metrics)
        metrics["client_work"]["train_loss"] = np.float32(factors.pop(0) * 2.0)
        return state, metrics

    monkeypatch.setattr(rounds, "next_round", next_round)
    lines = []
    config = _config(5, rounds_per_eval=0)
    program.run_training(
        process, spec, task, config, paths=outputs.OutputPaths(str(tmp_path), "r"), log=lines.append
    )
    warnings = [line for line in lines if line.startswith("warning:")]
    assert warnings == [
        "warning: round 3 training loss 300 is 150x its first value 2; the run is diverging: "
        "lower --inner_lr / --meta_lr"
    ]
    assert [line.split()[1] for line in lines if line.startswith("round")][-1] == "5/5"


def test_checkpoint_at_total_rounds_is_evaluated_not_retrained(tmp_path, task, built):
    process, spec = built
    paths = outputs.OutputPaths(str(tmp_path), "run")
    program.run_training(process, spec, task, _config(1), paths, log=lambda line: None)
    rows_before = _rows(paths.metrics_csv)
    lines = []
    start_round, state = program.load_checkpoint(paths.checkpoint_dir, process)
    report = program.run_training(
        process,
        spec,
        task,
        _config(1),
        paths,
        start_round=start_round,
        state=state,
        log=lines.append,
    )
    assert report["rounds"] == 1
    assert _rows(paths.metrics_csv) == rows_before
    assert len(lines) == 1 and "already trained" in lines[0]


def test_old_checkpoints_are_pruned_to_the_most_recent(tmp_path, task, built):
    process, spec = built
    paths = outputs.OutputPaths(str(tmp_path), "run")
    config = _config(3, checkpoints_to_keep=2, rounds_per_eval=0)
    program.run_training(process, spec, task, config, paths, log=lambda line: None)
    assert program.checkpoint_rounds(paths.checkpoint_dir) == [2, 3]


# ---------------------------------------------------------------------------------------------
# Checkpoints that do not fit.
# ---------------------------------------------------------------------------------------------


def test_load_checkpoint_without_checkpoints_creates_nothing(tmp_path, built):
    directory = tmp_path / "checkpoints" / "run"
    assert program.load_checkpoint(str(directory), built[0]) == (0, None)
    assert not directory.exists()


def test_checkpoint_of_another_model_shape_is_rejected_untouched(uninterrupted):
    paths, _, _ = uninterrupted
    cnn_process, _ = _process(_task(model="cnn"))
    before = _tree_digest(pathlib.Path(paths.checkpoint_dir))
    with pytest.raises(program.CheckpointError, match=r"float32\[64, 64\].*float32\[3, 3, 1, 16\]"):
        program.load_checkpoint(paths.checkpoint_dir, cnn_process)
    assert _tree_digest(pathlib.Path(paths.checkpoint_dir)) == before


def test_checkpoint_of_another_state_structure_is_rejected(uninterrupted, task):
    paths, _, _ = uninterrupted
    adam_process, _ = _process(task, server_optimizer="adam")
    with pytest.raises(program.CheckpointError, match="cannot be read as this state") as raised:
        program.load_checkpoint(paths.checkpoint_dir, adam_process)
    assert raised.value.path.endswith(f"{program.CHECKPOINT_PREFIX}3")


def test_damaged_checkpoint_is_rejected_with_its_path(tmp_path, uninterrupted, built):
    paths, _, _ = uninterrupted
    copy = tmp_path / "checkpoints"
    shutil.copytree(paths.checkpoint_dir, copy)
    data = copy / f"{program.CHECKPOINT_PREFIX}3"
    data.write_bytes(data.read_bytes()[:-100])
    with pytest.raises(program.CheckpointError, match="damaged") as raised:
        program.load_checkpoint(str(copy), built[0])
    message = str(raised.value)
    assert f"{program.CHECKPOINT_PREFIX}3" in message and "\n" not in message


def test_saved_model_checkpoint_of_earlier_versions_is_a_clear_error(tmp_path, built):
    process, _ = built
    directory = tmp_path / "checkpoints"
    old_manager = tff.program.FileProgramStateManager(
        str(directory), prefix=program.CHECKPOINT_PREFIX
    )
    asyncio.run(old_manager.save((2, process.initialize()), 2))
    assert program.checkpoint_rounds(str(directory)) == [2]
    with pytest.raises(program.CheckpointError, match="SavedModel directory") as raised:
        program.load_checkpoint(str(directory), process)
    assert raised.value.path.endswith(f"{program.CHECKPOINT_PREFIX}2")
    assert "\n" not in str(raised.value)


def test_checkpoint_from_an_unfinished_save_is_ignored(tmp_path, uninterrupted, built):
    # A checkpoint is written under a temporary name and renamed; a kill leaves the temporary.
    paths, _, _ = uninterrupted
    copy = tmp_path / "checkpoints"
    shutil.copytree(paths.checkpoint_dir, copy)
    (copy / f".{program.CHECKPOINT_PREFIX}4.tmp1234").write_bytes(b"PK\x03\x04 half a zip")
    assert program.checkpoint_rounds(str(copy)) == [1, 2, 3]
    assert program.load_checkpoint(str(copy), built[0])[0] == 3


# ---------------------------------------------------------------------------------------------
# Small pieces.
# ---------------------------------------------------------------------------------------------


def test_dp_run_releases_epsilon_and_resumes_from_its_checkpoint(tmp_path, task):
    """The DP aggregator's state holds string tensors (its DpEvent's class name), which load as
    bytes; resuming must accept them. Epsilon is released every round and lands in the report."""
    aggregators = aggregation.build_aggregators(
        "dp",
        learns_alpha=False,
        noise_multiplier=1.0,
        clip_norm="adaptive",
        clients_per_round=CLIENTS_PER_ROUND,
    )
    process, spec = builders.build_algorithm(
        "fedavg",
        task,
        builders.AlgorithmOptions(
            inner_lr=INNER_LR, inner_steps=STEPS, model_aggregator=aggregators.model
        ),
    )
    accountant = privacy.PrivacyAccountant.for_training(
        noise_multiplier=1.0, clients_per_round=CLIENTS_PER_ROUND, num_train_clients=6
    )
    paths = outputs.OutputPaths(str(tmp_path), "dp")
    program.run_training(process, spec, task, _config(2), paths, accountant=accountant)
    start_round, state = program.load_checkpoint(paths.checkpoint_dir, process)
    assert start_round == 2
    lines = []
    report = program.run_training(
        process,
        spec,
        task,
        _config(3),
        paths,
        start_round=start_round,
        state=state,
        log=lines.append,
        accountant=accountant,
    )
    rows = _rows(paths.metrics_csv)
    assert [float(r["privacy/epsilon"]) for r in rows] == pytest.approx(
        [accountant.epsilon(r) for r in (1, 2, 3)]
    )
    assert all(float(r["privacy/delta"]) == pytest.approx(1 / 6) for r in rows)
    assert report["privacy"] == accountant.report(3)
    with open(paths.personalization_json) as f:
        assert json.load(f)["privacy"]["epsilon"] == pytest.approx(accountant.epsilon(3))
    assert f"epsilon {accountant.epsilon(3):.3g}" in lines[-1]
    weights = process.get_model_weights(program.load_checkpoint(paths.checkpoint_dir, process)[1])
    assert all(np.all(np.isfinite(w)) for w in weights.trainable)


def test_program_config_rejects_out_of_range_values():
    with pytest.raises(ValueError, match="total_rounds"):
        _config(0)
    with pytest.raises(ValueError, match="rounds_per_eval"):
        _config(3, rounds_per_eval=-1)
    with pytest.raises(ValueError, match="num_eval_clients"):
        _config(3, num_eval_clients=0)


def test_rounds_per_call_by_default_chains_only_long_runs_on_one_worker():
    long_run = program.LONG_RUN_ROUNDS
    assert program.default_rounds_per_call(long_run - 1) == 1
    assert program.default_rounds_per_call(long_run) == program.LONG_RUN_ROUNDS_PER_CALL > 1
    assert program.default_rounds_per_call(10 * long_run, workers=2) == 1
    # Calls end at checkpoints and evaluations: R divides their intervals, or calls run short.
    assert program.default_rounds_per_call(long_run, boundaries=(500, 10_000)) == 10
    assert program.default_rounds_per_call(long_run, boundaries=(10, 25)) == 5
    assert program.default_rounds_per_call(long_run, boundaries=(10, 0)) == 10
    assert program.default_rounds_per_call(long_run, boundaries=(7, 25)) == 1


def test_format_duration():
    assert progress.format_duration(0) == "0:00"
    assert progress.format_duration(65.4) == "1:05"
    assert progress.format_duration(3 * 3600 + 62) == "3:01:02"


def test_divergence_line():
    assert progress.divergence_line(3, 2.0, 1.0) == ""
    assert progress.divergence_line(3, 99.0, 1.0) == ""
    assert "round 3 training loss 100 is 100x its first value 1;" in (
        progress.divergence_line(3, 100.0, 1.0)
    )
    assert "round 4 training loss is nan;" in progress.divergence_line(4, float("nan"), 1.0)
    assert "training loss is inf" in progress.divergence_line(1, float("inf"), None)
    # Without a positive first value there is no ratio to grow.
    assert progress.divergence_line(2, 1e9, 0.0) == ""
    assert progress.divergence_line(2, 1e9, None) == ""


def test_headline_prefers_train_loss_then_query_loss():
    assert progress.headline({"client_work/train_loss": 0.5}) == "train loss 0.5000"
    metrics = {"a/pre_adaptation_loss": 2.0, "a/post_adaptation_loss": 1.25}
    assert progress.headline(metrics) == "query loss 1.2500"
    assert progress.headline({"other": 1.0}) == ""
    assert progress.headline_loss(metrics) == ("query loss", 1.25)
    assert progress.headline_loss({"other": 1.0}) is None


def test_flat_metrics_names_columns_like_the_release_managers():
    metrics = {"client_work": {"train_loss": 1.0, "empty": ()}, "distributor": ()}
    assert dict(progress.flat_metrics(metrics)) == {"client_work/train_loss": 1.0}


# ---------------------------------------------------------------------------------------------
# outputs: paths, checks that write nothing, settings, JSON.
# ---------------------------------------------------------------------------------------------


def test_output_paths_follow_the_design_contract():
    paths = outputs.OutputPaths("/out", "exp")
    assert paths.metrics_csv == "/out/results/exp/experiment.metrics.csv"
    assert paths.hparams_csv == "/out/results/exp/hparams.csv"
    assert paths.personalization_json == "/out/results/exp/personalization.json"
    assert paths.checkpoint_dir == "/out/checkpoints/exp"
    assert paths.logdir == "/out/logdir/exp"


def test_check_output_dirs_accepts_a_new_directory_and_creates_nothing(tmp_path):
    outputs.check_output_dirs(outputs.OutputPaths(str(tmp_path / "new" / "root"), "exp"))
    assert list(tmp_path.iterdir()) == []


def test_check_output_dirs_rejects_a_path_through_a_file(tmp_path):
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(outputs.OutputDirError, match="is not a directory"):
        outputs.check_output_dirs(outputs.OutputPaths(str(tmp_path / "file" / "root"), "exp"))


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes to read-only directories anyway")
def test_check_output_dirs_rejects_a_read_only_directory(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        with pytest.raises(outputs.OutputDirError, match="cannot write"):
            outputs.check_output_dirs(outputs.OutputPaths(str(locked / "root"), "exp"))
    finally:
        locked.chmod(0o700)


def test_check_output_dirs_rejects_an_unwritable_file_system():
    # /proc takes no new entries, not even from root (whom permission bits do not stop).
    with pytest.raises(outputs.OutputDirError, match="/proc"):
        outputs.check_output_dirs(outputs.OutputPaths("/proc/mfl_tff_test", "exp"))


def test_hparams_round_trip_and_differences(tmp_path):
    path = str(tmp_path / "results" / "hparams.csv")
    hparams = {"task": "digits", "inner_lr": 0.4, "shots": None, "verbose": False, "ids": [1, 2]}
    assert outputs.hparams_differences(path, hparams) == []  # No file yet.
    outputs.write_hparams(path, hparams)
    assert outputs.read_hparams(path) == {
        "task": "digits",
        "inner_lr": "0.4",
        "shots": "",
        "verbose": "False",
        "ids": "1,2",
    }
    assert outputs.hparams_differences(path, hparams) == []
    changed = dict(hparams, inner_lr=0.1, verbose=True, new_flag=3)
    assert outputs.hparams_differences(path, changed, may_differ={"verbose"}) == [
        ("inner_lr", "0.4", "0.1")
    ]
    assert sorted(os.listdir(tmp_path / "results")) == ["hparams.csv"]  # No temporary left.


def test_malformed_hparams_file_is_a_program_error(tmp_path):
    path = tmp_path / "hparams.csv"
    path.write_text("a,b\n1,2\n3,4\n")
    with pytest.raises(outputs.ProgramError, match="hparams.csv"):
        outputs.hparams_differences(str(path), {"a": 1})


def test_write_json_is_strict_json(tmp_path):
    path = tmp_path / "r" / "personalization.json"
    outputs.write_json(str(path), {"mean": float("nan"), "curve": [1.0, float("inf")], "n": 3})
    assert json.loads(path.read_text()) == {"mean": None, "curve": [1.0, None], "n": 3}
    assert sorted(os.listdir(path.parent)) == ["personalization.json"]
