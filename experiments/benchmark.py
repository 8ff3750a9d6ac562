r"""Performance benchmark: round time against TFF's own FedAvg and the plain-TensorFlow floor,
scaling with clients per round, memory over many rounds, and time to first round.

For one task and one number of clients per round, in one process and one TFF runtime:

* each algorithm's round time (our fast path: `builders.build_algorithm` with clients stacked into
  a cohort), median/min/max over --rounds rounds after warm-up, and its ratio to the peer, both as
  composed (`process.next`, a cohort's clients in a loop: the library's default, and what short
  runs of the training program use) and as the training program runs long runs: built with
  vectorized cohorts and fused (`mfl_tff.training.fused_rounds`; its time to first round includes
  that build, the vectorization and the fusing compilation),
  `tff.learning.algorithms.build_weighted_fed_avg` fed `tf.data` datasets, at the same local SGD
  steps per client on the same clients;
* the floor: the same client math for all clients in one plain-TensorFlow graph (no TFF), and
  each algorithm's ratio to its floor;
* scaling: our FedAvg, the peer and the floor at each of --scaling clients per round, with a
  linear fit (fixed cost + cost per client);
* memory: resident memory of this process (the driver) and of TFF's worker process over
  --memory_rounds rounds, and its growth per 100 rounds after the first 20;
* time to first round: building the process (tracing) plus its first round (compilation);
* end to end: the training program as a user runs it, near round 500 and at round 50,000, against
  the same round in plain TensorFlow (`floors.TFFloor`) and, on sinusoid, as one XLA function;
* several workers: round time, bytes the driver sends and CPU per worker with 1 and 2 loopback
  workers at --workers_clients clients per round (`experiments.worker_scaling`).

Round data is sampled, packed and stacked exactly as the training program feeds it, before any
timing (its cost per round is reported as `data_prep_s_per_round`). Writes --output (JSON) and
prints the tables. Defaults take about 5-8 minutes on 2 cores before the end-to-end section and
4-5 minutes per end-to-end run; --quick takes well under a minute and skips that section unless
--end_to_end is given.

  python -m experiments.benchmark --output=benchmark.json
"""

from __future__ import annotations

import collections
import json
import os
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import app, flags, logging  # noqa: E402

from experiments import benchmarking as bm  # noqa: E402
from experiments import end_to_end, floors, round_anatomy, worker_scaling  # noqa: E402
from mfl_tff.algorithms import builders  # noqa: E402
from mfl_tff.data import registry  # noqa: E402
from mfl_tff.meta import meta_model as meta_model_lib  # noqa: E402
from mfl_tff.training import fused_rounds, runtime  # noqa: E402
from mfl_tff.training import worker as worker_lib  # noqa: E402

PEER = "peer_fedavg"

_OUTPUT = flags.DEFINE_string("output", "./benchmark.json", "JSON file the results are written to.")
_QUICK = flags.DEFINE_bool(
    "quick",
    False,
    "Tiny settings (4 clients, fedavg only, few rounds) to check that the benchmark runs; flags "
    "given explicitly still win.",
)
_TASK = flags.DEFINE_string("task", "digits", "Task name (see mfl_tff.data.task_names()).")
_NUM_TRAIN = flags.DEFINE_integer(
    "num_train_clients", 60, "Training clients (task option; ignored by tasks without it)."
)
_MAX_BATCHES = flags.DEFINE_integer(
    "max_batches",
    2,
    "Support and query batches per client (digits option): 2 + 2 batches of 10 examples.",
)
_CLIENTS = flags.DEFINE_integer("clients_per_round", 20, "Clients per round.")
_ALGORITHMS = flags.DEFINE_list(
    "algorithms", ["fedavg", "maml", "meta_sgd", "mfl"], "Algorithms to time."
)
_UNSTACKED = flags.DEFINE_list(
    "unstacked_algorithms", ["fedavg"], "Algorithms also timed without cohorts (one per client)."
)
_COHORT = flags.DEFINE_integer(
    "cohort_size", 0, "Clients stacked per federated client (0: all clients of a round)."
)
_ROUNDS = flags.DEFINE_integer("rounds", 20, "Timed rounds per measurement.")
_WARMUP = flags.DEFINE_integer("warmup_rounds", 3, "Untimed rounds after the first one.")
_DATA_ROUNDS = flags.DEFINE_integer(
    "data_rounds", 5, "Distinct rounds of client data packed in advance (cycled)."
)
_SCALING = flags.DEFINE_list("scaling", ["5", "10", "20", "50"], "Clients per round to scale over.")
_MEMORY_ROUNDS = flags.DEFINE_integer("memory_rounds", 300, "Rounds of the memory measurement.")
_MEMORY_ALGORITHMS = flags.DEFINE_list(
    "memory_algorithms",
    ["fedavg", "mfl"],
    f"Runs whose memory is tracked ({PEER}: TFF's FedAvg, about 2 minutes more).",
)
_MEMORY_EVERY = flags.DEFINE_integer("memory_every", 10, "Rounds between memory samples.")
_INNER_STEPS = flags.DEFINE_integer(
    "inner_steps",
    0,
    "Inner steps K of the meta-learners (0: the peer's mean local steps per client, rounded).",
)
_INNER_LR = flags.DEFINE_float("inner_lr", 0.1, "Client learning rate / initial alpha.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the data, the model and client sampling.")
_END_TO_END = flags.DEFINE_list(
    "end_to_end",
    ["sinusoid:meta_sgd", "digits_fewshot:mfl"],
    "TASK:ALGORITHM runs of the training program timed end to end (checkpoints and metric "
    "releases included) near round 500 and at round 50,000; empty: skip.",
)
_END_TO_END_SPAN = flags.DEFINE_integer(
    "end_to_end_span", 400, "Rounds between the two runs whose difference is one measurement."
)
_META_MODEL = flags.DEFINE_enum(
    "meta_model",
    None,
    meta_model_lib.META_MODELS,
    "mfl's and meta_sgd's meta-model in every section; empty: each algorithm's default "
    "(conditioned for mfl, rates for meta_sgd). The README's tables give the value they used.",
)
_END_TO_END_FLAGS = flags.DEFINE_list(
    "end_to_end_flags", [], "Extra flags of the timed training runs, e.g. --rounds_per_call=10."
)

_WORKERS_CLIENTS = flags.DEFINE_list(
    "workers_clients",
    ["20", "100"],
    "Clients per round of the several-workers section (digits_fewshot, data sent and built on "
    "the workers, 1 and 2 loopback workers); empty: skip.",
)
_WORKERS_ALGORITHMS = flags.DEFINE_list(
    "workers_algorithms", ["fedavg", "mfl"], "Algorithms of the several-workers section."
)

QUICK = dict(
    clients_per_round=4,
    num_train_clients=8,
    algorithms=["fedavg"],
    unstacked_algorithms=[],
    rounds=3,
    warmup_rounds=1,
    data_rounds=2,
    scaling=["2", "4"],
    memory_rounds=25,
    memory_algorithms=["fedavg"],
    memory_every=5,
    end_to_end=[],
    workers_clients=[],
)


def _apply_quick() -> None:
    for name, value in QUICK.items():
        if not flags.FLAGS[name].present:
            flags.FLAGS[name].value = value


def _check_flags() -> list[int]:
    """Exits with one line naming the flag on bad input; returns the scaling sizes."""
    known = set(builders.ALGORITHMS)
    for flag in (_ALGORITHMS, _UNSTACKED):
        unknown = [a for a in flag.value if a not in known]
        if unknown:
            sys.exit(f"error: --{flag.name} has unknown {unknown}; choose from {sorted(known)}.")
    unknown = [a for a in _MEMORY_ALGORITHMS.value if a not in known | {PEER}]
    if unknown:
        sys.exit(f"error: --memory_algorithms has unknown {unknown}; use algorithms or {PEER}.")
    for flag in (_CLIENTS, _ROUNDS, _DATA_ROUNDS, _MEMORY_EVERY, _NUM_TRAIN, _MAX_BATCHES):
        if flag.value < 1:
            sys.exit(f"error: --{flag.name} must be >= 1, got {flag.value}.")
    for flag in (_WARMUP, _MEMORY_ROUNDS, _INNER_STEPS, _COHORT):
        if flag.value < 0:
            sys.exit(f"error: --{flag.name} must be >= 0, got {flag.value}.")
    try:
        sizes = sorted({int(s) for s in _SCALING.value})
    except ValueError:
        sys.exit(f"error: --scaling must be integers, got {_SCALING.value}.")
    if any(s < 1 for s in sizes):
        sys.exit(f"error: --scaling values must be >= 1, got {sizes}.")
    return sizes


def _cohort(n: int):
    return _COHORT.value or n


def _options(inner_steps: int, cohort_size, vectorize: bool = False) -> builders.AlgorithmOptions:
    return builders.AlgorithmOptions(
        inner_lr=_INNER_LR.value,
        inner_steps=inner_steps,
        meta_model=_META_MODEL.value,
        cohort_size=cohort_size,
        vectorize_cohorts=vectorize,
    )


def _ours(name: str, task, rounds, inner_steps: int, cohort_size, *, fused: bool = False):
    """Builds algorithm `name` on prepared rounds, runs its first round and warm-up rounds; with
    `fused`, also its long-run form (`runner.fused`): built again with vectorized cohorts and
    fused, as the training program runs long runs."""
    begin = time.perf_counter()
    process, spec = builders.build_algorithm(name, task, _options(inner_steps, cohort_size))
    build_s = time.perf_counter() - begin
    begin = time.perf_counter()
    values = [spec.client_values(clients) for clients in rounds]
    client_values_s = (time.perf_counter() - begin) / len(rounds)
    runner = bm.ProcessRunner(process, values, build_s=build_s)
    runner.client_values_s = client_values_s
    runner.federated_calls = round_anatomy.intrinsic_calls(process.next)
    bm.time_calls(runner.run_round, _WARMUP.value, start=1)
    if fused:
        # Its build, vectorization and fusing compilation count in its time to the first round.
        begin = time.perf_counter()
        long_process, long_spec = builders.build_algorithm(
            name, task, _options(inner_steps, cohort_size, vectorize=True)
        )
        fused_round = fused_rounds.fuse(long_process, long_spec.phase_computations)
        runner.fused = bm.ProcessRunner(
            long_process,
            values,
            build_s=time.perf_counter() - begin,
            round_fn=fused_round,
        )
        runner.fused.federated_calls = round_anatomy.intrinsic_calls(fused_round.computation)
        bm.time_calls(runner.fused.run_round, _WARMUP.value, start=1)
    return runner


def _peer(task, rounds, learning_rate: float):
    begin = time.perf_counter()
    process = bm.build_peer_fedavg(task, learning_rate=learning_rate)
    build_s = time.perf_counter() - begin
    datasets = [[bm.client_dataset(c) for c in clients] for clients in rounds]
    runner = bm.ProcessRunner(process, datasets, build_s=build_s)
    bm.time_calls(runner.run_round, _WARMUP.value, start=1)
    return runner


def _timed(runner) -> collections.OrderedDict:
    start = 1 + _WARMUP.value
    return bm.summarize(bm.time_calls(runner.run_round, _ROUNDS.value, start=start))


def _time_floor(floor, rounds) -> collections.OrderedDict:
    feeds = [floor.feed(clients) for clients in rounds]
    for i in range(1 + _WARMUP.value):
        floor.run_round(feeds[i % len(feeds)])
    # Floor rounds take milliseconds, so more of them steady the median at little cost.
    return bm.summarize(
        bm.time_calls(lambda i: floor.run_round(feeds[i % len(feeds)]), 5 * _ROUNDS.value)
    )


def _memory(runner, service) -> collections.OrderedDict:
    rounds, driver, worker = [0], [bm.rss_mb()], [bm.rss_mb(service.pid)]
    for i in range(1, _MEMORY_ROUNDS.value + 1):
        runner.run_round(i)
        if i % _MEMORY_EVERY.value == 0 or i == _MEMORY_ROUNDS.value:
            rounds.append(i)
            driver.append(bm.rss_mb())
            worker.append(bm.rss_mb(service.pid))
    return collections.OrderedDict(
        rounds=rounds,
        driver=[round(v, 1) for v in driver],
        worker=[round(v, 1) for v in worker],
        driver_growth_pct_per_100_rounds=bm.growth_pct_per_100_rounds(rounds, driver),
        worker_growth_pct_per_100_rounds=bm.growth_pct_per_100_rounds(rounds, worker),
    )


def _ratio(a, b):
    return a / b if a is not None and b else None


def run() -> dict:
    sizes = _check_flags()
    n = _CLIENTS.value
    try:
        task = registry.get_task(
            _TASK.value,
            ignore_unknown_options=True,
            seed=_SEED.value,
            num_train_clients=_NUM_TRAIN.value,
            max_batches=_MAX_BATCHES.value,
            num_eval_clients=1,
        )
    except (ValueError, TypeError, FileNotFoundError) as error:
        sys.exit(f"error: {error}")
    available = len(task.train_data.client_ids)
    if max(sizes + [n]) > available:
        sys.exit(
            f"error: --clients_per_round/--scaling up to {max(sizes + [n])} but the task has "
            f"{available} training clients; raise --num_train_clients."
        )
    machine = bm.machine_info()
    print(f"Packing {_DATA_ROUNDS.value} rounds of client data per size ...", flush=True)
    begin = time.perf_counter()
    rounds = {size: bm.pack_rounds(task, size, _DATA_ROUNDS.value) for size in set(sizes + [n])}
    prep_s = (time.perf_counter() - begin) / sum(len(r) for r in rounds.values())
    steps = [bm.real_batches(c) for clients in rounds[n] for c in clients]
    peer_steps = sum(steps) / len(steps)
    inner_steps = _INNER_STEPS.value or max(1, round(peer_steps))

    tf_floors, floor_times = {}, {}
    for name in ["fedavg"] + [a for a in _ALGORITHMS.value if a != "fedavg"]:
        if name not in floors.FLOOR_ALGORITHMS:
            continue
        print(f"TF floor: {name} ...", flush=True)
        tf_floors[name] = floors.TFFloor(name, task, _options(inner_steps, None), rounds[n][0])
        floor_times[name] = _time_floor(tf_floors[name], rounds[n])

    results = collections.OrderedDict()
    unstacked = collections.OrderedDict()
    scaling = []
    memory = collections.OrderedDict()
    with runtime.local_execution() as service:
        print("Peer: tff.learning.algorithms.build_weighted_fed_avg ...", flush=True)
        peer = _peer(task, rounds[n], _INNER_LR.value)
        peer_time = _timed(peer)
        runners = {PEER: peer}
        for name in _ALGORITHMS.value:
            print(f"Ours: {name} (cohort {_cohort(n)}) ...", flush=True)
            runner = _ours(name, task, rounds[n], inner_steps, _cohort(n), fused=True)
            runners[name] = runner
            timing = _timed(runner)
            floor = floor_times.get(name)
            results[name] = collections.OrderedDict(
                round_time_s=timing,
                ratio_to_peer_fedavg=_ratio(timing["median"], peer_time["median"]),
                ratio_to_tf_floor=_ratio(timing["median"], floor and floor["median"]),
                first_round_s=runner.build_s + runner.first_round_s,
                build_s=runner.build_s,
                first_next_s=runner.first_round_s,
                tf_floor_round_time_s=floor,
                cohort_size=_cohort(n),
                client_values_s_per_round=runner.client_values_s,
                federated_calls_per_round=runner.federated_calls,
            )
            fused_timing = _timed(runner.fused)
            results[name]["fused"] = collections.OrderedDict(
                round_time_s=fused_timing,
                ratio_to_peer_fedavg=_ratio(fused_timing["median"], peer_time["median"]),
                ratio_to_tf_floor=_ratio(fused_timing["median"], floor and floor["median"]),
                first_round_s=runner.fused.build_s + runner.fused.first_round_s,
                tf_floor_round_time_s=floor,
                federated_calls_per_round=runner.fused.federated_calls,
            )
        for name in _UNSTACKED.value:
            print(f"Ours: {name} (no cohorts) ...", flush=True)
            runner = _ours(name, task, rounds[n], inner_steps, None)
            timing = _timed(runner)
            unstacked[name] = collections.OrderedDict(
                round_time_s=timing,
                ratio_to_peer_fedavg=_ratio(timing["median"], peer_time["median"]),
                ratio_to_tf_floor=_ratio(timing["median"], floor_times["fedavg"]["median"]),
                first_round_s=runner.build_s + runner.first_round_s,
            )
        for size in sizes:
            print(f"Scaling: {size} clients per round ...", flush=True)
            if size == n and "fedavg" in runners:
                ours_time = results["fedavg"]["round_time_s"]
            else:
                ours_time = _timed(_ours("fedavg", task, rounds[size], inner_steps, _cohort(size)))
            peer_size = (
                peer_time if size == n else _timed(_peer(task, rounds[size], _INNER_LR.value))
            )
            floor_size = (
                floor_times["fedavg"]
                if size == n
                else _time_floor(tf_floors["fedavg"], rounds[size])
            )
            scaling.append(
                collections.OrderedDict(
                    clients_per_round=size,
                    round_time_s=ours_time["median"],
                    peer_fedavg_round_time_s=peer_size["median"],
                    tf_floor_round_time_s=floor_size["median"],
                    ratio_to_peer_fedavg=_ratio(ours_time["median"], peer_size["median"]),
                    ratio_to_tf_floor=_ratio(ours_time["median"], floor_size["median"]),
                    round_time_range_s=[ours_time["min"], ours_time["max"]],
                )
            )
        for name in _MEMORY_ALGORITHMS.value:
            print(f"Memory: {name}, {_MEMORY_ROUNDS.value} rounds ...", flush=True)
            if name not in runners:
                runners[name] = _ours(name, task, rounds[n], inner_steps, _cohort(n))
            memory[name] = _memory(runners[name], service)
    for floor in tf_floors.values():
        floor.close()

    def fit(key):
        return bm.linear_fit([s["clients_per_round"] for s in scaling], [s[key] for s in scaling])

    first_memory = next(iter(memory.values()), None)
    memory_mb = collections.OrderedDict(
        driver=first_memory["driver"] if first_memory else [],
        worker=first_memory["worker"] if first_memory else [],
    )
    if first_memory:
        memory_mb["algorithm"] = next(iter(memory))
        for key in (
            "rounds",
            "driver_growth_pct_per_100_rounds",
            "worker_growth_pct_per_100_rounds",
        ):
            memory_mb[key] = first_memory[key]
    report = collections.OrderedDict(
        machine=machine,
        task=_TASK.value,
        task_options=dict(num_train_clients=_NUM_TRAIN.value, max_batches=_MAX_BATCHES.value),
        clients_per_round=n,
        cohort_size=_cohort(n),
        timed_rounds=_ROUNDS.value,
        warmup_rounds=_WARMUP.value,
        peer_local_steps_per_client=peer_steps,
        inner_steps=inner_steps,
        inner_lr=_INNER_LR.value,
        # The meta-model each meta-learning algorithm ran with (--meta_model or its default).
        meta_models={
            name: builders.resolved_options(
                name, builders.AlgorithmOptions(meta_model=_META_MODEL.value)
            ).meta_model
            for name in results
            if name in builders.LEARNS_ALPHA
        },
        data_prep_s_per_round=prep_s,
        algorithms=results,
        unstacked=unstacked,
        peer_fedavg_round_time_s=peer_time["median"],
        peer_fedavg=collections.OrderedDict(
            round_time_s=peer_time, first_round_s=peer.build_s + peer.first_round_s
        ),
        tf_floor_round_time_s=floor_times["fedavg"]["median"],
        tf_floors=floor_times,
        scaling=scaling,
        scaling_fit_s=collections.OrderedDict(
            fedavg=fit("round_time_s"),
            peer_fedavg=fit("peer_fedavg_round_time_s"),
            tf_floor=fit("tf_floor_round_time_s"),
        ),
        memory_mb=memory_mb,
        memory=memory,
    )
    report["end_to_end"] = _end_to_end()
    report["workers"] = _workers()
    report["targets"] = bm.targets(report)
    return report


def _end_to_end() -> dict:
    """The training program timed as a user runs it, against the same math in plain TensorFlow
    (`floors.TFFloor`, with the worker's threads per op) and, on sinusoid, the XLA floor."""
    results = collections.OrderedDict()
    for entry in _END_TO_END.value:
        task_name, _, algorithm = entry.partition(":")
        label = f"{task_name} {algorithm}"
        print(f"End to end: {label} ...", flush=True)
        measured = end_to_end.measure(
            task=task_name,
            algorithm=algorithm,
            workdir=os.path.join(tempfile.gettempdir(), "mfl_tff_end_to_end"),
            flags=_END_TO_END_FLAGS.value
            + ([f"--meta_model={_META_MODEL.value}"] if _META_MODEL.value else []),
            warm_rounds=480,
            span=_END_TO_END_SPAN.value,
        )
        task = registry.get_task(task_name)
        options = builders.AlgorithmOptions.from_settings(
            task.settings, meta_model=_META_MODEL.value
        )
        process, spec = builders.build_algorithm(algorithm, task, options)
        round_computation = (
            fused_rounds.fuse(process, spec.phase_computations).computation
            if measured["fused"]
            else process.next
        )
        measured["federated_calls_per_round"] = round_anatomy.intrinsic_calls(round_computation)
        if task_name == "sinusoid":
            floor = floors.XLAFloor(algorithm, task, options, task.settings.clients_per_round)
            floor.run_round()
            measured["xla_floor_ms"] = (
                1000 * bm.summarize(bm.time_calls(lambda _, f=floor: f.run_round(), 200))["median"]
            )
            floor.close()
        # With the worker's threads per op, the floor does the worker's arithmetic as it does.
        threads = worker_lib.configured_intra_op_threads()
        packed = bm.pack_rounds(task, task.settings.clients_per_round, 10)
        floor = floors.TFFloor(algorithm, task, options, packed[0], intra_op_threads=threads)
        measured["tf_floor_ms"] = 1000 * _time_floor(floor, packed)["median"]
        floor.close()
        results[label] = measured
    return results


def _workers() -> list:
    """Round time, driver bytes and CPU per worker with 1 and 2 loopback workers."""
    if not _WORKERS_CLIENTS.value:
        return []
    tasks = {
        data: registry.get_task("digits_fewshot", seed=_SEED.value, data_on_workers=on_workers)
        for data, on_workers in (("sent", False), ("on workers", True))
    }
    clients = [int(n) for n in _WORKERS_CLIENTS.value]
    return worker_scaling.run(
        tasks, _WORKERS_ALGORITHMS.value, clients, meta_model=_META_MODEL.value
    )


def main(argv: list[str]) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)
    if _QUICK.value:
        _apply_quick()
    begin = time.perf_counter()
    report = run()
    report["benchmark_wall_s"] = time.perf_counter() - begin
    directory = os.path.dirname(os.path.abspath(_OUTPUT.value))
    os.makedirs(directory, exist_ok=True)
    with open(_OUTPUT.value, "w") as f:
        json.dump(report, f, indent=1)
    print("\n" + bm.format_report(report))
    if report["workers"]:
        print(worker_scaling.format_rows(report["workers"]) + "\n")
    print(f"Wrote {_OUTPUT.value} ({report['benchmark_wall_s']:.0f} s)")


if __name__ == "__main__":
    app.run(main)
