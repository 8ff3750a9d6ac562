"""The training program: the round loop, checkpoints, metrics release and resume.

Files (paths in `mfl_tff.training.outputs.OutputPaths`, DESIGN.md "Contracts"):

* `ROOT/results/E/experiment.metrics.csv`: `tff.program.CSVFileReleaseManager`, key `round_num`,
  one column per flattened metric, plus held-out personalization columns on evaluation rounds,
  `clients/{sampled,dropped,empty,rejected,zeroed}` (`client_counts`; a round that drops clients
  also logs a `note:` line saying why) and, with a privacy accountant, `privacy/{epsilon,delta}`.
* `ROOT/logdir/E/`: the same values through `tff.program.TensorBoardReleaseManager`.
* `ROOT/checkpoints/E/program_state_R`: `(round_num, state)` after round R, through
  `tff.program.FileProgramStateManager`.
* `ROOT/results/E/personalization.json`: the final held-out evaluation
  (`mfl_tff.training.personalize.evaluate`).

Resume: the clients of round R are a function of (seed, R) (`FederatedTask.sample_train_ids`) and
packing is a function of (seed, client), so `(R, state)` is all a rerun needs to continue exactly
where an interrupted run stopped. A round's metrics are released before its checkpoint is saved,
and the CSV manager drops the rows at and after a released key, so a round trained again after a
crash replaces its row instead of duplicating it. The CSV and the checkpoints are written to a
temporary name and renamed, so a kill at any moment leaves the last complete versions.

The library reads no flags. `experiments/train.py` validates them, runs the checks that write
nothing (`outputs.check_output_dirs`, `outputs.hparams_differences`, `load_checkpoint`), and only
then writes (`outputs.write_hparams`, `run_training` inside
`mfl_tff.training.runtime.local_execution`).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import os
import time
from collections.abc import Callable, Coroutine, Mapping
from typing import Any, Optional, TypeVar

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from mfl_tff.algorithms import builders
from mfl_tff.data.task import FederatedTask
from mfl_tff.training import outputs, personalize
from mfl_tff.training import privacy as privacy_lib

LearningProcess = tff.learning.templates.LearningProcess
T = TypeVar("T")

ROUND_KEY = "round_num"
CHECKPOINT_PREFIX = "program_state_"
# The personalization statistics released with the metrics of evaluation rounds.
_EVAL_STATISTICS = ("mean", "p10", "median", "p90")


class CheckpointError(outputs.ProgramError):
    """The latest checkpoint cannot be read as this process's state.

    Attributes:
      path: The checkpoint directory.
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
      rounds_per_log: Print a progress line every this many rounds (and on evaluation rounds).
      num_eval_clients: Held-out clients evaluated, the task's first ones (None: all of them).
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

    def __post_init__(self):
        for name in (
            "total_rounds",
            "clients_per_round",
            "eval_adaptation_steps",
            "rounds_per_checkpoint",
            "rounds_per_log",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
        for name in ("rounds_per_eval", "checkpoints_to_keep"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}.")
        if self.num_eval_clients is not None and self.num_eval_clients < 1:
            raise ValueError(f"num_eval_clients must be >= 1, got {self.num_eval_clients}.")


def _run(coroutine: Coroutine[Any, Any, T]) -> T:
    """Runs one of TFF's asynchronous program-manager calls to completion.

    TFF 0.87's release and program-state managers are `async`; the round loop is synchronous
    (computations run in TFF's synchronous context), so each call gets its own event loop.
    """
    return asyncio.run(coroutine)


def checkpoint_rounds(checkpoint_dir: str) -> list[int]:
    """Rounds with a saved program state in `checkpoint_dir`, ascending (none: empty)."""
    if not os.path.isdir(checkpoint_dir):
        return []
    manager = tff.program.FileProgramStateManager(checkpoint_dir, prefix=CHECKPOINT_PREFIX)
    return _run(manager.get_versions()) or []


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
    rounds = checkpoint_rounds(checkpoint_dir)
    if not rounds:
        return 0, None
    latest = rounds[-1]
    path = os.path.join(checkpoint_dir, f"{CHECKPOINT_PREFIX}{latest}")
    expected = tff.types.type_to_tf_tensor_specs(process.initialize.type_signature.result.member)
    manager = tff.program.FileProgramStateManager(checkpoint_dir, prefix=CHECKPOINT_PREFIX)
    try:
        round_num, state = _run(manager.load(latest, (0, expected)))
    except Exception as e:  # Any failure to read the saved files is the checkpoint's.
        # Another algorithm's state has another structure (the manager maps the saved values onto
        # `expected` and raises ValueError or TypeError); a damaged SavedModel fails inside
        # TensorFlow's reader with whatever that raises (OpError, IndexError, ...).
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


def flat_metrics(metrics: Any) -> collections.OrderedDict:
    """`{'a/b': value}` as the release managers name columns; empty entries (`()`) vanish."""
    return collections.OrderedDict(tff.program.structure_utils.flatten_with_name(metrics))


def _evaluation_summary(report: Mapping[str, Any]) -> collections.OrderedDict:
    """The personalization statistics released as metrics on evaluation rounds."""

    def stats(distribution):
        return collections.OrderedDict((k, distribution[k]) for k in _EVAL_STATISTICS)

    return collections.OrderedDict(
        before_adaptation=stats(report["before_adaptation"]),
        after_adaptation=stats(report["after_adaptation"]),
        fine_tune_after_adaptation=stats(report["fine_tune"]["after_adaptation"]),
    )


def client_counts(metrics: Mapping[str, Any], sampled: int) -> collections.OrderedDict:
    """How many of a round's `sampled` clients were dropped, from its flattened metrics.

    `empty`: clients without examples (not counted by the client work); `rejected`: clients whose
    update or metrics were not finite (zeroed, weight 0; the most of any client pass); `zeroed`:
    clients whose update a robust aggregator zeroed as too large (the most of any aggregator);
    `dropped`: their sum.
    """

    def most(suffix):
        values = [int(v) for k, v in metrics.items() if k.split("/")[-1] == suffix]
        return max(values, default=0)

    counted = [int(v) for k, v in metrics.items() if k.split("/")[-1] == "num_clients"]
    empty = max(0, sampled - min(counted)) if counted else 0
    rejected, zeroed = most("num_clients_rejected"), most("zeroed_count")
    return collections.OrderedDict(
        sampled=sampled,
        dropped=empty + rejected + zeroed,
        empty=empty,
        rejected=rejected,
        zeroed=zeroed,
    )


def dropped_line(round_num: int, counts: Mapping[str, int], metrics: Mapping[str, Any]) -> str:
    """A log line for a round that dropped clients ('' if it dropped none)."""
    if not counts["dropped"]:
        return ""
    line = (
        f"note: round {round_num} dropped {counts['dropped']} of {counts['sampled']} clients "
        f"({counts['empty']} without examples, {counts['rejected']} non-finite, "
        f"{counts['zeroed']} zeroed as outliers)"
    )
    skipped = [
        "model" if name.startswith("finalizer") else name.split("/")[0]
        for name, value in metrics.items()
        if name.split("/")[-1] == "update_non_finite" and int(value)
    ]
    if skipped:
        line += f"; no finite aggregate, step skipped: {', '.join(skipped)}"
    return line


def headline(metrics: Mapping[str, Any]) -> str:
    """The training loss of a round's flattened metrics, for a progress line."""
    for suffix, label in (("train_loss", "train loss"), ("post_adaptation_loss", "query loss")):
        for name, value in metrics.items():
            if name.endswith(suffix) and np.ndim(value) == 0:
                return f"{label} {float(value):.4f}"
    return ""


def evaluation_line(report: Mapping[str, Any]) -> str:
    """One-line summary of a personalization report."""
    before, after = report["before_adaptation"], report["after_adaptation"]
    return (
        f"held-out {report['metric']} {before['mean']:.4f} -> {after['mean']:.4f} after "
        f"{report.get('adaptation_steps', '?')} steps (p10 {after['p10']:.4f}; fine-tune "
        f"{report['fine_tune']['after_adaptation']['mean']:.4f}; {report['num_clients']} clients)"
    )


def format_duration(seconds: float) -> str:
    """`h:mm:ss` (or `m:ss` under an hour)."""
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


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
    round: sample clients for (seed, round), `process.next`, release the metrics (CSV and
    TensorBoard, with the personalization statistics on evaluation rounds), save the checkpoint
    on checkpoint rounds, print progress. The final evaluation is written to
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
    # WRITE mode replaces the file through a temporary one and a rename; APPEND mode appends in
    # place, and a kill in the middle of an append could leave a torn row behind.
    metrics_manager = tff.program.GroupingReleaseManager(
        [
            tff.program.CSVFileReleaseManager(
                paths.metrics_csv, save_mode=tff.program.CSVSaveMode.WRITE, key_fieldname=ROUND_KEY
            ),
            tff.program.TensorBoardReleaseManager(paths.logdir),
        ]
    )
    checkpoints = tff.program.FileProgramStateManager(
        paths.checkpoint_dir,
        prefix=CHECKPOINT_PREFIX,
        keep_total=config.checkpoints_to_keep,
        # Round 0 is never saved (the initial state is a function of the seed), so the first
        # checkpoint is an arbitrary round with no reason to outlive the others.
        keep_first=False,
    )
    total = config.total_rounds
    report = None
    started = time.monotonic()
    first_round_done = None
    for round_num in range(start_round + 1, total + 1):
        client_ids = task.sample_train_ids(config.clients_per_round, round_num)
        output = process.next(state, spec.client_values(task.train_clients(client_ids, round_num)))
        state = output.state
        released = collections.OrderedDict(output.metrics)
        counts = client_counts(flat_metrics(output.metrics), len(client_ids))
        released["clients"] = counts
        epsilon = None
        if accountant is not None:
            epsilon = accountant.epsilon(round_num)
            released["privacy"] = collections.OrderedDict(epsilon=epsilon, delta=accountant.delta)
        is_last = round_num == total
        if is_last or (config.rounds_per_eval and round_num % config.rounds_per_eval == 0):
            report = evaluate(process, state, spec, task, config, round_num)
            released["personalization"] = _evaluation_summary(report)
        else:
            report = None
        # Metrics before the checkpoint: a crash in between re-runs the round, and its release
        # then replaces the row (the CSV manager drops keys >= the released one).
        _run(metrics_manager.release(released, round_num))
        if is_last or round_num % config.rounds_per_checkpoint == 0:
            _run(checkpoints.save((round_num, state), round_num))
        dropped = dropped_line(round_num, counts, flat_metrics(output.metrics))
        if dropped:
            log(dropped)
        now = time.monotonic()
        if first_round_done is None:
            first_round_done = now
        if report is not None or is_last or round_num % config.rounds_per_log == 0:
            # The first round of a process traces every computation (seconds to a minute), so the
            # rate comes from the rounds after it.
            later = round_num - start_round - 1
            eta = (now - first_round_done) / later * (total - round_num) if later else None
            line = (
                f"round {round_num:>{len(str(total))}}/{total}  elapsed "
                f"{format_duration(now - started)}  eta "
                f"{format_duration(eta) if eta is not None else '?'}  "
                f"{headline(flat_metrics(output.metrics))}"
            )
            if epsilon is not None:
                line += f"  epsilon {epsilon:.3g}"

            if report is not None:
                line += f"  | {evaluation_line(report)}"
            log(line.rstrip())
    if report is None:
        # Nothing left to train (the checkpoint is at or past `total_rounds`): evaluate it.
        report = evaluate(process, state, spec, task, config, start_round)
        log(f"round {start_round}: already trained; {evaluation_line(report)}")
    if accountant is not None:
        report["privacy"] = accountant.report(report["rounds"])
    outputs.write_json(paths.personalization_json, report)
    return report
