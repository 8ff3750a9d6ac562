r"""Learning-quality benchmark: trains algorithms on a task, reports held-out personalization.

Each algorithm is trained with the same seed, clients per round and budget; at each checkpoint
round in --rounds it is evaluated on --num_eval_clients held-out clients (never seen in training):
before adaptation, after adaptation with its own rule (learned alpha for mfl/meta_sgd, fine-tuning
at --fine_tune_lr for the others) and with the shared fine-tuning baseline. Rows are appended to
--output (markdown) as they are measured, and to --output with a .jsonl suffix as JSON.

Hyperparameter flags left unset take the task's settings (`task.settings`: the values its
protocol uses); flags given explicitly win. Example (sinusoid's settings are MAML / Meta-SGD's:
10 shots, 1 inner step at rate 0.01, per-coordinate rates):

  python -m experiments.quality --task=sinusoid --algorithms=meta_sgd,maml,mfl \
      --rounds=500,1500 --output=experiments/results/quality_sinusoid.md
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from typing import Optional

from absl import app, flags, logging

from experiments import settings_flags
from mfl_tff.algorithms import builders
from mfl_tff.data import registry
from mfl_tff.data import settings as settings_lib
from mfl_tff.training import fused_rounds, personalize, program, rounds, runtime

_TASK = flags.DEFINE_string("task", "sinusoid", "Task name (see mfl_tff.data.task_names()).")
_ALGORITHMS = flags.DEFINE_list(
    "algorithms", ["fedavg", "maml", "meta_sgd", "mfl"], "Algorithms to train, comma-separated."
)
_ROUNDS = flags.DEFINE_list("rounds", ["100", "300"], "Checkpoint rounds to evaluate at.")
_SERVER_OPT = flags.DEFINE_string("server_optimizer", None, "Server optimizer (None: default).")
_SERVER_LR = flags.DEFINE_float("server_lr", None, "Server learning rate (None: default).")
_ADAPTIVE = flags.DEFINE_string("adaptive_update", "meta", "mfl adaptive update: meta or local.")
_FINE_TUNE_LR = flags.DEFINE_float(
    "fine_tune_lr", None, "Fine-tuning rate of the baseline (default: --inner_lr)."
)
_CURVE_STEPS = flags.DEFINE_integer("curve_steps", 10, "Length of the adaptation curve.")
_NUM_EVAL = flags.DEFINE_integer("num_eval_clients", 500, "Held-out clients to evaluate.")
_COHORT = flags.DEFINE_integer("cohort_size", 25, "Clients stacked per federated client (0: off).")
_TARGET = flags.DEFINE_float("target", None, "Metric target for 'rounds to target' (optional).")
_EVAL_EVERY = flags.DEFINE_integer(
    "eval_every", 0, "Also evaluate every N rounds on 100 clients to find rounds to target."
)
_SEED = flags.DEFINE_integer("seed", 0, "Seed of data, model init and client sampling.")
_OUTPUT = flags.DEFINE_string("output", "quality.md", "Markdown file the table is appended to.")
_TAG = flags.DEFINE_string("tag", "", "Free text recorded with every row (e.g. the setup).")

HEADER = (
    "| task | algorithm | rounds | metric | before mean | after mean | after p10 | "
    "fine-tune after mean | rounds to target | train s | setup |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|\n"
)


def _reached(metric: str, value: float, target: float) -> bool:
    return value >= target if metric == "accuracy" else value <= target


def _train_and_evaluate(
    name: str, task, settings: settings_lib.TaskSettings, checkpoints: list[int]
) -> None:
    """Trains `name` to the last checkpoint round, appending a row at each checkpoint round."""
    fine_tune_lr = _FINE_TUNE_LR.value or settings.inner_lr
    eval_steps = settings.adaptation_steps
    options = builders.AlgorithmOptions.from_settings(
        settings,
        server_optimizer=_SERVER_OPT.value,
        server_lr=_SERVER_LR.value,
        adaptive_update=_ADAPTIVE.value,
        **settings_flags.algorithm_flags(),
        cohort_size=min(_COHORT.value, settings.clients_per_round) or None,
        vectorize_cohorts=program.default_vectorize_cohorts(checkpoints[-1]),
    )
    process, spec = builders.build_algorithm(name, task, options)
    # Learned rates are read at their trained step count; fixed-rate rules adapt eval_steps.
    if not spec.learns_alpha:
        spec = dataclasses.replace(spec, eval_steps=eval_steps)
    start = time.time()
    reached = {}

    def after_round(result: rounds.RoundResult) -> None:
        round_num = result.round_num
        if round_num % 100 == 0:
            print(f"{name} round {round_num} {time.time() - start:.0f}s", flush=True)
        probe = _EVAL_EVERY.value and round_num % _EVAL_EVERY.value == 0
        if _TARGET.value is not None and "round" not in reached and probe:
            quick = personalize.evaluate(
                process,
                result.state,
                spec,
                task,
                fine_tune_lr=fine_tune_lr,
                max_steps=max(eval_steps, 1),
                rounds=round_num,
                num_clients=100,
            )
            if _reached(task.metric, quick["after_adaptation"]["mean"], _TARGET.value):
                reached["round"] = round_num
        if round_num not in checkpoints:
            return
        trained_s = time.time() - start
        report = personalize.evaluate(
            process,
            result.state,
            spec,
            task,
            fine_tune_lr=fine_tune_lr,
            max_steps=max(_CURVE_STEPS.value, eval_steps),
            rounds=round_num,
            fine_tune_steps=eval_steps,
        )
        _write_row(task, name, round_num, report, trained_s, reached.get("round"), settings)

    # Rounds whose state is read: the checkpoints, and the target probes if there is a target.
    probes = _EVAL_EVERY.value if _TARGET.value is not None else 0

    def state_needed(round_num: int) -> bool:
        return round_num in checkpoints or bool(probes and round_num % probes == 0)

    # Long runs chain rounds in one TFF call, and rounds run fused, as the training program does
    # by default.
    per_call = program.default_rounds_per_call(checkpoints[-1], boundaries=(*checkpoints, probes))
    fused = None
    if program.default_fuse_rounds(checkpoints[-1]):
        fused = fused_rounds.fuse(process, spec.phase_computations)
    rounds.run_rounds(
        process,
        spec,
        task,
        clients_per_round=settings.clients_per_round,
        rounds=range(1, checkpoints[-1] + 1),
        after_round=after_round,
        multi_round=rounds.MultiRound(process, per_call, fused=fused) if per_call > 1 else None,
        state_needed=state_needed,
        fused=fused,
    )


def _write_row(
    task,
    name: str,
    round_num: int,
    report: dict,
    trained_s: float,
    reached_at: Optional[int],
    settings: settings_lib.TaskSettings,
) -> None:
    """Appends a checkpoint round's row to --output and its full report to the .jsonl beside it.

    The row's setup is --tag followed by the meta-model flags (and --label_noise when given), so
    every row says which meta-model (and client optimizer) produced it.
    """
    after = report["after_adaptation"]
    setup = " ".join(
        part
        for part in (
            _TAG.value,
            settings_flags.describe_algorithm([name], _ADAPTIVE.value),
            settings_flags.describe_data(),
        )
        if part
    )
    row = (
        f"| {task.name} | {name} | {round_num} | {task.metric} | "
        f"{report['before_adaptation']['mean']:.4f} | {after['mean']:.4f} | "
        f"{after['p10']:.4f} | {report['fine_tune']['after_adaptation']['mean']:.4f} | "
        f"{reached_at if reached_at is not None else '-'} | {trained_s:.0f} | {setup} |\n"
    )
    with open(_OUTPUT.value, "a") as f:
        f.write(row)
    record = {"tag": _TAG.value, "flags": _flag_values(settings, name), **report}
    with open(os.path.splitext(_OUTPUT.value)[0] + ".jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    sys.stdout.write(row)
    sys.stdout.flush()


def _fail(message: str) -> None:
    """Bad input: one line on stderr and exit status 2, before anything is written."""
    sys.stderr.write(f"error: {message}\n")
    sys.exit(2)


def main(argv: list[str]) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)
    try:
        checkpoints = sorted({int(r) for r in _ROUNDS.value})
    except ValueError:
        checkpoints = []
    if not checkpoints or checkpoints[0] < 1:
        _fail(
            "--rounds must be round numbers >= 1, e.g. --rounds=100,300; got "
            f"{','.join(_ROUNDS.value)!r}."
        )
    unknown = [a for a in _ALGORITHMS.value if a not in builders.ALGORITHMS]
    if unknown:
        _fail(f"--algorithms has unknown {unknown}; choose from {', '.join(builders.ALGORITHMS)}.")
    problem = settings_flags.check() or settings_flags.check_task(_TASK.value)
    if problem:
        _fail(problem)
    task_options = {
        "seed": _SEED.value,
        "num_eval_clients": _NUM_EVAL.value,
        **settings_flags.task_options(),
    }
    try:
        task = registry.get_task(_TASK.value, ignore_unknown_options=True, **task_options)
    except (ValueError, TypeError, FileNotFoundError) as error:
        _fail(f"--task={_TASK.value}: {error}")
    settings = settings_flags.settings(task)
    num_train = len(task.train_data.client_ids)
    if settings.clients_per_round > num_train:
        _fail(
            f"--clients_per_round={settings.clients_per_round} exceeds the {num_train} training "
            f"clients of --task={_TASK.value}; lower --clients_per_round."
        )
    explicit = settings_flags.explicit()
    print(f"Settings ({task.name}'s, * = set by a flag): {settings.describe(explicit)}", flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(_OUTPUT.value)), exist_ok=True)
    if not os.path.exists(_OUTPUT.value):
        with open(_OUTPUT.value, "w") as f:
            f.write(HEADER)
    with runtime.local_execution(log_path=_OUTPUT.value + ".worker.log"):
        for name in _ALGORITHMS.value:
            _train_and_evaluate(name, task, settings, checkpoints)


def _flag_values(settings: settings_lib.TaskSettings, algorithm: str) -> dict:
    """This binary's flags and the shared ones, hyperparameters as used (the task's settings where
    a flag is unset, `algorithm`'s meta-model where --meta_model is), ranges spelled LO:HI as on
    the command line."""
    effective = settings.as_dict()
    effective["meta_model"] = settings_flags.meta_model(algorithm, _ADAPTIVE.value)
    if isinstance(settings.shots, tuple):
        effective["shots"] = settings_lib.format_range(settings.shots)
    noise = settings_flags.task_options().get("label_noise")
    effective["label_noise"] = None if noise is None else settings_lib.format_range(noise)
    values = {name: flags.FLAGS[name].value for name in flags.FLAGS if name in _OWN_FLAGS}
    return {name: effective.get(name, value) for name, value in values.items()}


_OWN_FLAGS = {
    f.name
    for module in (sys.modules[__name__], settings_flags)
    for f in flags.FLAGS.get_key_flags_for_module(module)
}

if __name__ == "__main__":
    app.run(main, flags_parser=settings_flags.parse_flags)
