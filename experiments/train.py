r"""Trains one algorithm on one task, with checkpoints, metrics and a held-out evaluation.

With no flags, trains MFL (learned per-layer client learning rates) on `digits_fewshot` (5-way
5-shot real digits, a new label mapping per client) for 100 rounds of 25 clients, and every 25
rounds adapts 100 held-out clients (never trained on) and reports their accuracy before and after
adaptation. It takes about a minute on 2 cores.

  python -m experiments.train --task=sinusoid --algorithm=meta_sgd --total_rounds=500 \
      --inner_steps=1 --inner_lr=0.01 --root_output_dir=/tmp/mfl_tff --experiment_name=sine

writes (DESIGN.md "Contracts"):

  ROOT/results/E/experiment.metrics.csv  round_num, then one column per metric
  ROOT/results/E/hparams.csv             every flag of this binary
  ROOT/results/E/personalization.json    the final held-out evaluation
  ROOT/results/E/worker.log              the TFF worker's own output
  ROOT/checkpoints/E/                    program state; rerunning the same command resumes
  ROOT/logdir/E/                         TensorBoard (tensorboard --logdir ROOT/logdir)

Rerunning a command after an interruption (Ctrl-C, kill, a crash) continues from the last saved
round and ends with the same model and metrics as an uninterrupted run. Only flags that do not
change what is trained (--total_rounds, the eval/checkpoint/log periods, --verbose, ...) may
differ; for anything else, pass a new --experiment_name.

Bad input (an unknown name, a count out of range, an output directory that cannot be written, a
missing data file, a checkpoint of another model) ends with exit status 2 and one line on stderr
naming the flag or file and the fix, before anything is written.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
from collections.abc import Iterator, Sequence
from typing import Any, Optional

from absl import app, flags, logging


def _verbose_requested(argv: Sequence[str]) -> bool:
    """Whether `argv` turns --verbose on, read as absl will (the last occurrence wins)."""
    verbose = False
    for arg in argv[1:]:
        if arg == "--":
            break
        name, _, value = arg.lstrip("-").partition("=")
        if name == "verbose":
            verbose = value.lower() in ("", "true", "t", "1")
        elif name == "noverbose":
            verbose = False
    return verbose


# TensorFlow's C++ logging reads TF_CPP_MIN_LOG_LEVEL once, when the library loads, so --verbose is
# read from argv here, before absl parses the flags. Level 3 also hides the cuDNN/cuBLAS "Unable to
# register" errors every import prints on a machine without a GPU. The imports cannot wait for
# `main`: TensorFlow imported inside `app.run` builds Keras models as if eager, and Flatten then
# fails ("Attempt to convert a value (None)") in every model that has one.
if __name__ == "__main__" and not _verbose_requested(sys.argv):
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"

import tensorflow as tf  # noqa: E402

from experiments import train_flags as cfg  # noqa: E402
from mfl_tff.algorithms import aggregation, builders, mfl  # noqa: E402
from mfl_tff.data import registry  # noqa: E402
from mfl_tff.data.task import FederatedTask  # noqa: E402
from mfl_tff.meta import hparams as meta_hparams  # noqa: E402
from mfl_tff.training import outputs, privacy, program, runtime  # noqa: E402

# --helpshort lists the flags of train_flags as this binary's own.
flags.adopt_module_key_flags(cfg)

EXIT_BAD_INPUT = 2
# The worker died or stopped answering mid-run (checkpoints are intact; rerunning resumes).
EXIT_WORKER_LOST = 3
# 128 + SIGINT, what a shell reports for a job stopped by Ctrl-C.
EXIT_INTERRUPTED = 130


class UsageError(Exception):
    """Bad input; the message is one line naming the flag or file and the fix."""


def _own_flags() -> dict[str, Any]:
    """This binary's flags and their values, in definition order (for hparams.csv)."""
    return {f.name: f.value for f in flags.FLAGS.get_key_flags_for_module(cfg)}


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise UsageError(message)


def _check_flags() -> None:
    """Checks the flags that need no library (counts, ranges, fixed choices)."""
    at_least_one = {
        "total_rounds": cfg.TOTAL_ROUNDS,
        "clients_per_round": cfg.CLIENTS_PER_ROUND,
        "inner_steps": cfg.INNER_STEPS,
        "local_epochs": cfg.LOCAL_EPOCHS,
        "rounds_per_checkpoint": cfg.ROUNDS_PER_CHECKPOINT,
        "rounds_per_log": cfg.ROUNDS_PER_LOG,
        "num_train_clients": cfg.NUM_TRAIN_CLIENTS,
        "num_eval_clients": cfg.NUM_EVAL_CLIENTS,
        "shots": cfg.SHOTS,
        "eval_adaptation_steps": cfg.EVAL_ADAPTATION_STEPS,
    }
    for name, holder in at_least_one.items():
        value = holder.value
        _require(value is None or value >= 1, f"--{name} must be >= 1, got {value}.")
    for name, holder in {
        "rounds_per_eval": cfg.ROUNDS_PER_EVAL,
        "checkpoints_to_keep": cfg.CHECKPOINTS_TO_KEEP,
        "cohort_size": cfg.COHORT_SIZE,
    }.items():
        _require(holder.value >= 0, f"--{name} must be >= 0 (0 turns it off), got {holder.value}.")
    for name, holder in {
        "inner_lr": cfg.INNER_LR,
        "outer_lr": cfg.OUTER_LR,
        "meta_lr": cfg.META_LR,
        "server_lr": cfg.SERVER_LR,
        "dirichlet_concentration": cfg.DIRICHLET,
    }.items():
        value = holder.value
        _require(value is None or value > 0, f"--{name} must be > 0, got {value}.")
    if cfg.NUM_TRAIN_CLIENTS.value is not None:
        _require(
            cfg.CLIENTS_PER_ROUND.value <= cfg.NUM_TRAIN_CLIENTS.value,
            f"--clients_per_round={cfg.CLIENTS_PER_ROUND.value} exceeds "
            f"--num_train_clients={cfg.NUM_TRAIN_CLIENTS.value}; lower --clients_per_round or "
            "raise --num_train_clients.",
        )
    _require(
        cfg.AGGREGATOR.value in cfg.AGGREGATORS,
        f"--aggregator={cfg.AGGREGATOR.value!r} is not supported; choose one of: "
        f"{', '.join(cfg.AGGREGATORS)}.",
    )
    _require(
        cfg.EXECUTION.value in cfg.EXECUTIONS,
        f"--execution={cfg.EXECUTION.value!r} is not supported; choose one of: "
        f"{', '.join(cfg.EXECUTIONS)}.",
    )
    _check_execution_flags()
    _require(cfg.SEED.value >= 0, f"--seed must be >= 0, got {cfg.SEED.value}.")
    _require(bool(cfg.ROOT_OUTPUT_DIR.value), "--root_output_dir must not be empty.")
    name = _experiment_name()
    _require(
        name not in ("", ".", "..") and os.sep not in name,
        f"--experiment_name={name!r} must be a plain directory name (no '{os.sep}').",
    )


def _check_choices() -> None:
    """Checks the flags whose choices the library defines (before any algorithm is built)."""
    choices = (
        (cfg.META_OPTIMIZER, builders.OPTIMIZERS),
        (cfg.SERVER_OPTIMIZER, builders.OPTIMIZERS),
        (cfg.ALPHA_GRANULARITY, meta_hparams.GRANULARITIES),
        (cfg.ADAPTIVE_UPDATE, mfl.ADAPTIVE_UPDATES),
        (cfg.ADAPTIVE_DATA, mfl.ADAPTIVE_DATA),
    )
    for holder, allowed in choices:
        value = holder.value
        _require(
            value in allowed or (holder is cfg.SERVER_OPTIMIZER and not value),
            f"--{holder.name}={value!r} is unknown; choose one of: {', '.join(allowed)}.",
        )


def _check_aggregator_flags() -> None:
    """Checks --aggregator's own flags: dp's noise, clip and delta, and cohorts off per client."""
    kind = cfg.AGGREGATOR.value
    if kind != "dp":
        for name in cfg.DP_FLAGS:
            _require(
                flags.FLAGS[name].value is None,
                f"--{name} applies only with --aggregator=dp; drop it or pass --aggregator=dp.",
            )
    else:
        noise = cfg.NOISE_MULTIPLIER.value
        _require(
            noise is not None,
            "--aggregator=dp needs --noise_multiplier (> 0, e.g. --noise_multiplier=1.0).",
        )
        _require(
            math.isfinite(noise) and noise > 0,
            f"--noise_multiplier must be a number > 0 with --aggregator=dp (without noise epsilon "
            f"is infinite), got {noise}.",
        )
        if cfg.CLIP_NORM.value is not None:
            try:
                aggregation.parse_clip_norm(cfg.CLIP_NORM.value)
            except ValueError:
                raise UsageError(
                    f"--clip_norm={cfg.CLIP_NORM.value!r} must be a number > 0 or 'adaptive'."
                ) from None
        delta = cfg.DP_DELTA.value
        _require(delta is None or 0 < delta < 1, f"--dp_delta must be in (0, 1), got {delta}.")
    if kind in ("dp", "robust") and flags.FLAGS["cohort_size"].present:
        _require(
            cfg.COHORT_SIZE.value == 0,
            f"--cohort_size={cfg.COHORT_SIZE.value} stacks clients into one federated client, but "
            f"--aggregator={kind} must clip each client alone; drop --cohort_size or pass "
            "--cohort_size=0.",
        )


def _privacy_accountant(num_train: int) -> Optional[privacy.PrivacyAccountant]:
    """The run's privacy accountant with --aggregator=dp (None otherwise)."""
    if cfg.AGGREGATOR.value != "dp":
        return None
    try:
        return privacy.PrivacyAccountant.for_training(
            noise_multiplier=cfg.NOISE_MULTIPLIER.value,
            clients_per_round=cfg.CLIENTS_PER_ROUND.value,
            num_train_clients=num_train,
            delta=cfg.DP_DELTA.value,
        )
    except ValueError as e:
        raise UsageError(f"--aggregator=dp: {e}") from None


def _check_execution_flags() -> None:
    if cfg.EXECUTION.value != "remote":
        _require(
            not flags.FLAGS["worker"].present,
            "--worker is only used with --execution=remote; add --execution=remote or drop "
            "--worker.",
        )
        return
    _require(
        bool(cfg.WORKER.value),
        "--execution=remote needs --worker=HOST:PORT, the address of a running TFF worker_binary.",
    )
    try:
        runtime.check_target(cfg.WORKER.value)
    except ValueError:
        raise UsageError(
            f"--worker={cfg.WORKER.value!r} must be HOST:PORT, e.g. --worker=10.0.0.7:8000."
        ) from None
    _require(
        cfg.WORKER_TIMEOUT.value > 0,
        f"--worker_timeout must be > 0 seconds, got {cfg.WORKER_TIMEOUT.value}.",
    )


def _connect_remote_worker() -> None:
    """With --execution=remote, fails before anything is written if no worker answers."""
    if cfg.EXECUTION.value != "remote":
        return
    try:
        runtime.wait_for_worker(cfg.WORKER.value, cfg.WORKER_TIMEOUT.value)
    except ConnectionError:
        port = cfg.WORKER.value.rpartition(":")[2]
        raise UsageError(
            f"--worker={cfg.WORKER.value}: no TFF worker answered within "
            f"{cfg.WORKER_TIMEOUT.value:g} s; start one on that host (worker_binary "
            f"--port={port}, see the README's 'Running on a remote worker') or fix --worker."
        ) from None


@contextlib.contextmanager
def _execution(paths: outputs.OutputPaths) -> Iterator[None]:
    """TFF's execution context for the run: a worker started here, or the one at --worker."""
    if cfg.EXECUTION.value == "remote":
        with runtime.remote_execution(cfg.WORKER.value, timeout_s=cfg.WORKER_TIMEOUT.value):
            print(f"TFF worker at {cfg.WORKER.value} (remote)", flush=True)
            yield
        return
    with runtime.local_execution(log_path=paths.worker_log) as worker:
        print(f"TFF worker_binary pid {worker.pid}, log {paths.worker_log}", flush=True)
        yield


def _experiment_name() -> str:
    if cfg.EXPERIMENT_NAME.value is not None:
        return cfg.EXPERIMENT_NAME.value
    return f"{cfg.TASK.value}_{cfg.ALGORITHM.value}"


def _set_log_levels(verbose: bool) -> None:
    """TensorFlow's and TFF's Python logs: warnings and up by default, everything with --verbose.

    (Their C++ logs are set before TensorFlow loads, at the top of this file.)
    """
    if verbose:
        logging.set_verbosity(logging.INFO)
        tf.get_logger().setLevel("INFO")
    else:
        logging.set_verbosity(logging.WARNING)
        tf.get_logger().setLevel("ERROR")


def _train() -> None:
    _check_flags()
    _set_log_levels(cfg.VERBOSE.value)
    _require(
        cfg.TASK.value in registry.task_names(),
        f"--task={cfg.TASK.value!r} is unknown; choose one of: {', '.join(registry.task_names())}.",
    )
    _require(
        cfg.ALGORITHM.value in builders.ALGORITHMS,
        f"--algorithm={cfg.ALGORITHM.value!r} is unknown; choose one of: "
        f"{', '.join(builders.ALGORITHMS)}.",
    )
    _check_choices()
    _check_aggregator_flags()
    paths = outputs.OutputPaths(cfg.ROOT_OUTPUT_DIR.value, _experiment_name())
    try:
        outputs.check_output_dirs(paths)
    except outputs.OutputDirError as e:
        raise UsageError(f"--root_output_dir={cfg.ROOT_OUTPUT_DIR.value}: {e}") from None
    hparams = _own_flags()
    try:
        differences = outputs.hparams_differences(
            paths.hparams_csv, hparams, cfg.MAY_DIFFER_ON_RESUME
        )
    except outputs.ProgramError as e:
        raise UsageError(str(e)) from None
    if differences:
        name, saved, current = differences[0]
        raise UsageError(
            f"--{name}={current} differs from {name}={saved} in {paths.hparams_csv}, the "
            f"experiment this command would resume; rerun with --{name}={saved}, or pass a new "
            "--experiment_name."
        )
    task = _build_task()
    num_train = len(task.train_data.client_ids)
    _require(
        cfg.CLIENTS_PER_ROUND.value <= num_train,
        f"--clients_per_round={cfg.CLIENTS_PER_ROUND.value} exceeds the {num_train} training "
        f"clients of --task={cfg.TASK.value}; lower --clients_per_round or raise "
        "--num_train_clients.",
    )
    accountant = _privacy_accountant(num_train)
    process, spec = _build_algorithm(task)
    try:
        start_round, state = program.load_checkpoint(paths.checkpoint_dir, process)
    except program.CheckpointError as e:
        written_with = (
            f"the flags in {paths.hparams_csv}"
            if os.path.exists(paths.hparams_csv)
            else "the flags that wrote it"
        )
        raise UsageError(
            f"{e}; rerun with {written_with}, or pass a new --experiment_name."
        ) from None
    _connect_remote_worker()

    # Everything is checked: from here on, files are written.
    held_out = len(task.eval_data.client_ids)
    config = program.ProgramConfig(
        total_rounds=cfg.TOTAL_ROUNDS.value,
        clients_per_round=cfg.CLIENTS_PER_ROUND.value,
        fine_tune_lr=cfg.INNER_LR.value,
        eval_adaptation_steps=cfg.EVAL_ADAPTATION_STEPS.value or cfg.INNER_STEPS.value,
        rounds_per_eval=cfg.ROUNDS_PER_EVAL.value,
        rounds_per_checkpoint=cfg.ROUNDS_PER_CHECKPOINT.value,
        checkpoints_to_keep=cfg.CHECKPOINTS_TO_KEEP.value,
        rounds_per_log=cfg.ROUNDS_PER_LOG.value,
        num_eval_clients=min(held_out, cfg.NUM_EVAL_CLIENTS.value or cfg.DEFAULT_EVAL_CLIENTS),
    )
    outputs.write_hparams(paths.hparams_csv, hparams)
    print(
        f"{cfg.ALGORITHM.value} on {task.name}: {cfg.TOTAL_ROUNDS.value} rounds x "
        f"{cfg.CLIENTS_PER_ROUND.value} of {num_train} clients, {config.num_eval_clients} held-out "
        f"clients evaluated; output {paths.results_dir}",
        flush=True,
    )
    if accountant is not None:
        print(
            f"Differential privacy: noise multiplier {accountant.noise_multiplier:g}, sampling "
            f"rate {accountant.sampling_rate:.4g}, delta {accountant.delta:.3g}: epsilon "
            f"{accountant.epsilon(cfg.TOTAL_ROUNDS.value):.4g} after {cfg.TOTAL_ROUNDS.value} "
            f"rounds ({privacy.ACCOUNTANT})",
            flush=True,
        )
    if state is not None:
        print(f"Resuming after round {start_round} from {paths.checkpoint_dir}", flush=True)
    try:
        with _execution(paths):
            report = program.run_training(
                process,
                spec,
                task,
                config,
                paths,
                start_round=start_round,
                state=state,
                log=lambda line: print(line, flush=True),
                accountant=accountant,
            )
    except KeyboardInterrupt:
        print(
            f"Interrupted; rerun the same command to resume from {_resume_point(paths)}.",
            file=sys.stderr,
            flush=True,
        )
        sys.exit(EXIT_INTERRUPTED)
    except (ConnectionError, runtime.WorkerExitedError) as e:
        # The worker died or the network dropped mid-run: the saved rounds are intact.
        print(
            f"The TFF worker was lost ({_one_line(str(e))}); once it runs again, rerun the same "
            f"command to resume from {_resume_point(paths)}.",
            file=sys.stderr,
            flush=True,
        )
        sys.exit(EXIT_WORKER_LOST)
    after = report["after_adaptation"]
    print(
        f"Done: {report['metric']} on {report['num_clients']} held-out clients "
        f"{report['before_adaptation']['mean']:.4f} before, {after['mean']:.4f} after adaptation "
        f"(p10 {after['p10']:.4f}); {paths.personalization_json}",
        flush=True,
    )


def _resume_point(paths: outputs.OutputPaths) -> str:
    saved = program.checkpoint_rounds(paths.checkpoint_dir)
    return f"round {saved[-1]}" if saved else "the start"


def _build_task() -> FederatedTask:
    """The task from the data flags; task errors become one-line usage errors."""
    options = {
        "seed": cfg.SEED.value,
        "num_train_clients": cfg.NUM_TRAIN_CLIENTS.value,
        "num_eval_clients": cfg.NUM_EVAL_CLIENTS.value,
        "shots": cfg.SHOTS.value,
        "dirichlet_concentration": cfg.DIRICHLET.value,
        "model": cfg.MODEL.value,
        "data_cache_dir": cfg.DATA_CACHE_DIR.value,
    }
    # Unset flags leave the task's own defaults in place.
    options = {k: v for k, v in options.items() if v is not None}
    accepted = set(registry.task_options(cfg.TASK.value))
    for name in sorted(set(options) - accepted):
        if flags.FLAGS[name].present:
            print(f"note: --{name} does not apply to --task={cfg.TASK.value}; ignored.", flush=True)
    try:
        return registry.get_task(cfg.TASK.value, ignore_unknown_options=True, **options)
    except FileNotFoundError as e:
        raise UsageError(f"--data_cache_dir: {e}") from None
    except ValueError as e:
        raise UsageError(f"--task={cfg.TASK.value}: {e}") from None


def _build_algorithm(
    task: FederatedTask,
) -> tuple[program.LearningProcess, builders.AlgorithmSpec]:
    """The process and spec from the algorithm flags; option errors become usage errors."""
    clients = cfg.CLIENTS_PER_ROUND.value
    kind = cfg.AGGREGATOR.value
    dp = kind == "dp"
    try:
        aggregators = aggregation.build_aggregators(
            kind,
            learns_alpha=cfg.ALGORITHM.value in builders.LEARNS_ALPHA,
            noise_multiplier=cfg.NOISE_MULTIPLIER.value if dp else None,
            clip_norm=(cfg.CLIP_NORM.value or aggregation.ADAPTIVE) if dp else None,
            clients_per_round=clients if dp else None,
        )
    except ValueError as e:
        raise UsageError(f"--aggregator={kind}: {e}") from None
    options = builders.AlgorithmOptions(
        inner_lr=cfg.INNER_LR.value,
        inner_steps=cfg.INNER_STEPS.value,
        local_epochs=cfg.LOCAL_EPOCHS.value,
        meta_optimizer=cfg.META_OPTIMIZER.value,
        meta_lr=cfg.META_LR.value,
        server_optimizer=cfg.SERVER_OPTIMIZER.value or None,
        server_lr=cfg.SERVER_LR.value,
        outer_lr=cfg.OUTER_LR.value,
        alpha_granularity=cfg.ALPHA_GRANULARITY.value,
        adaptive_update=cfg.ADAPTIVE_UPDATE.value,
        adaptive_data=cfg.ADAPTIVE_DATA.value,
        first_order=cfg.FIRST_ORDER.value,
        model_aggregator=aggregators.model,
        meta_aggregator=aggregators.meta,
        # A cohort larger than a round only adds empty padding clients. Per-client aggregators
        # (dp, robust) must see clients, not cohorts.
        cohort_size=None if aggregators.per_client else min(cfg.COHORT_SIZE.value, clients) or None,
    )
    try:
        return builders.build_algorithm(cfg.ALGORITHM.value, task, options)
    except ValueError as e:
        raise UsageError(f"--algorithm={cfg.ALGORITHM.value}: {e}") from None


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _parse_flags(argv: Sequence[str]) -> list[str]:
    """absl's parser, with its errors as one line and exit status 2 instead of a usage dump."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        sys.stderr.write(f"error: {_one_line(e)}; see --helpshort.\n")
        sys.exit(EXIT_BAD_INPUT)


def main(argv: Sequence[str]) -> None:
    _require_no_arguments(argv)
    try:
        _train()
    except UsageError as e:
        sys.stderr.write(f"error: {_one_line(e)}\n")
        sys.exit(EXIT_BAD_INPUT)
    except KeyboardInterrupt:
        # Before the worker started (or after it stopped): nothing to resume from here.
        sys.stderr.write("Interrupted.\n")
        sys.exit(EXIT_INTERRUPTED)


def _require_no_arguments(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        sys.stderr.write(
            f"error: unexpected argument(s) {' '.join(argv[1:])}; flags are --name=value.\n"
        )
        sys.exit(EXIT_BAD_INPUT)


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
