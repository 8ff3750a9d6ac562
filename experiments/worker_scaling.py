"""Round time, driver bytes and worker CPU with one and with several TFF workers (benchmark part).

For each algorithm, clients per round and number of workers, loopback `worker_binary`s are
started for the measurement and stopped after it, and the round runs as the training program
runs it (`mfl_tff.training.rounds.next_round`; mfl phase by phase under several workers), on
client data packed before the clock starts. Reported per round:

* `ms_per_round`: median wall time of the timed rounds;
* `driver_mb_per_round`: what the driver hands TFF per round, counted from the values: every
  client value's arrays (each goes to the one worker that trains it) plus the server state,
  which every worker of a call receives, once per call (two calls for a two-phase round);
* `driver_cpu_ms_per_round` and `worker_cpu_ms_per_round` (each worker's, from the OS).

The workers of one machine share its cores, so the times of several loopback workers say what
the split costs, not what several machines gain: the CPU per worker is the number to read (see
the README's "Several workers" for what it predicts). `data`: `sent` packs every client's
tensors on the driver; `on workers` (`data_on_workers=True`, digits tasks) sends row indices and
the workers gather the images from the pool their computation carries (sent once with the
computation, not counted per round).
"""

from __future__ import annotations

import collections
import contextlib
import os
import statistics
import time
from collections.abc import Sequence
from typing import Optional

import numpy as np
import psutil
import tensorflow as tf

from mfl_tff.algorithms import builders, communication
from mfl_tff.training import multi_worker, rounds, runtime


def _cpu_s(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


def driver_bytes_per_round(process, spec, values: list, num_workers: int) -> int:
    """Bytes the driver hands TFF for one round on client `values` (module docstring)."""
    data = sum(np.asarray(a).nbytes for a in tf.nest.flatten(values))
    state = communication.type_bytes(process.next.type_signature.parameter[0])
    calls = max(1, len(spec.phase_computations)) if num_workers > 1 else 1
    return calls * (data + state * num_workers)


def measure(
    task,
    algorithm: str,
    *,
    data: str = "sent",
    clients_per_round: int,
    num_workers: int,
    rounds_timed: int = 10,
    warmup_rounds: int = 2,
    cohort_size: int = 25,
    meta_model: Optional[str] = None,
) -> collections.OrderedDict:
    """One row of the table (module docstring) for `num_workers` loopback workers; `meta_model`
    None is the algorithm's default."""
    options = builders.AlgorithmOptions.from_settings(
        task.settings,
        meta_model=meta_model,
        cohort_size=multi_worker.cohort_size_for(cohort_size, clients_per_round, num_workers),
        # Round times are what long runs see, and long runs vectorize their cohorts.
        vectorize_cohorts=True,
    )
    process, spec = builders.build_algorithm(algorithm, task, options)
    total = warmup_rounds + rounds_timed
    round_values = [
        rounds.round_values(task, spec, rounds.round_client_ids(task, clients_per_round, r), r)
        for r in range(1, total + 1)
    ]
    with contextlib.ExitStack() as stack:
        services = [stack.enter_context(runtime.WorkerService()) for _ in range(num_workers)]
        targets = [s.target for s in services]
        stack.enter_context(
            runtime.remote_execution(targets if num_workers > 1 else targets[0], timeout_s=30.0)
        )
        state = process.initialize()
        for values in round_values[:warmup_rounds]:
            state, _ = rounds.next_round(process, spec, state, values)
        cpu_before = {s.pid: _cpu_s(s.pid) for s in services}
        driver_before = _cpu_s(os.getpid())
        times = []
        for values in round_values[warmup_rounds:]:
            begin = time.perf_counter()
            state, _ = rounds.next_round(process, spec, state, values)
            times.append(time.perf_counter() - begin)
        driver_cpu = _cpu_s(os.getpid()) - driver_before
        worker_cpu = [_cpu_s(s.pid) - cpu_before[s.pid] for s in services]
    sent = [driver_bytes_per_round(process, spec, v, num_workers) for v in round_values]
    return collections.OrderedDict(
        algorithm=algorithm,
        data=data,
        clients_per_round=clients_per_round,
        workers=num_workers,
        ms_per_round=1000 * statistics.median(times),
        driver_mb_per_round=statistics.mean(sent) / 1e6,
        driver_cpu_ms_per_round=1000 * driver_cpu / rounds_timed,
        worker_cpu_ms_per_round=[round(1000 * c / rounds_timed, 1) for c in worker_cpu],
    )


def run(
    tasks: dict,
    algorithms: Sequence[str],
    clients: Sequence[int],
    workers: Sequence[int] = (1, 2),
    *,
    rounds_timed: int = 10,
    meta_model: Optional[str] = None,
    log=print,
) -> list:
    """The rows for every (algorithm, clients per round, data placement, workers).

    Args:
      tasks: `{data label: task}`, e.g. `{"sent": task, "on workers": pool_task}`.
      meta_model: mfl's and meta_sgd's meta-model; None: each algorithm's default.
    """
    rows = []
    for algorithm in algorithms:
        for n in clients:
            for data, task in tasks.items():
                for num_workers in workers:
                    log(f"Workers: {algorithm}, {n} clients, data {data}, {num_workers} worker(s)")
                    rows.append(
                        measure(
                            task,
                            algorithm,
                            data=data,
                            clients_per_round=n,
                            num_workers=num_workers,
                            rounds_timed=rounds_timed,
                            meta_model=meta_model,
                        )
                    )
    return rows


def format_rows(rows: Sequence[dict]) -> str:
    lines = [
        "| algorithm | clients | data | workers | ms/round | driver MB/round | driver CPU ms/round "
        "| worker CPU ms/round (each) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['algorithm']} | {r['clients_per_round']} | {r['data']} | {r['workers']} | "
            f"{r['ms_per_round']:.0f} | {r['driver_mb_per_round']:.3f} | "
            f"{r['driver_cpu_ms_per_round']:.0f} | "
            f"{' / '.join(f'{c:.0f}' for c in r['worker_cpu_ms_per_round'])} |"
        )
    return "\n".join(lines)
