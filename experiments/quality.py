r"""Learning-quality benchmark: trains algorithms on a task, reports held-out personalization.

Each algorithm is trained with the same seed, clients per round and budget; at each checkpoint
round in --rounds it is evaluated on --num_eval_clients held-out clients (never seen in training):
before adaptation, after adaptation with its own rule (learned alpha for mfl/meta_sgd, fine-tuning
at --fine_tune_lr for the others) and with the shared fine-tuning baseline. Rows are appended to
--output (markdown) as they are measured, and to --output with a .jsonl suffix as JSON.

Example (sinusoid, 10-shot, 1 inner step, as in MAML / Meta-SGD):

  python -m experiments.quality --task=sinusoid --shots=10 --algorithms=meta_sgd,maml,mfl \
      --rounds=500,1500 --inner_lr=0.01 --output=experiments/results/quality_sinusoid.md
"""

from __future__ import annotations

import json
import os
import sys
import time

from absl import app, flags

from mfl_tff.algorithms import builders
from mfl_tff.data import registry
from mfl_tff.training import personalize, runtime

_TASK = flags.DEFINE_string("task", "sinusoid", "Task name (see mfl_tff.data.task_names()).")
_ALGORITHMS = flags.DEFINE_list(
    "algorithms", ["fedavg", "maml", "meta_sgd", "mfl"], "Algorithms to train, comma-separated."
)
_ROUNDS = flags.DEFINE_list("rounds", ["100", "300"], "Checkpoint rounds to evaluate at.")
_CLIENTS = flags.DEFINE_integer("clients_per_round", 25, "Clients per round.")
_SHOTS = flags.DEFINE_integer("shots", None, "Support shots per client (task option).")
_INNER_STEPS = flags.DEFINE_integer("inner_steps", 1, "Inner (local) steps K.")
_INNER_LR = flags.DEFINE_float("inner_lr", 0.01, "Client step size / initial alpha.")
_OUTER_LR = flags.DEFINE_float("outer_lr", 0.01, "Per-FedAvg's local meta step size (beta).")
_LOCAL_EPOCHS = flags.DEFINE_integer("local_epochs", 1, "Local epochs (fedavg, mfl local).")
_META_OPT = flags.DEFINE_string("meta_optimizer", "adam", "Meta-optimizer name.")
_META_LR = flags.DEFINE_float("meta_lr", 1e-3, "Meta-optimizer learning rate.")
_SERVER_OPT = flags.DEFINE_string("server_optimizer", None, "Server optimizer (None: default).")
_SERVER_LR = flags.DEFINE_float("server_lr", None, "Server learning rate (None: default).")
_GRANULARITY = flags.DEFINE_string("alpha_granularity", "per_coordinate", "mfl alpha granularity.")
_ADAPTIVE = flags.DEFINE_string("adaptive_update", "meta", "mfl adaptive update: meta or local.")
_FINE_TUNE_LR = flags.DEFINE_float(
    "fine_tune_lr", None, "Fine-tuning rate of the baseline (default: --inner_lr)."
)
_EVAL_STEPS = flags.DEFINE_integer(
    "eval_adaptation_steps", None, "Adaptation steps at evaluation (default: --inner_steps)."
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


def main(argv: list[str]) -> None:
    del argv
    rounds = sorted(int(r) for r in _ROUNDS.value)
    task_options = {"seed": _SEED.value, "num_eval_clients": _NUM_EVAL.value}
    if _SHOTS.value is not None:
        task_options["shots"] = _SHOTS.value
    task = registry.get_task(_TASK.value, ignore_unknown_options=True, **task_options)
    eval_steps = _EVAL_STEPS.value or _INNER_STEPS.value
    fine_tune_lr = _FINE_TUNE_LR.value or _INNER_LR.value
    os.makedirs(os.path.dirname(os.path.abspath(_OUTPUT.value)), exist_ok=True)
    if not os.path.exists(_OUTPUT.value):
        with open(_OUTPUT.value, "w") as f:
            f.write(HEADER)
    with runtime.local_execution(log_path=_OUTPUT.value + ".worker.log"):
        for name in _ALGORITHMS.value:
            options = builders.AlgorithmOptions(
                inner_lr=_INNER_LR.value,
                inner_steps=_INNER_STEPS.value,
                local_epochs=_LOCAL_EPOCHS.value,
                outer_lr=_OUTER_LR.value,
                meta_optimizer=_META_OPT.value,
                meta_lr=_META_LR.value,
                server_optimizer=_SERVER_OPT.value,
                server_lr=_SERVER_LR.value,
                alpha_granularity=_GRANULARITY.value,
                adaptive_update=_ADAPTIVE.value,
                cohort_size=_COHORT.value or None,
            )
            process, spec = builders.build_algorithm(name, task, options)
            spec = builders.AlgorithmSpec(
                name=spec.name,
                learns_alpha=spec.learns_alpha,
                eval_steps=eval_steps if not spec.learns_alpha else spec.eval_steps,
                cohort_size=spec.cohort_size,
            )
            state = process.initialize()
            trained_s, reached_at, start = 0.0, None, time.time()
            for round_num in range(1, rounds[-1] + 1):
                ids = task.sample_train_ids(_CLIENTS.value, round_num)
                state = process.next(
                    state, spec.client_values(task.train_clients(ids, round_num))
                ).state
                if round_num % 100 == 0:
                    print(f"{name} round {round_num} {time.time() - start:.0f}s", flush=True)
                probe = _EVAL_EVERY.value and round_num % _EVAL_EVERY.value == 0
                if _TARGET.value is not None and reached_at is None and probe:
                    quick = personalize.evaluate(
                        process,
                        state,
                        spec,
                        task,
                        fine_tune_lr=fine_tune_lr,
                        max_steps=max(eval_steps, 1),
                        rounds=round_num,
                        num_clients=100,
                    )
                    if _reached(task.metric, quick["after_adaptation"]["mean"], _TARGET.value):
                        reached_at = round_num
                if round_num not in rounds:
                    continue
                trained_s = time.time() - start
                report = personalize.evaluate(
                    process,
                    state,
                    spec,
                    task,
                    fine_tune_lr=fine_tune_lr,
                    max_steps=max(_CURVE_STEPS.value, eval_steps),
                    rounds=round_num,
                    fine_tune_steps=eval_steps,
                )
                after = report["after_adaptation"]
                row = (
                    f"| {task.name} | {name} | {round_num} | {task.metric} | "
                    f"{report['before_adaptation']['mean']:.4f} | {after['mean']:.4f} | "
                    f"{after['p10']:.4f} | {report['fine_tune']['after_adaptation']['mean']:.4f} | "
                    f"{reached_at if reached_at is not None else '-'} | {trained_s:.0f} | "
                    f"{_TAG.value} |\n"
                )
                with open(_OUTPUT.value, "a") as f:
                    f.write(row)
                with open(os.path.splitext(_OUTPUT.value)[0] + ".jsonl", "a") as f:
                    f.write(
                        json.dumps({"tag": _TAG.value, "flags": _flag_values(), **report}) + "\n"
                    )
                sys.stdout.write(row)
                sys.stdout.flush()


def _flag_values() -> dict:
    return {name: flags.FLAGS[name].value for name in flags.FLAGS if name in _OWN_FLAGS}


_OWN_FLAGS = {f.name for f in flags.FLAGS.get_key_flags_for_module(sys.modules[__name__])}

if __name__ == "__main__":
    app.run(main)
