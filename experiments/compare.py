r"""Compares algorithms on one task with the same seed and budget, in one process and one runtime.

Writes OUTPUT_DIR/comparison.md (algorithm, rounds, before/after-adaptation mean and p10, rounds to
--target, MB uploaded to reach it and MB per client per round, wall time) and
OUTPUT_DIR/comparison.png (held-out personalized metric against round for each algorithm, and the
per-client distribution after adaptation), and prints the table.

  python -m experiments.compare --task=digits_fewshot --algorithms=mfl,fedavg --total_rounds=100

Hyperparameter flags left unset take the task's settings (`task.settings`: the values its
protocol uses); flags given explicitly win. The effective values are printed and written with
the table.

Computations run on a TFF worker started and stopped here, or with --execution=remote on
workers already running (--worker=HOST:PORT, or several comma-separated that share each round's
clients; see the README's "Running on a remote worker"). A worker that does not answer is one
line and exit status 2 before training; one lost mid-run is one line and exit status 3.

--data_on_workers (every built-in task; experiments/settings_flags.py) sends each round's clients as
int32 codes and builds the examples on the worker(s): digits, digits_fewshot and emnist the same
clients, sinusoid and synthetic generated there (another random stream of the same distribution).

--aggregator (experiments/aggregator_flags.py) sets how every algorithm aggregates: mean,
compressed, secure, robust or dp (with --noise_multiplier; no epsilon is reported here, so
--dp_delta is refused). The per-client kinds turn the default --cohort_size off; an explicit
non-zero one is an error. --aggregator=secure runs on one worker with secure sums simulated as
plain sums.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterator

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import matplotlib  # noqa: E402

matplotlib.use("Agg")  # no display on the machines this runs on
import matplotlib.pyplot as plt  # noqa: E402
from absl import app, flags, logging  # noqa: E402

from experiments import aggregator_flags, settings_flags  # noqa: E402
from mfl_tff.algorithms import builders, communication  # noqa: E402
from mfl_tff.data import example_sources, registry  # noqa: E402
from mfl_tff.data.settings import TaskSettings  # noqa: E402
from mfl_tff.evaluation import summaries  # noqa: E402
from mfl_tff.meta import hparams as meta_hparams  # noqa: E402
from mfl_tff.training import multi_worker, personalize, program, rounds, runtime  # noqa: E402

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
_EXECUTION = flags.DEFINE_string(
    "execution",
    "local",
    "Where computations run: local (a TFF worker_binary started and stopped here) or remote "
    "(worker_binary(s) already running at --worker).",
)
_WORKER = flags.DEFINE_string(
    "worker",
    None,
    "--execution=remote: HOST:PORT of a running TFF worker_binary --port=PORT, or several "
    "comma-separated (HOST:PORT,HOST:PORT,...) that share each round's clients.",
)
_WORKER_TIMEOUT = flags.DEFINE_float(
    "worker_timeout",
    30.0,
    "--execution=remote: seconds to wait for each worker to answer, at the start and whenever "
    "the connection drops, before giving up with an error.",
)
# A worker lost mid-run (as experiments/train.py; this binary does not resume, rerun it).
EXIT_WORKER_LOST = 3

# --helpshort lists the --aggregator flags as this binary's own.
flags.adopt_module_key_flags(aggregator_flags)


def _reached(metric: str, value: float, target: float) -> bool:
    return value >= target if metric == "accuracy" else value <= target


def _build(name: str, task, settings: TaskSettings, num_workers: int):
    """Algorithm `name`'s process and spec, with --aggregator's factories; cohorts (off with a
    per-client aggregator) leave each worker its share of a round."""
    aggregators = aggregator_flags.build(
        learns_alpha=name in builders.LEARNS_ALPHA, clients_per_round=settings.clients_per_round
    )
    options = builders.AlgorithmOptions.from_settings(
        settings,
        **settings_flags.algorithm_flags(),
        model_aggregator=aggregators.model,
        meta_aggregator=aggregators.meta,
        cohort_size=aggregator_flags.cohort_size(
            aggregators, _COHORT.value, settings.clients_per_round, num_workers
        ),
        vectorize_cohorts=program.default_vectorize_cohorts(_ROUNDS.value),
    )
    return builders.build_algorithm(name, task, options)


def _train_and_track(name: str, built, task, settings: TaskSettings, target: float) -> dict:
    """Trains one algorithm, evaluating on held-out clients every --rounds_per_eval rounds."""
    process, spec = built
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
        "communication": communication.measure(process, spec.stream_aggregators),
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
        f"Settings: {settings.describe()}; {settings_flags.describe_algorithm(list(results))}"
        f"{(' ' + settings_flags.describe_data()).rstrip()} {aggregator_flags.describe()}.",
        "",
        "| algorithm | rounds | before mean | before p10 | after mean | after p10 | "
        f"rounds to {target:g} | MB uploaded to reach the target | MB per client per round "
        "(up / down) | wall s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        before, after = r["report"]["before_adaptation"], r["report"]["after_adaptation"]
        cost, reached = r["communication"], r["reached_at"]
        to_target = (
            "-"
            if reached is None
            else f"{reached * settings.clients_per_round * cost.upload_total / 1e6:.2f}"
        )
        lines.append(
            f"| {name} | {_ROUNDS.value} | {before['mean']:.4f} | {before['p10']:.4f} | "
            f"{after['mean']:.4f} | {after['p10']:.4f} | {reached if reached is not None else '-'} "
            f"| {to_target} | {cost.upload_total / 1e6:.4f} / {cost.download_bytes / 1e6:.4f} | "
            f"{r['seconds']:.0f} |"
        )
    lines += [
        "",
        "MB are 10^6 bytes, counted from the TFF types of each round's broadcasts and "
        "aggregations (after the aggregator's encoding; `mfl_tff.algorithms.communication`); "
        "'to reach the target': every client of every round up to the first evaluation at the "
        "target (evaluations every --rounds_per_eval rounds).",
    ]
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


def _workers() -> list[str]:
    """The --worker targets with --execution=remote (empty for local); bad flags exit 2."""
    if _EXECUTION.value not in ("local", "remote"):
        _fail(f"--execution={_EXECUTION.value!r} is not supported; choose one of: local, remote.")
    if _EXECUTION.value == "local":
        if flags.FLAGS["worker"].present:
            _fail(
                "--worker is only used with --execution=remote; add --execution=remote or drop it."
            )
        return []
    if not _WORKER.value:
        _fail(
            "--execution=remote needs --worker=HOST:PORT, the address of a running worker_binary."
        )
    try:
        targets = multi_worker.parse_targets(_WORKER.value)
    except ValueError as e:
        _fail(f"--worker={_WORKER.value}: {e} E.g. --worker=10.0.0.7:8000,10.0.0.8:8000.")
    if not _WORKER_TIMEOUT.value > 0:
        _fail(f"--worker_timeout must be > 0 seconds, got {_WORKER_TIMEOUT.value}.")
    return targets


def _check_workers(targets: list[str], built: dict) -> None:
    """Fails before training if a worker does not answer or an algorithm cannot be split."""
    if len(targets) > 1:
        for name, (process, spec) in built.items():
            try:
                rounds.check_splittable(process, spec)
            except multi_worker.NotMergeableError:
                _fail(
                    f"--algorithms: a phase of {name}'s round aggregates twice, the second time "
                    "on the result of the first, which cannot run on several workers; pass one "
                    f"--worker, or drop {name} from --algorithms."
                )
    for target in targets:
        try:
            runtime.wait_for_worker(target, _WORKER_TIMEOUT.value)
        except ConnectionError:
            _fail(
                f"--worker={_WORKER.value}: no TFF worker answered at {target} within "
                f"{_WORKER_TIMEOUT.value:g} s; start one there (worker_binary "
                f"--port={target.rpartition(':')[2]}) or fix --worker."
            )


@contextlib.contextmanager
def _execution(targets: list[str]) -> Iterator[None]:
    """TFF's runtime for the comparison: a worker started here, or the --worker ones."""
    secure = aggregator_flags.simulate_secure_sums()
    if not targets:
        with runtime.local_execution(
            log_path=os.path.join(_OUTPUT_DIR.value, "worker.log"), simulate_secure_sums=secure
        ):
            if secure:
                print(aggregator_flags.SECURE_SUMS_NOTE, flush=True)
            yield
        return
    # One worker keeps the single-worker path; several share each round's clients.
    with runtime.remote_execution(
        targets[0] if len(targets) == 1 else targets,
        timeout_s=_WORKER_TIMEOUT.value,
        simulate_secure_sums=secure,
    ):
        print(f"TFF worker(s) at {', '.join(targets)} (remote)", flush=True)
        if secure:
            print(aggregator_flags.SECURE_SUMS_NOTE, flush=True)
        yield


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
    targets = _workers()
    try:
        aggregator_flags.check_aggregator_flags(num_workers=len(targets), accounts_privacy=False)
    except aggregator_flags.UsageError as e:
        _fail(str(e))
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
    try:
        built = {
            name: _build(name, task, settings, max(1, len(targets))) for name in _ALGORITHMS.value
        }
    except aggregator_flags.UsageError as e:
        _fail(str(e))
    _check_workers(targets, built)
    os.makedirs(_OUTPUT_DIR.value, exist_ok=True)
    results = {}
    try:
        with _execution(targets):
            for name in _ALGORITHMS.value:
                results[name] = _train_and_track(name, built[name], task, settings, target)
    except (ConnectionError, runtime.WorkerExitedError) as e:
        sys.stderr.write(
            f"The TFF worker was lost ({' '.join(str(e).split())}); once it runs again, rerun "
            "the same command.\n"
        )
        sys.exit(EXIT_WORKER_LOST)
    except Exception as e:  # noqa: BLE001  (re-raised unless a worker lacks the task's data)
        problem = example_sources.worker_data_problem(e)
        if problem is None:
            raise
        _fail(f"--data_on_workers: {problem}")
    table = _table(task, settings, results, target)
    with open(os.path.join(_OUTPUT_DIR.value, "comparison.md"), "w") as f:
        f.write(table)
    _plot(task, results, os.path.join(_OUTPUT_DIR.value, "comparison.png"))
    print("\n" + table)
    print(f"Wrote {_OUTPUT_DIR.value}/comparison.md and comparison.png")


if __name__ == "__main__":
    app.run(main, flags_parser=settings_flags.parse_flags)
