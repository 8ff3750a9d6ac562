"""The training program: the round loop, checkpoints, metrics release and resume.

Files (paths in `mfl_tff.training.outputs.OutputPaths`):

* `ROOT/results/E/experiment.metrics.csv`: key `round_num`, one column per flattened metric, plus
  held-out personalization columns on evaluation rounds, `clients/{sampled,dropped,empty,
  rejected,zeroed}` (`client_counts`; a round that drops clients also logs a `note:` line saying
  why), `communication/...` (bytes per client per round by stream, the round's and the run's
  cumulative bytes: `mfl_tff.algorithms.communication`) and, with a privacy accountant,
  `privacy/{epsilon,delta}`. Written by
  `mfl_tff.training.metrics_release.MetricsReleaseManager`, which appends rows.
* `ROOT/logdir/E/`: the same values as TensorBoard summaries (the same manager).
* `ROOT/checkpoints/E/program_state_R`: `(round_num, state)` after round R, one `.npz` file
  (`mfl_tff.training.state_manager.ArrayProgramStateManager`).
* `ROOT/results/E/personalization.json`: the final held-out evaluation
  (`mfl_tff.training.personalize.evaluate`), with a `communication` entry (bytes per client per
  round, cumulative bytes).

Cost per round. Metrics rows are buffered and written every `rounds_per_log` rounds (and on
evaluation, checkpoint and last rounds) by appending, so writing does not grow with the rows
already written; checkpoints are arrays written with `numpy.savez` (milliseconds, where a
SavedModel took a third of a second). No event loop is set up per round: the loop calls the
managers' synchronous methods.

Resume: the clients of round R are a function of (seed, R) (`mfl_tff.training.rounds`) and packing
is a function of (seed, client), so `(R, state)` is all a rerun needs to continue exactly where an
interrupted run stopped. A checkpoint round writes (and fsyncs) its metrics rows before the
checkpoint, so a checkpoint is never ahead of the rows it covers; rows after the restored round
(written after its checkpoint) are dropped once, when the resumed run starts, so rounds trained
again replace their rows instead of duplicating them. Checkpoints are written to a temporary name
and renamed, and rows are appended in one write (a torn last line is dropped at start-up), so a
kill at any moment leaves files a rerun continues from.

The library reads no flags. `experiments/train.py` validates them, runs the checks that write
nothing (`outputs.check_output_dirs`, `outputs.hparams_differences`, `load_checkpoint`), and only
then writes (`outputs.write_hparams`, `run_training` inside
`mfl_tff.training.runtime.local_execution`).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Optional

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from mfl_tff.algorithms import builders, communication
from mfl_tff.data.task import FederatedTask
from mfl_tff.training import (
    fused_rounds,
    metrics_release,
    outputs,
    personalize,
    rounds,
    state_manager,
)
from mfl_tff.training import privacy as privacy_lib
from mfl_tff.training.progress import Progress, client_counts, evaluation_line, flat_metrics

LearningProcess = tff.learning.templates.LearningProcess

ROUND_KEY = "round_num"
CHECKPOINT_PREFIX = "program_state_"
# The personalization statistics released with the metrics of evaluation rounds.
_EVAL_STATISTICS = ("mean", "p10", "median", "p90")
# A training loss this many times its first value means the run diverges.


class CheckpointError(outputs.ProgramError):
    """The latest checkpoint cannot be read as this process's state.

    Attributes:
      path: The checkpoint file.
      reason: What does not match, in a few words.
    """

    def __init__(self, path: str, reason: str):
        super().__init__(f"checkpoint {path} cannot be resumed by this run: {reason}")
        self.path = path
        self.reason = reason


@dataclasses.dataclass(frozen=True)
class ProgramConfig:
    """How the program runs (what is trained is the process, the task and their options).

    Attributes:
      total_rounds: Rounds to train in total (a resumed run trains the rest).
      clients_per_round: Training clients sampled each round.
      fine_tune_lr: Rate of held-out fine-tuning (the own rule of algorithms without learned
        rates, and the shared baseline).
      eval_adaptation_steps: Adaptation steps on held-out clients; "after adaptation" is read
        there (learned rates are read at their trained step count if that is smaller).
      rounds_per_eval: Evaluate held-out clients every this many rounds (0: only at the end; the
        last round is always evaluated).
      rounds_per_checkpoint: Save the program state every this many rounds (and the last one).
      checkpoints_to_keep: Most recent checkpoints kept (0: all).
      rounds_per_log: Print a progress line and write the buffered metrics rows every this many
        rounds (and on evaluation, checkpoint and last rounds).
      num_eval_clients: Held-out clients evaluated, the task's first ones (None: all of them).
      rounds_per_call: Rounds run by one TFF call (`mfl_tff.training.rounds.MultiRound`); a
        call always ends on evaluation and checkpoint rounds.
      fuse_rounds: Run each round compiled to TFF's MapReduceForm
        (`mfl_tff.training.fused_rounds`): the same results in fewer steps of TFF's executor,
        for one more compilation before the first round (`default_fuse_rounds`). Ignored when
        several workers share the round's clients.
    """

    total_rounds: int
    clients_per_round: int
    fine_tune_lr: float
    eval_adaptation_steps: int
    rounds_per_eval: int = 0
    rounds_per_checkpoint: int = 10
    checkpoints_to_keep: int = 3
    rounds_per_log: int = 1
    num_eval_clients: Optional[int] = None
    rounds_per_call: int = 1
    fuse_rounds: bool = False

    def __post_init__(self):
        for name in (
            "total_rounds",
            "clients_per_round",
            "eval_adaptation_steps",
            "rounds_per_checkpoint",
            "rounds_per_log",
            "rounds_per_call",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
        for name in ("rounds_per_eval", "checkpoints_to_keep"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}.")
        if self.num_eval_clients is not None and self.num_eval_clients < 1:
            raise ValueError(f"num_eval_clients must be >= 1, got {self.num_eval_clients}.")


def _state_manager(
    checkpoint_dir: str, keep_total: int = 0
) -> state_manager.ArrayProgramStateManager:
    return state_manager.ArrayProgramStateManager(
        checkpoint_dir, prefix=CHECKPOINT_PREFIX, keep_total=keep_total
    )


def checkpoint_rounds(checkpoint_dir: str) -> list[int]:
    """Rounds with a saved program state in `checkpoint_dir`, ascending (none: empty)."""
    return _state_manager(checkpoint_dir).versions()


def load_checkpoint(checkpoint_dir: str, process: LearningProcess) -> tuple[int, Optional[Any]]:
    """The latest `(round_num, state)` in `checkpoint_dir`, checked against `process`.

    Reads only: needs no execution context and writes nothing (a missing directory is not
    created). The state's structure, shapes and dtypes must be those of
    `process.initialize`'s result type, so a checkpoint of another model or algorithm fails here
    instead of deep inside a computation.

    Returns:
      `(0, None)` if there is no checkpoint.

    Raises:
      CheckpointError: If the latest checkpoint cannot be read or does not fit `process`.
    """
    manager = _state_manager(checkpoint_dir)
    rounds_saved = manager.versions()
    if not rounds_saved:
        return 0, None
    latest = rounds_saved[-1]
    path = manager.path(latest)
    expected = tff.types.type_to_tf_tensor_specs(process.initialize.type_signature.result.member)
    try:
        round_num, state = manager.read(latest, (0, expected))
    except state_manager.StructureMismatchError as e:
        raise CheckpointError(path, f"it cannot be read as this state ({e.reason})") from None
    except state_manager.StateFileError as e:
        raise CheckpointError(path, e.reason) from None
    except Exception as e:  # Any other failure to read the file is the checkpoint's too.
        text = " ".join(str(e).split()) or type(e).__name__
        raise CheckpointError(path, f"it cannot be read as this state ({text[:200]})") from None
    for spec, value in zip(tf.nest.flatten(expected), tf.nest.flatten(state)):
        value = np.asarray(value)
        # String tensors (the DP aggregator's state names its DpEvent class) load as bytes.
        dtype_ok = (
            value.dtype.kind in "SUO"
            if spec.dtype == tf.string
            else value.dtype == spec.dtype.as_numpy_dtype
        )
        if tuple(value.shape) != tuple(spec.shape) or not dtype_ok:
            raise CheckpointError(
                path,
                f"it holds a {value.dtype.name}{list(value.shape)} tensor where this model has "
                f"{spec.dtype.name}{spec.shape.as_list()}",
            )
    if int(round_num) != latest:
        raise CheckpointError(path, f"it says round {int(round_num)}, its name round {latest}")
    return latest, state


# ---------------------------------------------------------------------------------------------
# The run.
# ---------------------------------------------------------------------------------------------


def _evaluation_summary(report: Mapping[str, Any]) -> collections.OrderedDict:
    """The personalization statistics released as metrics on evaluation rounds."""

    def stats(distribution):
        return collections.OrderedDict((k, distribution[k]) for k in _EVAL_STATISTICS)

    return collections.OrderedDict(
        before_adaptation=stats(report["before_adaptation"]),
        after_adaptation=stats(report["after_adaptation"]),
        fine_tune_after_adaptation=stats(report["fine_tune"]["after_adaptation"]),
    )


# Several rounds per call save about a third of a small round (sinusoid meta_sgd: 35 -> 18-26 ms,
# idle, README "Performance") but compile a computation R times larger first (tens of seconds):
# worth it from a few thousand rounds on.
LONG_RUN_ROUNDS = 5_000
LONG_RUN_ROUNDS_PER_CALL = 10


# Fusing a round (`mfl_tff.training.fused_rounds`) costs 1-4 s of compilation before the first
# round and saves 10-25% of every round after it on one worker (sinusoid meta_sgd, one round per
# call: 41 against 47 ms; ten per call: 19-20 against 24-27 ms): worth it from a few hundred
# rounds on.
FUSE_MIN_ROUNDS = 500


def default_fuse_rounds(rounds_to_train: int, workers: int = 1) -> bool:
    """Whether a run that does not choose fuses its rounds: from `FUSE_MIN_ROUNDS` rounds left
    to train on one worker."""
    return workers == 1 and rounds_to_train >= FUSE_MIN_ROUNDS


# Vectorizing a cohort's clients (`mfl_tff.algorithms.cohorts`) makes rounds faster and the start
# slower, by amounts that depend on the model. Measured in pairs, fused, one cohort: sinusoid
# meta_sgd (ten rounds per call) 13.2 against 41.0 ms a round at no cost to the build;
# digits_fewshot mfl (ten per call) 62.9 against 103.5 ms a round for 27.7 s more before the first
# round (build and first call), worth it after about 700 rounds; digits mfl (one per call) 60.3
# against 70.9 ms for 15.2 s more, after about 1,400.
VECTORIZE_MIN_ROUNDS = 500


def default_vectorize_cohorts(rounds_to_train: int) -> bool:
    """Whether a run that does not choose vectorizes its cohorts: from `VECTORIZE_MIN_ROUNDS`
    rounds left to train (on any number of workers: each runs whole cohorts)."""
    return rounds_to_train >= VECTORIZE_MIN_ROUNDS


def default_rounds_per_call(
    rounds_to_train: int, workers: int = 1, *, boundaries: Sequence[int] = ()
) -> int:
    """The rounds per TFF call of a run that does not choose.

    A run of at least `LONG_RUN_ROUNDS` rounds left on one worker gets the largest R up to
    `LONG_RUN_ROUNDS_PER_CALL` that divides every nonzero interval of `boundaries` (the
    checkpoint and evaluation intervals, where a call must end), so that calls are not cut
    short; anything else gets 1 (several workers cannot chain rounds in one call).
    """
    if workers != 1 or rounds_to_train < LONG_RUN_ROUNDS:
        return 1
    for per_call in range(LONG_RUN_ROUNDS_PER_CALL, 1, -1):
        if all(interval % per_call == 0 for interval in boundaries if interval):
            return per_call
    return 1


def evaluate(
    process: LearningProcess,
    state: Any,
    spec: builders.AlgorithmSpec,
    task: FederatedTask,
    config: ProgramConfig,
    rounds: int,
) -> dict:
    """Held-out personalization of `state` (`mfl_tff.training.personalize.evaluate`).

    Algorithms without learned rates adapt by fine-tuning, read after
    `config.eval_adaptation_steps`; learned rates are read at their trained step count.
    """
    if not spec.learns_alpha:
        spec = dataclasses.replace(spec, eval_steps=config.eval_adaptation_steps)
    return personalize.evaluate(
        process,
        state,
        spec,
        task,
        fine_tune_lr=config.fine_tune_lr,
        max_steps=config.eval_adaptation_steps,
        rounds=rounds,
        num_clients=config.num_eval_clients,
        fine_tune_steps=config.eval_adaptation_steps,
    )


def run_training(
    process: LearningProcess,
    spec: builders.AlgorithmSpec,
    task: FederatedTask,
    config: ProgramConfig,
    paths: outputs.OutputPaths,
    *,
    start_round: int = 0,
    state: Optional[Any] = None,
    log: Callable[[str], None] = print,
    accountant: Optional[privacy_lib.PrivacyAccountant] = None,
) -> dict:
    """Trains from `(start_round, state)` to `config.total_rounds`, then evaluates held-out clients.

    Must run inside a TFF execution context (`mfl_tff.training.runtime.local_execution`). Each
    round: `mfl_tff.training.rounds.run_round` (clients of (seed, round), `process.next`),
    release the metrics (CSV and TensorBoard, with the personalization statistics on evaluation
    rounds; rows are written every `config.rounds_per_log` rounds and on evaluation and
    checkpoint rounds), save the checkpoint on checkpoint rounds, print progress. A training
    loss that turns non-finite or grows `DIVERGENCE_FACTOR` times its first value logs one
    warning line; training goes on. The final evaluation is written to
    `paths.personalization_json`.

    Args:
      process: The `LearningProcess`.
      spec: Its `AlgorithmSpec`.
      task: The `FederatedTask`.
      config: Rounds, evaluation and checkpoint settings.
      paths: Output files.
      start_round: Round `state` was saved after (0: start from `process.initialize()`).
      state: The state to resume from (`load_checkpoint`), or None.
      log: Receives the progress lines.
      accountant: With differentially private aggregation, its privacy accountant: each round
        releases `privacy/epsilon` and `privacy/delta` so far, and the report gets a `privacy`
        entry (`PrivacyAccountant.report`).

    Returns:
      The final personalization report (the `personalization.json` document).
    """
    if state is None:
        start_round, state = 0, process.initialize()
    for directory in paths.directories():
        os.makedirs(directory, exist_ok=True)
    # Rows after `start_round` were written after its checkpoint: those rounds are trained again.
    metrics = metrics_release.MetricsReleaseManager(
        paths.metrics_csv, paths.logdir, key_fieldname=ROUND_KEY, keep_keys_up_to=start_round
    )
    checkpoints = _state_manager(paths.checkpoint_dir, config.checkpoints_to_keep)
    cost = communication.measure(process, spec.stream_aggregators)
    total = config.total_rounds
    report = None
    progress = Progress(config, start_round, log)

    def is_eval(round_num: int) -> bool:
        return round_num == total or bool(
            config.rounds_per_eval and round_num % config.rounds_per_eval == 0
        )

    def is_checkpoint(round_num: int) -> bool:
        return round_num == total or round_num % config.rounds_per_checkpoint == 0

    last_report: list = [None]

    def after_round(result: rounds.RoundResult) -> None:
        round_num = result.round_num
        flat = flat_metrics(result.metrics)
        released = collections.OrderedDict(result.metrics)
        counts = client_counts(flat, len(result.client_ids))
        released["clients"] = counts
        released["communication"] = cost.round_metrics(
            clients=len(result.client_ids), round_num=round_num
        )
        epsilon = None
        if accountant is not None:
            epsilon = accountant.epsilon(round_num)
            released["privacy"] = collections.OrderedDict(epsilon=epsilon, delta=accountant.delta)
        report = None
        if is_eval(round_num):
            report = evaluate(process, result.state, spec, task, config, round_num)
            released["personalization"] = _evaluation_summary(report)
        last_report[0] = report
        metrics.release_sync(released, round_num)
        checkpoint = is_checkpoint(round_num)
        if checkpoint or report is not None or round_num % config.rounds_per_log == 0:
            # Rows before the checkpoint that covers them, durably: a checkpoint ahead of its
            # rows would resume with rows missing.
            metrics.flush(durable=checkpoint)
        if checkpoint:
            checkpoints.write((round_num, result.state), round_num)
        progress.round_done(round_num, flat, counts, epsilon, report)

    fused = None
    if config.fuse_rounds and not rounds.splits_clients() and start_round < total:
        fused = fused_rounds.fuse(process, spec.phase_computations)
    multi_round = None
    if config.rounds_per_call > 1 and total - start_round >= config.rounds_per_call:
        multi_round = rounds.MultiRound(process, config.rounds_per_call, fused=fused)
    try:
        state = rounds.run_rounds(
            process,
            spec,
            task,
            clients_per_round=config.clients_per_round,
            rounds=range(start_round + 1, total + 1),
            state=state,
            after_round=after_round,
            multi_round=multi_round,
            # Evaluations and checkpoints need the state: a multi-round call ends there.
            state_needed=lambda r: is_eval(r) or is_checkpoint(r),
            fused=fused,
        )
        report = last_report[0]
    except BaseException:
        # The rows trained so far still reach the file (a resume drops those past the last
        # checkpoint), but a failing write must not hide the error that ended the run.
        with contextlib.suppress(Exception):
            metrics.close()
        raise
    metrics.close()
    if report is None:
        # Nothing left to train (the checkpoint is at or past `total_rounds`): evaluate it.
        report = evaluate(process, state, spec, task, config, start_round)
        log(f"round {start_round}: already trained; {evaluation_line(report)}")
    report["communication"] = cost.report(clients=config.clients_per_round, rounds=report["rounds"])
    if accountant is not None:
        report["privacy"] = accountant.report(report["rounds"])
    outputs.write_json(paths.personalization_json, report)
    return report
