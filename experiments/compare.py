r"""Compares algorithms on one task with the same seed and budget, in one process and one runtime.

Writes OUTPUT_DIR/comparison.md (algorithm, rounds, before/after-adaptation mean and p10, rounds to
--target, wall time) and OUTPUT_DIR/comparison.png (held-out personalized metric against round for
each algorithm, and the per-client distribution after adaptation), and prints the table.

  python -m experiments.compare --task=digits_fewshot --algorithms=mfl,fedavg --total_rounds=100

Hyperparameter flags left unset take the task's settings (`task.settings`: the values its
protocol uses); flags given explicitly win. The effective values are printed and written with
the table.
"""

from __future__ import annotations

import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import matplotlib  # noqa: E402

matplotlib.use("Agg")  # no display on the machines this runs on
import matplotlib.pyplot as plt  # noqa: E402
from absl import app, flags, logging  # noqa: E402

from experiments import settings_flags  # noqa: E402
from mfl_tff.algorithms import builders  # noqa: E402
from mfl_tff.data import registry  # noqa: E402
from mfl_tff.data.settings import TaskSettings  # noqa: E402
from mfl_tff.evaluation import summaries  # noqa: E402
from mfl_tff.meta import hparams as meta_hparams  # noqa: E402
from mfl_tff.training import personalize, rounds, runtime  # noqa: E402

_TASK = flags.DEFINE_string("task", "digits_fewshot", "Task name.")
_ALGORITHMS = flags.DEFINE_list("algorithms", ["mfl", "fedavg"], "Algorithms to compare.")
_ROUNDS = flags.DEFINE_integer("total_rounds", 100, "Training rounds per algorithm.")
_EVAL_EVERY = flags.DEFINE_integer("rounds_per_eval", 25, "Rounds between held-out evaluations.")
_NUM_EVAL = flags.DEFINE_integer("num_eval_clients", 100, "Held-out clients evaluated.")
_COHORT = flags.DEFINE_integer("cohort_size", 25, "Clients stacked per federated client (0: off).")
_TARGET = flags.DEFINE_float(
    "target", None, "Metric target for 'rounds to target' (default: 0.9 accuracy or 0.5 mse)."
)
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the data, the initial model and sampling.")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", "output/compare", "Where the report is written.")


def _reached(metric: str, value: float, target: float) -> bool:
    return value >= target if metric == "accuracy" else value <= target


def _train_and_track(name: str, task, settings: TaskSettings, target: float) -> dict:
    """Trains one algorithm, evaluating on held-out clients every --rounds_per_eval rounds."""
    options = builders.AlgorithmOptions.from_settings(
        settings,
        **settings_flags.algorithm_flags(),
        cohort_size=min(_COHORT.value, settings.clients_per_round) or None,
    )
    process, spec = builders.build_algorithm(name, task, options)
    start, curve, last = time.time(), [], {}

    def evaluate(result: rounds.RoundResult) -> None:
        if result.round_num % _EVAL_EVERY.value and result.round_num != _ROUNDS.value:
            return
        report, per_client = personalize.evaluate(
            process,
            result.state,
            spec,
            task,
            fine_tune_lr=settings.inner_lr,
            max_steps=settings.adaptation_steps,
            rounds=result.round_num,
            num_clients=_NUM_EVAL.value,
            return_per_client=True,
        )
        after = report["after_adaptation"]["mean"]
        curve.append((result.round_num, after))
        if "reached_at" not in last and _reached(task.metric, after, target):
            last["reached_at"] = result.round_num
        last.update(report=report, per_client=per_client)
        print(
            f"  {name:14s} round {result.round_num:5d}  {task.metric} after adaptation "
            f"{after:.4f}  {time.time() - start:6.1f}s",
            flush=True,
        )

    rounds.run_rounds(
        process,
        spec,
        task,
        clients_per_round=settings.clients_per_round,
        rounds=range(1, _ROUNDS.value + 1),
        after_round=evaluate,
    )
    report = last["report"]
    after_values = summaries.stack_clients(last["per_client"], "own_metric")[
        :, report["adaptation_steps"]
    ]
    return {
        "report": report,
        "curve": curve,
        "after_values": after_values,
        "reached_at": last.get("reached_at"),
        "seconds": time.time() - start,
    }


def _table(task, settings: TaskSettings, results: dict, target: float) -> str:
    lines = [
        f"Task `{task.name}`, metric {task.metric}, {_ROUNDS.value} rounds x "
        f"{settings.clients_per_round} clients, {_NUM_EVAL.value} held-out clients, seed "
        f"{_SEED.value}.",
        "",
        f"Settings: {settings.describe()}; {settings_flags.describe_algorithm()}"
        f"{(' ' + settings_flags.describe_data()).rstrip()}.",
        "",
        "| algorithm | rounds | before mean | before p10 | after mean | after p10 | "
        f"rounds to {target:g} | wall s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        before, after = r["report"]["before_adaptation"], r["report"]["after_adaptation"]
        lines.append(
            f"| {name} | {_ROUNDS.value} | {before['mean']:.4f} | {before['p10']:.4f} | "
            f"{after['mean']:.4f} | {after['p10']:.4f} | "
            f"{r['reached_at'] if r['reached_at'] is not None else '-'} | {r['seconds']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def _plot(task, results: dict, path: str) -> None:
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for name, r in results.items():
        rounds, values = zip(*r["curve"])
        left.plot(rounds, values, marker="o", label=name)
    left.set(xlabel="round", ylabel=f"held-out {task.metric} after adaptation", title=task.name)
    left.legend()
    names = list(results)
    right.boxplot([results[n]["after_values"] for n in names], tick_labels=names)
    right.set(ylabel=f"per-client {task.metric} after adaptation", title="held-out clients")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _fail(message: str) -> None:
    """Bad input: one line on stderr and exit status 2, before anything is written."""
    sys.stderr.write(f"error: {message}\n")
    sys.exit(2)


def main(argv: list[str]) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)
    unknown = [a for a in _ALGORITHMS.value if a not in builders.ALGORITHMS]
    if unknown:
        _fail(f"--algorithms has unknown {unknown}; choose from {', '.join(builders.ALGORITHMS)}.")
    for flag in (_ROUNDS, _EVAL_EVERY, _NUM_EVAL):
        if flag.value is not None and flag.value < 1:
            _fail(f"--{flag.name} must be >= 1, got {flag.value}.")
    problem = settings_flags.check() or settings_flags.check_task(_TASK.value)
    if problem:
        _fail(problem)
    try:
        task = registry.get_task(
            _TASK.value,
            ignore_unknown_options=True,
            seed=_SEED.value,
            num_eval_clients=_NUM_EVAL.value,
            **settings_flags.task_options(),
        )
    except (ValueError, TypeError, FileNotFoundError) as error:
        _fail(f"--task={_TASK.value}: {error}")
    settings = settings_flags.settings(task)
    for name, allowed in (
        ("meta_optimizer", builders.OPTIMIZERS),
        ("alpha_granularity", meta_hparams.GRANULARITIES),
    ):
        value = getattr(settings, name)
        if value not in allowed:
            source = "" if flags.FLAGS[name].value is not None else " (the task's setting)"
            _fail(f"--{name}={value!r}{source} is unknown; choose one of: {', '.join(allowed)}.")
    num_train = len(task.train_data.client_ids)
    if settings.clients_per_round > num_train:
        _fail(
            f"--clients_per_round={settings.clients_per_round} exceeds the {num_train} training "
            f"clients of --task={_TASK.value}; lower --clients_per_round."
        )
    explicit = settings_flags.explicit()
    print(f"Settings ({task.name}'s, * = set by a flag): {settings.describe(explicit)}", flush=True)
    target = (
        _TARGET.value if _TARGET.value is not None else (0.9 if task.metric == "accuracy" else 0.5)
    )
    os.makedirs(_OUTPUT_DIR.value, exist_ok=True)
    results = {}
    with runtime.local_execution(log_path=os.path.join(_OUTPUT_DIR.value, "worker.log")):
        for name in _ALGORITHMS.value:
            results[name] = _train_and_track(name, task, settings, target)
    table = _table(task, settings, results, target)
    with open(os.path.join(_OUTPUT_DIR.value, "comparison.md"), "w") as f:
        f.write(table)
    _plot(task, results, os.path.join(_OUTPUT_DIR.value, "comparison.png"))
    print("\n" + table)
    print(f"Wrote {_OUTPUT_DIR.value}/comparison.md and comparison.png")


if __name__ == "__main__":
    app.run(main, flags_parser=settings_flags.parse_flags)
