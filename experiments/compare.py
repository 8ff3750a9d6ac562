r"""Compares algorithms on one task with the same seed and budget, in one process and one runtime.

Writes OUTPUT_DIR/comparison.md (algorithm, rounds, before/after-adaptation mean and p10, rounds to
--target, wall time) and OUTPUT_DIR/comparison.png (held-out personalized metric against round for
each algorithm, and the per-client distribution after adaptation), and prints the table.

  python -m experiments.compare --task=digits_fewshot --algorithms=mfl,fedavg --total_rounds=100
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

from mfl_tff.algorithms import builders  # noqa: E402
from mfl_tff.data import registry  # noqa: E402
from mfl_tff.evaluation import summaries  # noqa: E402
from mfl_tff.training import personalize, runtime  # noqa: E402

_TASK = flags.DEFINE_string("task", "digits_fewshot", "Task name.")
_ALGORITHMS = flags.DEFINE_list("algorithms", ["mfl", "fedavg"], "Algorithms to compare.")
_ROUNDS = flags.DEFINE_integer("total_rounds", 100, "Training rounds per algorithm.")
_EVAL_EVERY = flags.DEFINE_integer("rounds_per_eval", 25, "Rounds between held-out evaluations.")
_CLIENTS = flags.DEFINE_integer("clients_per_round", 25, "Clients per round.")
_INNER_STEPS = flags.DEFINE_integer("inner_steps", 5, "Inner / adaptation steps.")
_INNER_LR = flags.DEFINE_float("inner_lr", 0.4, "Client step size, initial alpha, fine-tune rate.")
_GRANULARITY = flags.DEFINE_string("alpha_granularity", "per_layer", "mfl alpha granularity.")
_NUM_EVAL = flags.DEFINE_integer("num_eval_clients", 100, "Held-out clients evaluated.")
_COHORT = flags.DEFINE_integer("cohort_size", 25, "Clients stacked per federated client (0: off).")
_TARGET = flags.DEFINE_float(
    "target", None, "Metric target for 'rounds to target' (default: 0.9 accuracy or 0.5 mse)."
)
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the data, the initial model and sampling.")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", "output/compare", "Where the report is written.")


def _reached(metric: str, value: float, target: float) -> bool:
    return value >= target if metric == "accuracy" else value <= target


def _train_and_track(name: str, task, target: float) -> dict:
    """Trains one algorithm, evaluating on held-out clients every --rounds_per_eval rounds."""
    options = builders.AlgorithmOptions(
        inner_lr=_INNER_LR.value,
        inner_steps=_INNER_STEPS.value,
        alpha_granularity=_GRANULARITY.value,
        cohort_size=_COHORT.value or None,
    )
    process, spec = builders.build_algorithm(name, task, options)
    state = process.initialize()
    start, curve, reached_at = time.time(), [], None
    for round_num in range(1, _ROUNDS.value + 1):
        ids = task.sample_train_ids(_CLIENTS.value, round_num)
        state = process.next(state, spec.client_values(task.train_clients(ids, round_num))).state
        if round_num % _EVAL_EVERY.value and round_num != _ROUNDS.value:
            continue
        report, per_client = personalize.evaluate(
            process,
            state,
            spec,
            task,
            fine_tune_lr=_INNER_LR.value,
            max_steps=_INNER_STEPS.value,
            rounds=round_num,
            num_clients=_NUM_EVAL.value,
            return_per_client=True,
        )
        after = report["after_adaptation"]["mean"]
        curve.append((round_num, after))
        if reached_at is None and _reached(task.metric, after, target):
            reached_at = round_num
        print(
            f"  {name:14s} round {round_num:5d}  {task.metric} after adaptation {after:.4f}  "
            f"{time.time() - start:6.1f}s",
            flush=True,
        )
    after_values = summaries.stack_clients(per_client, "own_metric")[:, report["adaptation_steps"]]
    return {
        "report": report,
        "curve": curve,
        "after_values": after_values,
        "reached_at": reached_at,
        "seconds": time.time() - start,
    }


def _table(task, results: dict, target: float) -> str:
    lines = [
        f"Task `{task.name}`, metric {task.metric}, {_ROUNDS.value} rounds x {_CLIENTS.value} "
        f"clients, {_NUM_EVAL.value} held-out clients, seed {_SEED.value}.",
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


def main(argv: list[str]) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)
    unknown = [a for a in _ALGORITHMS.value if a not in builders.ALGORITHMS]
    if unknown:
        sys.exit(
            f"error: --algorithms has unknown {unknown}; choose from "
            f"{', '.join(builders.ALGORITHMS)}."
        )
    for flag in (_ROUNDS, _EVAL_EVERY, _CLIENTS, _INNER_STEPS, _NUM_EVAL):
        if flag.value < 1:
            sys.exit(f"error: --{flag.name} must be >= 1, got {flag.value}.")
    try:
        task = registry.get_task(
            _TASK.value,
            ignore_unknown_options=True,
            seed=_SEED.value,
            num_eval_clients=_NUM_EVAL.value,
        )
    except (ValueError, TypeError, FileNotFoundError) as error:
        sys.exit(f"error: {error}")
    target = (
        _TARGET.value if _TARGET.value is not None else (0.9 if task.metric == "accuracy" else 0.5)
    )
    os.makedirs(_OUTPUT_DIR.value, exist_ok=True)
    results = {}
    with runtime.local_execution(log_path=os.path.join(_OUTPUT_DIR.value, "worker.log")):
        for name in _ALGORITHMS.value:
            results[name] = _train_and_track(name, task, target)
    table = _table(task, results, target)
    with open(os.path.join(_OUTPUT_DIR.value, "comparison.md"), "w") as f:
        f.write(table)
    _plot(task, results, os.path.join(_OUTPUT_DIR.value, "comparison.png"))
    print("\n" + table)
    print(f"Wrote {_OUTPUT_DIR.value}/comparison.md and comparison.png")


if __name__ == "__main__":
    app.run(main)
