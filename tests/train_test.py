"""End-to-end tests of `python -m experiments.train`, run as the subprocess a user would start.

One tiny reference run (FedAvg on 6 digits clients, 3 per round, 6 rounds) is checked against
the file contract of docs/architecture.md. The same command interrupted by Ctrl-C and then by
`kill -9`, and rerun each time, must end with the reference's final model and metrics. Each
kind of bad input must end with status 2 and one line on stderr naming the flag or file, no
traceback, nothing written and nothing changed. After every run, the TFF worker it started must
be gone.

Bad input is checked in this process (the binary's own flag parser and `main`, with SystemExit
caught), since each subprocess would spend most of its time importing TensorFlow; a few cases also
run as subprocesses, for the exit status and the clean stderr a shell sees.
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
import re
import shutil
import signal

import numpy as np
import pytest
import tensorflow as tf
from absl import flags
from absl import logging as absl_logging

from experiments import train
from mfl_tff.algorithms import builders
from mfl_tff.data import registry, sinusoid
from mfl_tff.data.settings import TaskSettings
from mfl_tff.training import program, runtime
from tests import testing
from tests.testing import WORKER_PID, csv_rows, saved_rounds

TOTAL_ROUNDS = testing.TINY_TOTAL_ROUNDS
ROUNDS_PER_EVAL = testing.TINY_ROUNDS_PER_EVAL
EXPERIMENT = testing.TINY_EXPERIMENT
TINY_FLAGS = testing.TINY_FLAGS
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
    "quantization_bits",
    "quantization_threshold",
    "label_noise",
    "meta_model",
    "client_optimizer",
    "inner_clip_norm",
    "meta_clip_norm",
    "data_on_workers",
)


def _checkpoint_tensors(root, round_num):
    return testing.checkpoint_tensors(root, EXPERIMENT, round_num)


# ---------------------------------------------------------------------------------------------
# The file contract (the reference run is the session fixture `train_reference`, conftest.py).
# ---------------------------------------------------------------------------------------------


def test_metrics_csv_has_round_num_first_and_one_row_per_round(train_reference):
    root, _ = train_reference
    path = root / "results" / EXPERIMENT / "experiment.metrics.csv"
    with open(path, newline="") as f:
        header = f.readline().strip().split(",")
    assert header[0] == "round_num"
    assert len(header) == len(set(header)) > 2
    rows = csv_rows(path)
    assert [int(r["round_num"]) for r in rows] == list(range(1, TOTAL_ROUNDS + 1))
    assert all(float(r["client_work/train_loss"]) > 0 for r in rows)
    evaluated = [bool(r["personalization/after_adaptation/mean"]) for r in rows]
    assert evaluated == [r % ROUNDS_PER_EVAL == 0 for r in range(1, TOTAL_ROUNDS + 1)]


def test_hparams_csv_records_every_flag(train_reference):
    root, _ = train_reference
    rows = csv_rows(root / "results" / EXPERIMENT / "hparams.csv")
    assert len(rows) == 1
    missing = set(CONTRACT_FLAGS) - set(rows[0])
    assert not missing
    assert rows[0]["task"] == "digits" and rows[0]["total_rounds"] == str(TOTAL_ROUNDS)
    assert rows[0]["root_output_dir"] == str(root)


def test_personalization_json_has_the_design_shape(train_reference):
    root, _ = train_reference
    with open(root / "results" / EXPERIMENT / "personalization.json") as f:
        report = json.load(f)
    assert set(report) >= testing.PERSONALIZATION_KEYS
    assert report["task"] == "digits" and report["algorithm"] == "fedavg"
    assert report["metric"] == "accuracy"
    assert report["num_clients"] == 3 and report["rounds"] == TOTAL_ROUNDS
    for key in ("before_adaptation", "after_adaptation"):
        assert set(report[key]) >= testing.DISTRIBUTION_KEYS
        assert all(isinstance(report[key][k], float) for k in ("mean", "p10", "median", "p90"))
        assert 0.0 <= report[key]["mean"] <= 1.0
    curve = report["steps_curve"]
    assert len(curve) == 3 and all(isinstance(v, float) for v in curve)  # Steps 0..inner_steps.
    assert curve[0] == pytest.approx(report["before_adaptation"]["mean"])


def test_checkpoints_and_tensorboard_are_written(train_reference):
    root, _ = train_reference
    saved = saved_rounds(root / "checkpoints" / EXPERIMENT)
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


def test_progress_is_one_line_per_round_and_quiet(train_reference):
    _, completed = train_reference
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
    # The worker the run started was seen below it, and it printed the same one.
    assert list(completed.workers.workers) == [int(WORKER_PID.search(completed.stdout)[1])]


# ---------------------------------------------------------------------------------------------
# Resume.
# ---------------------------------------------------------------------------------------------


def _interrupted_and_rerun(scratch: pathlib.Path) -> pathlib.Path:
    """The tiny run stopped by Ctrl-C, rerun and killed by `kill -9`, and rerun to its end, each
    step checked as it happens; returns its root_output_dir."""
    flags = (*TINY_FLAGS, f"--root_output_dir={scratch}")
    checkpoints = scratch / "checkpoints" / EXPERIMENT
    log = scratch / "stdout.txt"

    # 1. Ctrl-C once the first round is saved: exit 130, a hint to rerun, the worker stopped.
    with open(log, "w") as stdout:
        process = testing.start_binary("train", *flags, stdout=stdout)
        workers = testing.OwnWorkers(process.pid)
        try:
            testing.wait_for_path(checkpoints / "program_state_1", process, workers)
            process.send_signal(signal.SIGINT)
            _, stderr = testing.communicate_recording(process, workers)
        finally:
            testing.kill_group(process)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr
    saved = max(saved_rounds(checkpoints))
    assert testing.last_line(stderr) == (
        f"Interrupted; rerun the same command to resume from round {saved}."
    )
    assert workers.add_printed(log.read_text()), "the binary did not report its worker"
    workers.assert_gone()

    # 2. Rerun, and kill -9 the whole job (as a terminal or a scheduler would) once it has saved
    # a round of its own.
    assert saved < TOTAL_ROUNDS - 1, f"Ctrl-C came too late (round {saved}) to test kill -9"
    with open(log, "w") as stdout:
        process = testing.start_binary("train", *flags, stdout=stdout)
        workers = testing.OwnWorkers(process.pid)
        try:
            testing.wait_for_path(checkpoints / f"program_state_{saved + 1}", process, workers)
        finally:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate(timeout=testing.RUN_TIMEOUT_S)
    assert process.returncode == -signal.SIGKILL
    text = log.read_text()
    assert f"Resuming after round {saved}" in text
    assert workers.add_printed(text), "the binary did not report its worker"
    workers.assert_gone()

    # 3. Rerun to the end (run_binary checks its worker is gone).
    completed = testing.run_binary("train", *flags)
    assert completed.returncode == 0, completed.stderr
    assert "Resuming after round" in completed.stdout
    return scratch


@pytest.fixture(scope="module")
def interrupted_and_rerun(background):
    return background.results(__name__, "interrupted_and_rerun")["run"]


def test_rerun_after_ctrl_c_and_kill_9_ends_like_the_uninterrupted_run(
    interrupted_and_rerun, train_reference
):
    root, (reference_root, _) = interrupted_and_rerun, train_reference
    resumed = _checkpoint_tensors(root, TOTAL_ROUNDS)
    expected = _checkpoint_tensors(reference_root, TOTAL_ROUNDS)
    assert resumed.keys() == expected.keys()
    for name, value in expected.items():
        np.testing.assert_allclose(resumed[name], value, rtol=0, atol=1e-6, err_msg=name)

    got = csv_rows(root / "results" / EXPERIMENT / "experiment.metrics.csv")
    want = csv_rows(reference_root / "results" / EXPERIMENT / "experiment.metrics.csv")
    assert [r["round_num"] for r in got] == [r["round_num"] for r in want]
    for got_row, want_row in zip(got, want):
        assert got_row.keys() == want_row.keys()
        for key, value in want_row.items():
            if value:
                assert float(got_row[key]) == pytest.approx(float(value), abs=1e-6), key
            else:
                assert got_row[key] == "", key
    with open(root / "results" / EXPERIMENT / "personalization.json") as f:
        got_report = json.load(f)
    with open(reference_root / "results" / EXPERIMENT / "personalization.json") as f:
        want_report = json.load(f)
    assert got_report["after_adaptation"]["mean"] == pytest.approx(
        want_report["after_adaptation"]["mean"], abs=1e-6
    )


# ---------------------------------------------------------------------------------------------
# Bad input.
# ---------------------------------------------------------------------------------------------

# name -> (flags besides the root, text the error line must contain). Unless a case says
# otherwise it targets a new experiment in an output directory that already holds the reference
# run, which must neither change nor gain a file.
BAD_INPUT = {
    "unknown_task": (("--task=no_such_task",), "--task"),
    "unknown_algorithm": (("--algorithm=no_such_algorithm",), "--algorithm"),
    "zero_rounds": (("--total_rounds=0",), "--total_rounds"),
    "negative_clients_per_round": (("--clients_per_round=-2",), "--clients_per_round"),
    "not_a_number": (("--total_rounds=four",), "--total_rounds"),
    "unknown_flag": (("--total_round=4",), "total_round"),
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
    # 0.2 is not digits' own inner_lr (0.1), so the flag really differs from the saved run's.
    "resume_with_a_changed_flag": ((*TINY_FLAGS, "--inner_lr=0.2"), "--inner_lr"),
    # Sinusoid generated on the workers is other clients than the driver's: not switched on resume.
    "resume_switching_generated_data": (
        ("--task=sinusoid", "--experiment_name=generated_on_workers"),
        "--data_on_workers=False differs from data_on_workers=True",
    ),
    "dp_without_noise_multiplier": (("--aggregator=dp",), "--noise_multiplier"),
    # Several rounds in one call chain aggregations: refused before any worker is contacted.
    # (mfl's two-phase round runs phase by phase: tests/multi_worker_test.py.)
    "rounds_per_call_on_several_workers": (
        (
            *TINY_FLAGS,
            "--rounds_per_call=2",
            "--execution=remote",
            "--worker=localhost:1,localhost:2",
        ),
        "--rounds_per_call=2 chains rounds in one TFF call, which cannot run on several workers",
    ),
    "negative_rounds_per_call": (("--rounds_per_call=-1",), "--rounds_per_call must be >= 0"),
    "dp_clip_norm_not_a_number": (
        ("--aggregator=dp", "--noise_multiplier=1", "--clip_norm=big"),
        "--clip_norm",
    ),
    "dp_delta_out_of_range": (
        ("--aggregator=dp", "--noise_multiplier=1", "--dp_delta=1"),
        "--dp_delta",
    ),
    "robust_with_cohorts": (("--aggregator=robust", "--cohort_size=5"), "--cohort_size"),
    "secure_with_cohorts": (("--aggregator=secure", "--cohort_size=5"), "--cohort_size"),
    "quantization_bits_without_compressed": (("--quantization_bits=4",), "--quantization_bits"),
    "quantization_bits_out_of_range": (
        ("--aggregator=compressed", "--quantization_bits=17"),
        "--quantization_bits must be in 1..16",
    ),
    "negative_quantization_threshold": (
        ("--aggregator=compressed", "--quantization_threshold=-1"),
        "--quantization_threshold",
    ),
    "secure_on_several_workers": (
        ("--aggregator=secure", "--execution=remote", "--worker=localhost:1,localhost:2"),
        "--aggregator=secure runs on one worker",
    ),
    "remote_without_worker": (("--execution=remote",), "--worker"),
    "worker_not_host_port": (("--execution=remote", "--worker=localhost"), "--worker"),
    "worker_without_remote": (("--worker=localhost:8000",), "--execution=remote"),
    "shots_without_hi": (("--task=sinusoid", "--shots=2:"), "--shots=2:"),
    "shots_not_numbers": (("--task=sinusoid", "--shots=a:b"), "--shots=a:b"),
    "shots_reversed": (("--task=sinusoid", "--shots=5:2"), "--shots=2:5"),
    "label_noise_not_numbers": (("--task=sinusoid", "--label_noise=a:b"), "--label_noise=a:b"),
    "label_noise_reversed": (("--task=sinusoid", "--label_noise=1:0"), "--label_noise=0:1"),
    "label_noise_negative": (("--task=sinusoid", "--label_noise=-0.5"), "--label_noise"),
    # The default task, digits_fewshot, takes no label noise: an error, not an ignored flag.
    "label_noise_on_digits_fewshot": (("--label_noise=0.1",), "drop --label_noise"),
    "shot_range_on_dirichlet_digits": (("--task=digits", "--shots=2:5"), "--task=digits"),
    # A user's task whose builder has no data_on_workers option (registered for this case only,
    # `USER_TASKS`): refused, not ignored, since the driver would send the features after all.
    "data_on_workers_on_a_user_task": (
        ("--task=user_task_without_data_on_workers", "--data_on_workers"),
        "--data_on_workers does not apply to --task=user_task_without_data_on_workers",
    ),
    "unknown_meta_model": (("--meta_model=nope",), "meta_model"),
    "unknown_client_optimizer": (("--client_optimizer=adam",), "client_optimizer"),
    "negative_inner_clip_norm": (("--inner_clip_norm=-1",), "--inner_clip_norm"),
    "infinite_meta_clip_norm": (("--meta_clip_norm=inf",), "--meta_clip_norm"),
    # Nothing listens on port 1; the check gives up after --worker_timeout, before any write.
    # (It comes after the task and the algorithm are built: the tiny ones build fastest.)
    "unreachable_worker": (
        (
            *TINY_FLAGS[:-1],
            "--execution=remote",
            "--worker=localhost:1",
            "--worker_timeout=2",
        ),
        "no TFF worker answered",
    ),
}


def _build_user_task(*, seed: int = 0, num_train_clients: int = 20, num_eval_clients: int = 4):
    """A user's task without a data_on_workers option (digits under another name)."""
    return registry.get_task(
        "digits", seed=seed, num_train_clients=num_train_clients, num_eval_clients=num_eval_clients
    )


# Tasks registered in this process (`registry.register_task`) for the case that names them.
USER_TASKS = {
    "data_on_workers_on_a_user_task": ("user_task_without_data_on_workers", _build_user_task)
}
# Also run as a subprocess: an absl parse error (usage errors raised in `main` end the same way,
# through the same exit; each subprocess costs seconds of the suite's budget).
SUBPROCESS_CASES = ("not_a_number",)


@pytest.fixture(scope="module")
def bad_input_root(train_reference, tmp_path_factory):
    """A copy of the reference's output directory, with another experiment's checkpoints.

    Returns (root, scratch with an empty directory and a plain file). A copy, so that the
    reference itself cannot be changed by a case that fails to refuse.
    """
    reference_root, _ = train_reference
    root = tmp_path_factory.mktemp("bad_input") / "out"
    shutil.copytree(reference_root, root)
    # (A damaged checkpoint takes the same path through the binary; tests/program_test.py
    # covers it.)
    shutil.copytree(root / "checkpoints" / EXPERIMENT, root / "checkpoints" / "copied")
    # A sinusoid experiment trained with --data_on_workers (only the setting compared matters).
    (root / "results" / "generated_on_workers").mkdir()
    (root / "results" / "generated_on_workers" / "hparams.csv").write_text(
        "task,data_on_workers\nsinusoid,True\n"
    )
    scratch = tmp_path_factory.mktemp("bad_input_scratch")
    (scratch / "empty").mkdir()
    (scratch / "file").write_text("a file where a directory should be\n")
    return root, scratch


def _bad_flags(case, root, scratch) -> list[str]:
    flags = [f.format(empty=scratch / "empty", file=scratch / "file") for f in BAD_INPUT[case][0]]
    if not any(f.startswith("--root_output_dir") for f in flags):
        flags.append(f"--root_output_dir={root}")
    if not any(f.startswith("--experiment_name") for f in flags):
        flags.append("--experiment_name=bad_input")
    return flags


def _run_in_process(argv: list[str], capsys) -> tuple[object, str, str]:
    """The binary's flag parsing and `main` in this process: (exit code, stdout, stderr).

    Flags, and the log levels `main` sets, are restored afterwards.
    """
    capsys.readouterr()
    tf_level = tf.get_logger().level
    absl_level = absl_logging.get_verbosity()
    try:
        with pytest.raises(SystemExit) as exited:
            train.main(train._parse_flags(["train", *argv]))
    finally:
        flags.FLAGS.unparse_flags()
        tf.get_logger().setLevel(tf_level)
        absl_logging.set_verbosity(absl_level)
    out, err = capsys.readouterr()
    return exited.value.code, out, err


def _assert_one_line_error(code, stdout: str, stderr: str, expected: str) -> None:
    assert code == train.EXIT_BAD_INPUT, (code, stdout, stderr)
    assert "Traceback" not in stderr, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: ") and expected in lines[0], stderr
    # Everything is checked before the worker starts, so there is no worker to leak.
    assert not WORKER_PID.search(stdout), stdout


@pytest.mark.parametrize("case", sorted(BAD_INPUT))
def test_bad_input_is_one_line_naming_the_problem_and_writes_nothing(
    bad_input_root, case, capsys, monkeypatch
):
    root, scratch = bad_input_root
    if case in USER_TASKS:
        registry.task_names()  # the built-ins, then a copy the test may add to (restored after)
        monkeypatch.setattr(registry, "_BUILDERS", dict(registry._BUILDERS))
        registry.register_task(*USER_TASKS[case])
    before = testing.tree_digest(root.parent)
    # Other tests' workers (background jobs, a worker still shutting down) may be alive; the
    # refused run must not have started one of its own.
    workers_before = set(runtime.live_worker_pids())
    code, stdout, stderr = _run_in_process(_bad_flags(case, root, scratch), capsys)
    _assert_one_line_error(code, stdout, stderr, BAD_INPUT[case][1])
    assert testing.tree_digest(root.parent) == before, "the refused run changed its output"
    assert set(runtime.live_worker_pids()) <= workers_before


# ---------------------------------------------------------------------------------------------
# Heterogeneous clients and meta-model flags reach the task, AlgorithmOptions and hparams.csv.
# ---------------------------------------------------------------------------------------------

HETEROGENEOUS = (
    "--task=sinusoid",
    "--algorithm=mfl",
    "--num_train_clients=30",
    "--num_eval_clients=3",
    "--clients_per_round=5",
    "--shots=2:20",
    "--label_noise=0:1",
)
META_MODEL_FLAGS = (
    "--meta_model=per_step",
    "--client_optimizer=momentum",
    "--inner_clip_norm=0",
    "--meta_clip_norm=2.5",
)


def _built_in_process(argv, tmp_path, capsys, monkeypatch) -> tuple[object, object, str]:
    """Runs the binary in process up to `builders.build_algorithm`: (task, options, stderr).

    The builder is replaced by one that records what it is given and refuses (so the run ends
    with a usage error, before anything is written).
    """
    built = {}

    def build_algorithm(name, task, options):
        built.update(task=task, options=options)
        raise ValueError("stopped by the test")

    monkeypatch.setattr(train.builders, "build_algorithm", build_algorithm)
    root = tmp_path / "out"
    code, _, stderr = _run_in_process([*argv, f"--root_output_dir={root}"], capsys)
    assert code == train.EXIT_BAD_INPUT and "stopped by the test" in stderr, stderr
    assert not root.exists()
    return built["task"], built["options"], stderr


def test_shot_range_label_noise_and_meta_model_flags_reach_the_task_and_the_options(
    tmp_path, capsys, monkeypatch
):
    argv = [*HETEROGENEOUS, *META_MODEL_FLAGS]
    task, options, _ = _built_in_process(argv, tmp_path, capsys, monkeypatch)
    assert task.settings.shots == (2, 20)
    sizes = set()
    for cid, packed in zip(
        task.train_data.client_ids, task.train_clients(task.train_data.client_ids)
    ):
        size = int(packed["support"]["mask"].sum())
        assert 2 <= size <= 20 and packed["support"]["mask"].shape == (1, 20)
        sizes.add(size)
        arrays = task.train_data.client_arrays(cid)
        amplitude, phase = sinusoid.wave(cid, 0)
        clean = amplitude * np.sin(arrays["x"].astype(np.float64) - phase)
        assert not np.allclose(arrays["y"], clean, atol=1e-4)  # noisy (sigma ~ U[0, 1])
    assert len(sizes) > 5
    assert (options.meta_model, options.client_optimizer) == ("per_step", "momentum")
    assert (options.inner_clip_norm, options.meta_clip_norm) == (0.0, 2.5)


def test_data_on_workers_reaches_the_task(tmp_path, capsys, monkeypatch):
    argv = ["--data_on_workers", "--num_train_clients=30", "--num_eval_clients=3"]
    task, _, _ = _built_in_process(argv, tmp_path, capsys, monkeypatch)
    assert task.name == "digits_fewshot" and task.data_on_workers


def test_emnist_cache_flags_reach_the_driver_and_the_workers(
    emnist_dir, tmp_path, capsys, monkeypatch
):
    directory = emnist_dir[0]
    argv = [
        "--task=emnist",
        "--data_on_workers",
        f"--data_cache_dir={directory}",
        "--worker_data_cache_dir=/data/on/the/workers",
        "--clients_per_round=3",
        f"--num_eval_clients={testing.NUM_EVAL}",
    ]
    task, _, _ = _built_in_process(argv, tmp_path, capsys, monkeypatch)
    # The driver read its own file (its writers are the clients); the workers read theirs.
    assert len(task.train_data.client_ids) + testing.NUM_EVAL == testing.NUM_WRITERS
    assert task.example_source.path == "/data/on/the/workers/emnist_all.sqlite"


def test_meta_model_flags_default_to_the_algorithms_defaults(tmp_path, capsys, monkeypatch):
    _, options, _ = _built_in_process(HETEROGENEOUS[:5], tmp_path, capsys, monkeypatch)
    defaults = builders.AlgorithmOptions()
    for name in ("meta_model", "client_optimizer", "inner_clip_norm", "meta_clip_norm"):
        assert getattr(options, name) == getattr(defaults, name), name
    # Unset, the meta-model is the algorithm's to choose: mfl's is `conditioned`.
    assert builders.resolved_options("mfl", options).meta_model == "conditioned"


def test_resuming_an_mfl_run_saved_with_rates_needs_the_flag_the_error_names(
    tmp_path, capsys, monkeypatch
):
    """mfl's runs from before `conditioned` became its default recorded `rates`: unset, the flag
    would train another meta-model, so the run is refused with the flag that resumes it."""
    saved = tmp_path / "out" / "results" / "saved"
    saved.mkdir(parents=True)
    # Settings missing from a saved file are not compared: these two are what matters here.
    (saved / "hparams.csv").write_text("algorithm,meta_model\nmfl,rates\n")
    argv = [*HETEROGENEOUS[:5], f"--root_output_dir={tmp_path / 'out'}", "--experiment_name=saved"]
    code, stdout, stderr = _run_in_process(argv, capsys)
    _assert_one_line_error(
        code,
        stdout,
        stderr,
        "--meta_model=conditioned (the algorithm's default; the flag is unset) differs from "
        "meta_model=rates",
    )
    assert "rerun with --meta_model=rates" in stderr
    # With the flag the check passes, and the run goes on to build its process.
    stopped = ValueError("stopped by the test")
    monkeypatch.setattr(train.builders, "build_algorithm", _raising(stopped))
    code, _, stderr = _run_in_process([*argv, "--meta_model=rates"], capsys)
    assert code == train.EXIT_BAD_INPUT and "stopped by the test" in stderr, stderr


def _raising(error):
    def raise_(*args, **kwargs):
        raise error

    return raise_


@pytest.mark.parametrize(
    "rounds_left, flag, expected",
    [
        (program.VECTORIZE_MIN_ROUNDS - 1, None, False),
        (program.VECTORIZE_MIN_ROUNDS, None, True),
        (program.VECTORIZE_MIN_ROUNDS - 1, "--vectorize_cohorts", True),
        (program.VECTORIZE_MIN_ROUNDS, "--novectorize_cohorts", False),
    ],
)
def test_cohorts_are_vectorized_from_enough_rounds_left_unless_the_flag_says(
    rounds_left, flag, expected, tmp_path, capsys, monkeypatch
):
    argv = [*HETEROGENEOUS[:5], f"--total_rounds={rounds_left}", *([flag] if flag else [])]
    _, options, _ = _built_in_process(argv, tmp_path, capsys, monkeypatch)
    assert options.vectorize_cohorts is expected


def test_a_resumed_run_counts_the_rounds_left_after_its_checkpoint(tmp_path, capsys, monkeypatch):
    # The process is built before the checkpoint is read, from the checkpoints' names.
    saved = tmp_path / "out" / "checkpoints" / "sinusoid_mfl"
    saved.mkdir(parents=True)
    (saved / f"{program.CHECKPOINT_PREFIX}100").write_bytes(b"")
    built = {}

    def build_algorithm(name, task, options):
        built.update(options=options)
        raise ValueError("stopped by the test")

    monkeypatch.setattr(train.builders, "build_algorithm", build_algorithm)
    total = f"--total_rounds={100 + program.VECTORIZE_MIN_ROUNDS - 1}"
    argv = [*HETEROGENEOUS[:5], total, f"--root_output_dir={tmp_path / 'out'}"]
    code, _, stderr = _run_in_process(argv, capsys)
    assert code == train.EXIT_BAD_INPUT and "stopped by the test" in stderr, stderr
    assert built["options"].vectorize_cohorts is False


def test_hparams_record_ranges_as_spelled_and_noise_as_used():
    try:
        train._parse_flags(["train", *HETEROGENEOUS, *META_MODEL_FLAGS])
        values = train._hparams(TaskSettings(shots=(2, 20)))
        assert values["shots"] == "2:20" and values["label_noise"] == "0:1"
        assert values["meta_model"] == "per_step" and values["client_optimizer"] == "momentum"
        assert values["inner_clip_norm"] == 0.0 and values["meta_clip_norm"] == 2.5
        flags.FLAGS.unparse_flags()
        # Unset on a task that takes it: no noise, recorded as 0; on one that does not: empty.
        train._parse_flags(["train", "--task=sinusoid"])
        assert train._hparams(TaskSettings(shots=10))["label_noise"] == "0"
        assert train._hparams(TaskSettings(shots=10))["shots"] == 10
        flags.FLAGS.unparse_flags()
        train._parse_flags(["train"])
        assert train._hparams(TaskSettings(shots=5))["label_noise"] is None
        # An unset --meta_model is recorded as the algorithm's default, as used.
        assert train._hparams(TaskSettings(shots=5))["meta_model"] == "conditioned"
        for argv, meta_model in (
            (["--adaptive_update=local"], "rates"),
            (["--algorithm=meta_sgd"], "rates"),
            (["--algorithm=fedavg"], "rates"),
        ):
            flags.FLAGS.unparse_flags()
            train._parse_flags(["train", *argv])
            assert train._hparams(TaskSettings(shots=5))["meta_model"] == meta_model, argv
    finally:
        flags.FLAGS.unparse_flags()


def _bad_subprocess_run(case: str, scratch: pathlib.Path):
    """SUBPROCESS_CASE `case` run as a user would, against an output directory that already holds
    another experiment: (Run, whether the directory was left exactly as it was)."""
    root = scratch / "out"
    (root / "results" / "other").mkdir(parents=True)
    (root / "results" / "other" / "hparams.csv").write_text("task\ndigits\n")
    (scratch / "empty").mkdir()
    before = testing.tree_digest(root)
    run = testing.run_binary("train", *_bad_flags(case, root, scratch))
    return run, testing.tree_digest(root) == before


@pytest.mark.parametrize("case", SUBPROCESS_CASES)
def test_bad_input_exits_2_with_one_line_from_the_shell(bad_subprocess_runs, case):
    run, unchanged = bad_subprocess_runs[case]
    _assert_one_line_error(run.returncode, run.stdout, run.stderr, BAD_INPUT[case][1])
    assert not run.workers.workers
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
    "robust": (*testing.tiny_flags(3)[:-1], "--aggregator=robust", "--experiment_name=robust"),
    # Cohorts off by default with a per-client aggregator; both rounds quantize every tensor.
    "compressed": (
        "--task=digits_fewshot",
        "--algorithm=fedavg",
        "--num_train_clients=20",
        "--num_eval_clients=3",
        "--clients_per_round=4",
        "--total_rounds=2",
        "--inner_steps=2",
        "--rounds_per_eval=0",
        "--aggregator=compressed",
        "--experiment_name=compressed",
    ),
}


def _aggregator_run(kind: str, scratch: pathlib.Path):
    """A tiny run with aggregator `kind`: (results directory, Run)."""
    run = testing.run_binary("train", *AGGREGATOR_RUNS[kind], f"--root_output_dir={scratch}")
    assert run.returncode == 0, (kind, run.stderr)
    assert run.workers.workers, f"the {kind} run started no worker of its own"
    return scratch / "results" / kind, run


# Started early by conftest.py, one process a job.
BACKGROUND_JOBS = {
    "interrupted_and_rerun": {"run": _interrupted_and_rerun},
    "aggregator_runs": {kind: functools.partial(_aggregator_run, kind) for kind in AGGREGATOR_RUNS},
    "bad_subprocess_runs": {
        case: functools.partial(_bad_subprocess_run, case) for case in SUBPROCESS_CASES
    },
}


@pytest.fixture(scope="module")
def aggregator_runs(background):
    """`{kind: (results directory, Run)}` of a tiny run with each aggregator."""
    return background.results(__name__, "aggregator_runs")


@pytest.fixture(scope="module")
def bad_subprocess_runs(background):
    """`{case: (Run, output directory unchanged)}` of each SUBPROCESS_CASE."""
    return background.results(__name__, "bad_subprocess_runs")


def test_dp_run_reports_its_privacy_budget(aggregator_runs):
    results, completed = aggregator_runs["dp"]
    with open(results / "personalization.json") as f:
        report = json.load(f)
    privacy = report["privacy"]
    assert set(privacy) == testing.PRIVACY_REPORT_KEYS
    q = DP_RUN["clients_per_round"] / DP_RUN["num_train_clients"]
    delta = 1 / DP_RUN["num_train_clients"]  # --dp_delta's default
    assert privacy["sampling_rate"] == pytest.approx(q)
    assert privacy["delta"] == pytest.approx(delta)
    assert privacy["noise_multiplier"] == DP_RUN["noise_multiplier"]
    assert privacy["rounds"] == DP_RUN["rounds"]
    # Computed here with dp_accounting directly, one round at a time.
    expected = testing.rdp_epsilon_round_by_round(
        q, DP_RUN["noise_multiplier"], DP_RUN["rounds"], delta
    )
    assert privacy["epsilon"] == pytest.approx(expected, rel=1e-9)
    rows = csv_rows(results / "experiment.metrics.csv")
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
    rows = csv_rows(results / "experiment.metrics.csv")
    assert len(rows) == 3
    for column in (
        "aggregator/zeroed_count",
        "aggregator/zeroing/clipped_count",
        "clients/dropped",
    ):
        assert all(r[column] != "" for r in rows), column
    assert "privacy/epsilon" not in rows[0]
    assert completed.stderr.strip() == "", completed.stderr


def test_compressed_run_trains_with_quantized_updates(aggregator_runs):
    results, completed = aggregator_runs["compressed"]
    rows = csv_rows(results / "experiment.metrics.csv")
    assert [r["round_num"] for r in rows] == ["1", "2"]
    for column in ("aggregator/zeroed_count", "aggregator/zeroing/clipping_norm"):
        assert all(r[column] != "" for r in rows), column
    hparams = csv_rows(results / "hparams.csv")[0]
    assert hparams["aggregator"] == "compressed"
    assert (hparams["quantization_bits"], hparams["quantization_threshold"]) == ("8", "4")
    # 8-bit words instead of float32: the update travels at under a third of the model's bytes.
    for row in rows:
        model = int(row["communication/download_bytes_per_client"])
        assert int(row["communication/upload_model_bytes_per_client"]) < model / 3
    with open(results / "personalization.json") as f:
        assert 0.0 <= json.load(f)["after_adaptation"]["mean"] <= 1.0
    assert completed.stderr.strip() == "", completed.stderr
