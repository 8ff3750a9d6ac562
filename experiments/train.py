r"""Trains one algorithm on one task, with checkpoints, metrics and a held-out evaluation.

With no flags, trains MFL (learned per-layer client learning rates, scaled at each inner step by
its default meta-model, `conditioned`, from each client's own support loss and gradient norms) on
`digits_fewshot` (5-way 5-shot real digits, a new label mapping per client) for 100 rounds of 25
clients, and every 25 rounds adapts 100 held-out clients (never trained on) and reports their
accuracy before and after adaptation. It takes about a minute on 2 cores.

Hyperparameters come from the task: each task carries the settings its protocol uses
(`task.settings`: inner rate and steps, shots, meta-optimizer and its rate, alpha granularity,
clients per round, ...). A hyperparameter flag left unset takes the task's value, one given
explicitly wins, and the binary prints the effective values before training. So

  python -m experiments.train --task=sinusoid --algorithm=meta_sgd --total_rounds=500 \
      --root_output_dir=/tmp/mfl_tff --experiment_name=sine

trains with sinusoid's MAML / Meta-SGD protocol (10 shots, 1 inner step at rate 0.01, Adam 1e-3,
per-coordinate rates). It writes:

  ROOT/results/E/experiment.metrics.csv  round_num, then one column per metric
  ROOT/results/E/hparams.csv             every flag of this binary, hyperparameters as used
  ROOT/results/E/personalization.json    the final held-out evaluation
  ROOT/results/E/worker.log              the TFF worker's own output
  ROOT/checkpoints/E/                    program state; rerunning the same command resumes
  ROOT/logdir/E/                         TensorBoard (tensorboard --logdir ROOT/logdir)

Rerunning a command after an interruption (Ctrl-C, kill, a crash) continues from the last saved
round and ends with the same model and metrics as an uninterrupted run. Only flags that do not
change what is trained (--total_rounds, the eval/checkpoint/log periods, --verbose, ...) may
differ; for anything else, pass a new --experiment_name. The check compares effective values, so
passing a task's own value explicitly resumes a run that left the flag unset, and vice versa.

Bad input (an unknown name, a count out of range, an output directory that cannot be written, a
missing data file, a checkpoint of another model) ends with exit status 2 and one line on stderr
naming the flag or file and the fix, before anything is written.
"""

from __future__ import annotations

import contextlib
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

from experiments import aggregator_flags  # noqa: E402
from experiments import train_flags as cfg  # noqa: E402
from mfl_tff.algorithms import builders  # noqa: E402
from mfl_tff.data import example_sources, registry  # noqa: E402
from mfl_tff.data import settings as settings_lib  # noqa: E402
from mfl_tff.data.settings import TaskSettings  # noqa: E402
from mfl_tff.data.task import FederatedTask  # noqa: E402
from mfl_tff.training import multi_worker, outputs, privacy, program, rounds, runtime  # noqa: E402

# --helpshort lists the flags of train_flags as this binary's own.
flags.adopt_module_key_flags(cfg)

EXIT_BAD_INPUT = 2
# The worker died or stopped answering mid-run (checkpoints are intact; rerunning resumes).
EXIT_WORKER_LOST = 3
# 128 + SIGINT, what a shell reports for a job stopped by Ctrl-C.
EXIT_INTERRUPTED = 130


def _hparams(settings: TaskSettings) -> dict[str, Any]:
    """This binary's flags in definition order, hyperparameters as used (for hparams.csv).

    Unset hyperparameter flags are recorded with the task's values, and an unset --meta_model
    with the algorithm's default, so the resume check compares what is trained, not how it was
    spelled on the command line. Ranges are spelled as on the command line (LO:HI), and
    --label_noise as used: 0 when unset on a task that takes it.
    """
    effective = settings.as_dict()
    effective["meta_model"] = cfg.meta_model()
    noise = cfg.label_noise()
    if noise is None and "label_noise" in registry.task_options(cfg.TASK.value):
        noise = 0.0
    effective["label_noise"] = None if noise is None else settings_lib.format_range(noise)
    if isinstance(settings.shots, tuple):
        effective["shots"] = settings_lib.format_range(settings.shots)
    return {
        f.name: effective.get(f.name, f.value) for f in flags.FLAGS.get_key_flags_for_module(cfg)
    }


def _privacy_accountant(
    num_train: int, settings: TaskSettings
) -> Optional[privacy.PrivacyAccountant]:
    """The run's privacy accountant with --aggregator=dp (None otherwise)."""
    if cfg.AGGREGATOR.value != "dp":
        return None
    try:
        return privacy.PrivacyAccountant.for_training(
            noise_multiplier=cfg.NOISE_MULTIPLIER.value,
            clients_per_round=settings.clients_per_round,
            num_train_clients=num_train,
            delta=cfg.DP_DELTA.value,
        )
    except ValueError as e:
        raise cfg.UsageError(f"--aggregator=dp: {e}") from None


def _connect_remote_worker() -> None:
    """With --execution=remote, fails before anything is written if a worker does not answer."""
    targets = cfg.workers()
    for target in targets:
        try:
            runtime.wait_for_worker(target, cfg.WORKER_TIMEOUT.value)
        except ConnectionError:
            port = target.rpartition(":")[2]
            at = f" at {target}" if len(targets) > 1 else ""
            raise cfg.UsageError(
                f"--worker={cfg.WORKER.value}: no TFF worker answered{at} within "
                f"{cfg.WORKER_TIMEOUT.value:g} s; start one on that host (worker_binary "
                f"--port={port}, see the README's 'Running on a remote worker') or fix --worker."
            ) from None


def _check_several_workers(process: program.LearningProcess, spec) -> None:
    """With several --worker targets, refuses an algorithm whose round TFF cannot split."""
    if len(cfg.workers()) < 2:
        return
    try:
        rounds.check_splittable(process, spec)
    except multi_worker.NotMergeableError:
        raise cfg.UsageError(
            f"--algorithm={cfg.ALGORITHM.value}: a phase of its round aggregates twice, the "
            "second time on the result of the first, which cannot run on several workers; pass "
            "one --worker."
        ) from None


@contextlib.contextmanager
def _execution(paths: outputs.OutputPaths) -> Iterator[None]:
    """TFF's execution context for the run: a worker started here, or the one(s) at --worker."""
    secure = aggregator_flags.simulate_secure_sums()
    if cfg.EXECUTION.value == "remote":
        targets = cfg.workers()
        # One worker keeps the single-worker path; several share each round's clients.
        with runtime.remote_execution(
            targets[0] if len(targets) == 1 else targets,
            timeout_s=cfg.WORKER_TIMEOUT.value,
            simulate_secure_sums=secure,
        ):
            if len(targets) == 1:
                print(f"TFF worker at {targets[0]} (remote)", flush=True)
            else:
                print(
                    f"TFF workers at {', '.join(targets)} (remote; each round's clients are "
                    "shared between them)",
                    flush=True,
                )
            if secure:
                print(aggregator_flags.SECURE_SUMS_NOTE, flush=True)
            yield
        return
    with runtime.local_execution(log_path=paths.worker_log, simulate_secure_sums=secure) as worker:
        print(f"TFF worker_binary pid {worker.pid}, log {paths.worker_log}", flush=True)
        if secure:
            print(aggregator_flags.SECURE_SUMS_NOTE, flush=True)
        yield


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
    cfg.check_flags()
    _set_log_levels(cfg.VERBOSE.value)
    cfg.require(
        cfg.TASK.value in registry.task_names(),
        f"--task={cfg.TASK.value!r} is unknown; choose one of: {', '.join(registry.task_names())}.",
    )
    cfg.require(
        cfg.ALGORITHM.value in builders.ALGORITHMS,
        f"--algorithm={cfg.ALGORITHM.value!r} is unknown; choose one of: "
        f"{', '.join(builders.ALGORITHMS)}.",
    )
    cfg.check_choices()
    cfg.check_aggregator_flags()
    paths = outputs.OutputPaths(cfg.ROOT_OUTPUT_DIR.value, cfg.experiment_name())
    try:
        outputs.check_output_dirs(paths)
    except outputs.OutputDirError as e:
        raise cfg.UsageError(f"--root_output_dir={cfg.ROOT_OUTPUT_DIR.value}: {e}") from None
    task = _build_task()
    settings = cfg.effective_settings(task)
    num_train = len(task.train_data.client_ids)
    source = "" if cfg.CLIENTS_PER_ROUND.value is not None else " (the task's setting)"
    cfg.require(
        settings.clients_per_round <= num_train,
        f"--clients_per_round={settings.clients_per_round}{source} exceeds the {num_train} "
        f"training clients of --task={cfg.TASK.value}; lower --clients_per_round or raise "
        "--num_train_clients.",
    )
    hparams = _hparams(settings)
    try:
        differences = outputs.hparams_differences(
            paths.hparams_csv, hparams, cfg.MAY_DIFFER_ON_RESUME - {"data_on_workers"}
        )
    except outputs.ProgramError as e:
        raise cfg.UsageError(str(e)) from None
    # Switching --data_on_workers keeps the clients where the workers gather or read the same
    # examples; where they generate them, the clients are other draws.
    differences = [d for d in differences if d[0] != "data_on_workers" or _generated(task)]
    # Before tasks carried settings, an unset --shots was recorded empty, meaning the task's
    # default then, which its setting is now: such a run resumes with the same command.
    explicit = cfg.explicit_settings()
    differences = [
        (name, saved, current)
        for name, saved, current in differences
        if not (saved == "" and name in settings_lib.names() and name not in explicit)
    ]
    if differences:
        name, saved, current = differences[0]
        source = ""
        if name in settings_lib.names() and name not in explicit:
            source = " (the task's setting; the flag is unset)"
        elif name == "meta_model" and cfg.META_MODEL.value is None:
            source = " (the algorithm's default; the flag is unset)"
        raise cfg.UsageError(
            f"--{name}={current}{source} differs from {name}={saved} in {paths.hparams_csv}, the "
            f"experiment this command would resume; rerun with --{name}={saved}, or pass a new "
            "--experiment_name."
        )
    accountant = _privacy_accountant(num_train, settings)
    # Built before the checkpoint is read (reading checks it against the process), so the
    # rounds left come from the checkpoints' names.
    saved = program.checkpoint_rounds(paths.checkpoint_dir)
    vectorize = cfg.VECTORIZE_COHORTS.value
    if vectorize is None:
        vectorize = program.default_vectorize_cohorts(
            cfg.TOTAL_ROUNDS.value - (saved[-1] if saved else 0)
        )
    process, spec = _build_algorithm(task, settings, vectorize_cohorts=vectorize)
    _check_several_workers(process, spec)
    try:
        start_round, state = program.load_checkpoint(paths.checkpoint_dir, process)
    except program.CheckpointError as e:
        written_with = (
            f"the flags in {paths.hparams_csv}"
            if os.path.exists(paths.hparams_csv)
            else "the flags that wrote it"
        )
        raise cfg.UsageError(
            f"{e}; rerun with {written_with}, or pass a new --experiment_name."
        ) from None
    _connect_remote_worker()

    # Everything is checked: from here on, files are written.
    held_out = len(task.eval_data.client_ids)
    config = program.ProgramConfig(
        total_rounds=cfg.TOTAL_ROUNDS.value,
        clients_per_round=settings.clients_per_round,
        fine_tune_lr=settings.inner_lr,
        eval_adaptation_steps=settings.adaptation_steps,
        rounds_per_eval=cfg.ROUNDS_PER_EVAL.value,
        rounds_per_checkpoint=cfg.ROUNDS_PER_CHECKPOINT.value,
        checkpoints_to_keep=cfg.CHECKPOINTS_TO_KEEP.value,
        rounds_per_log=cfg.ROUNDS_PER_LOG.value,
        rounds_per_call=cfg.ROUNDS_PER_CALL.value
        or program.default_rounds_per_call(
            cfg.TOTAL_ROUNDS.value - start_round,
            workers=max(1, len(cfg.workers())),
            boundaries=(cfg.ROUNDS_PER_CHECKPOINT.value, cfg.ROUNDS_PER_EVAL.value),
        ),
        num_eval_clients=min(held_out, cfg.NUM_EVAL_CLIENTS.value or cfg.DEFAULT_EVAL_CLIENTS),
        fuse_rounds=(
            cfg.FUSE_ROUNDS.value
            if cfg.FUSE_ROUNDS.value is not None
            else program.default_fuse_rounds(
                cfg.TOTAL_ROUNDS.value - start_round, workers=max(1, len(cfg.workers()))
            )
        ),
    )
    outputs.write_hparams(paths.hparams_csv, hparams)
    print(
        f"{cfg.ALGORITHM.value} on {task.name}: {cfg.TOTAL_ROUNDS.value} rounds x "
        f"{settings.clients_per_round} of {num_train} clients, {config.num_eval_clients} held-out "
        f"clients evaluated; output {paths.results_dir}",
        flush=True,
    )
    print(cfg.describe_settings(task, settings), flush=True)
    if cfg.ALGORITHM.value in builders.LEARNS_ALPHA:
        print(cfg.describe_meta_model(), flush=True)
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
    except outputs.ProgramError as e:
        # A file of the experiment turned out unusable mid-run (e.g. a foreign metrics CSV).
        raise cfg.UsageError(str(e)) from None
    except multi_worker.NotMergeableError as e:
        # Checked before training for the round; reaching here means another computation.
        raise cfg.UsageError(f"--worker={cfg.WORKER.value}: {_one_line(str(e))}") from None
    except (ConnectionError, runtime.WorkerExitedError) as e:
        # A worker died or the network dropped mid-run: the saved rounds are intact. With several
        # workers the whole round fails (no partial aggregate), as TFF retries a slice only on
        # its own worker.
        print(
            f"The TFF worker was lost ({_one_line(str(e))}); once it runs again, rerun the same "
            f"command to resume from {_resume_point(paths)}.",
            file=sys.stderr,
            flush=True,
        )
        sys.exit(EXIT_WORKER_LOST)
    except Exception as e:  # noqa: BLE001  (re-raised unless a worker lacks the task's data)
        problem = example_sources.worker_data_problem(e)
        if problem is None:
            raise
        raise cfg.UsageError(
            f"--data_on_workers: {problem} Rounds saved so far are kept: rerun the same command "
            f"once fixed to resume from {_resume_point(paths)}."
        ) from None
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


def _build_task(data_on_workers: Optional[bool] = None) -> FederatedTask:
    """The task from the data flags (`data_on_workers` overrides its flag); task errors become
    one-line usage errors."""
    shots = cfg.shots()
    options = {
        "seed": cfg.SEED.value,
        "num_train_clients": cfg.NUM_TRAIN_CLIENTS.value,
        "num_eval_clients": cfg.NUM_EVAL_CLIENTS.value,
        "shots": shots,
        "label_noise": cfg.label_noise(),
        "dirichlet_concentration": cfg.DIRICHLET.value,
        "model": cfg.MODEL.value,
        "data_cache_dir": cfg.DATA_CACHE_DIR.value,
        "worker_data_cache_dir": cfg.WORKER_DATA_CACHE_DIR.value,
        "data_on_workers": (
            cfg.DATA_ON_WORKERS.value if data_on_workers is None else data_on_workers
        )
        or None,
    }
    # Unset flags leave the task's own defaults in place.
    options = {k: v for k, v in options.items() if v is not None}
    accepted = set(registry.task_options(cfg.TASK.value))
    # Noise changes the data a run learns from: dropping it silently would train on clean data.
    if "label_noise" in options and "label_noise" not in accepted:
        takers = [n for n in registry.task_names() if "label_noise" in registry.task_options(n)]
        raise cfg.UsageError(
            f"--label_noise does not apply to --task={cfg.TASK.value} (only to "
            f"{', '.join(takers)}); drop --label_noise."
        )
    # Ignored, it would silently send every client's features again: refused, as label noise is.
    if "data_on_workers" in options and "data_on_workers" not in accepted:
        takers = [n for n in registry.task_names() if "data_on_workers" in registry.task_options(n)]
        raise cfg.UsageError(
            f"--data_on_workers does not apply to --task={cfg.TASK.value}, whose builder has no "
            f"data_on_workers option (only to {', '.join(takers)}); drop --data_on_workers."
        )
    for name in sorted(set(options) - accepted):
        if flags.FLAGS[name].present:
            print(f"note: --{name} does not apply to --task={cfg.TASK.value}; ignored.", flush=True)
    try:
        return registry.get_task(cfg.TASK.value, ignore_unknown_options=True, **options)
    except FileNotFoundError as e:
        raise cfg.UsageError(f"--data_cache_dir: {e}") from None
    except ValueError as e:
        raise cfg.UsageError(f"--task={cfg.TASK.value}: {e}") from None
    except TypeError:
        if not isinstance(shots, tuple):
            raise
        raise cfg.UsageError(
            f"--shots={cfg.SHOTS.value}: --task={cfg.TASK.value} takes one count of shots, not a "
            "range; pass --shots=N."
        ) from None


def _build_algorithm(
    task: FederatedTask, settings: TaskSettings, *, vectorize_cohorts: bool
) -> tuple[program.LearningProcess, builders.AlgorithmSpec]:
    """The process and spec from the effective settings and the other algorithm flags.

    Option errors become usage errors.
    """
    clients = settings.clients_per_round
    aggregators = aggregator_flags.build(
        learns_alpha=cfg.ALGORITHM.value in builders.LEARNS_ALPHA, clients_per_round=clients
    )
    # A cohort larger than a round only adds empty padding clients, and several workers share
    # cohorts, so each gets at most its share of the round. Per-client aggregators (dp, robust,
    # compressed, secure) must see clients, not cohorts.
    cohort_size = aggregator_flags.cohort_size(
        aggregators, cfg.COHORT_SIZE.value, clients, len(cfg.workers())
    )
    options = builders.AlgorithmOptions.from_settings(
        settings,
        server_optimizer=cfg.SERVER_OPTIMIZER.value or None,
        server_lr=cfg.SERVER_LR.value,
        adaptive_update=cfg.ADAPTIVE_UPDATE.value,
        adaptive_data=cfg.ADAPTIVE_DATA.value,
        first_order=cfg.FIRST_ORDER.value,
        **cfg.algorithm_flags(),
        model_aggregator=aggregators.model,
        meta_aggregator=aggregators.meta,
        cohort_size=cohort_size,
        vectorize_cohorts=vectorize_cohorts,
    )
    try:
        return builders.build_algorithm(cfg.ALGORITHM.value, task, options)
    except ValueError as e:
        raise cfg.UsageError(f"--algorithm={cfg.ALGORITHM.value}: {e}") from None


def _generated(task: FederatedTask) -> bool:
    """Whether --data_on_workers has the task's workers generate its examples (other draws)."""
    if not task.data_on_workers:
        try:
            task = _build_task(data_on_workers=True)
        except cfg.UsageError:
            return False
    return isinstance(task.example_source, example_sources.GeneratedSource)


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
    except cfg.UsageError as e:
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
