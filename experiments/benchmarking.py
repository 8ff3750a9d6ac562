"""Performance measurement for `experiments/benchmark.py`: TFF's own FedAvg (the peer), round
timing, scaling fits, process memory, targets and report tables.

Three ways to run the same round on the same packed clients:

* ours: an mfl_tff `LearningProcess` (`builders.build_algorithm`) fed what the training program
  feeds it, `spec.client_values(task.train_clients(ids, round_num))`, packed before timing;
* the peer: `tff.learning.algorithms.build_weighted_fed_avg` with the same FunctionalModel, fed
  each client as a `tf.data.Dataset` of the same real batches (support, then query), as TFF users
  do; one SGD step per batch, so its local steps equal our FedAvg's;
* the floor (`experiments.floors.TFFloor`): the algorithm's own client functions for all
  clients at once in one plain-TensorFlow graph, with no TFF runtime: the cost of the arithmetic
  itself.
"""

from __future__ import annotations

import collections
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any, Optional

import numpy as np
import psutil
import tensorflow as tf
import tensorflow_federated as tff

from mfl_tff.data import packing
from mfl_tff.training import rounds


def machine_info() -> dict:
    """What the numbers were measured on."""
    model = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return collections.OrderedDict(
        cpus=os.cpu_count(),
        cpu_model=model,
        gpus=len(tf.config.list_physical_devices("GPU")),
        memory_gb=round(psutil.virtual_memory().total / 2**30, 1),
        platform=platform.platform(),
        python=platform.python_version(),
        tensorflow=tf.__version__,
        tensorflow_federated=tff.__version__,
        load_average=[round(x, 2) for x in os.getloadavg()],
    )


def summarize(seconds: Sequence[float]) -> collections.OrderedDict:
    """Median, min and max of repeated timings (seconds)."""
    if not seconds:
        raise ValueError("No timings to summarize.")
    return collections.OrderedDict(
        median=float(statistics.median(seconds)),
        min=float(min(seconds)),
        max=float(max(seconds)),
        n=len(seconds),
    )


def time_calls(fn: Callable[[int], Any], calls: int, *, start: int = 0) -> list[float]:
    """Wall seconds of `fn(i)` for i = start .. start + calls - 1, one timing per call."""
    times = []
    for i in range(start, start + calls):
        begin = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - begin)
    return times


def linear_fit(xs: Sequence[float], ys: Sequence[float]) -> collections.OrderedDict:
    """Least-squares `y = fixed + per_unit * x` (e.g. round time against clients per round)."""
    if len(xs) < 2 or len(set(xs)) < 2:
        return collections.OrderedDict(fixed=None, per_unit=None)
    per_unit, fixed = np.polyfit(np.asarray(xs, np.float64), np.asarray(ys, np.float64), 1)
    return collections.OrderedDict(fixed=float(fixed), per_unit=float(per_unit))


def growth_pct_per_100_rounds(
    rounds: Sequence[int], values: Sequence[float], *, skip: int = 20
) -> Optional[float]:
    """Slope of `values` against `rounds` after round `skip`, per 100 rounds, in percent of the
    value at the first sample after `skip` (None with fewer than two such samples)."""
    points = [(r, v) for r, v in zip(rounds, values) if r >= skip]
    if len(points) < 2:
        return None
    fit = linear_fit([r for r, _ in points], [v for _, v in points])
    return 100.0 * fit["per_unit"] * 100.0 / points[0][1]


def rss_mb(pid: Optional[int] = None) -> float:
    """Resident memory of process `pid` (default: this one) in MiB."""
    return psutil.Process(pid).memory_info().rss / 2**20


# ---------------------------------------------------------------------------------------------
# Round data, packed before any timing.
# ---------------------------------------------------------------------------------------------


def pack_rounds(task, clients_per_round: int, num_rounds: int) -> list[list]:
    """The packed clients of rounds 1..num_rounds, sampled and split as the training program
    does (`mfl_tff.training.rounds`); cohorts are stacked later, the floor and the peer take
    clients."""
    return [
        task.train_clients(rounds.round_client_ids(task, clients_per_round, r), r)
        for r in range(1, num_rounds + 1)
    ]


def client_dataset(client, epochs: int = 1) -> tf.data.Dataset:
    """A packed client's real batches as a `tf.data.Dataset` (support, then query), `epochs`
    times: what TFF's FedAvg iterates over to take the same steps as our FedAvg."""
    dataset = packing.to_dataset(client["support"]).concatenate(packing.to_dataset(client["query"]))
    return dataset.repeat(epochs) if epochs > 1 else dataset


def real_batches(client) -> int:
    """Non-empty batches of a packed client (support and query): the peer's local SGD steps."""
    return int(sum(np.sum(np.sum(part["mask"], axis=1) > 0) for part in client.values()))


def build_peer_fedavg(task, *, learning_rate: float) -> tff.learning.templates.LearningProcess:
    """TFF's own FedAvg with the task's model, client SGD at `learning_rate`, server SGD 1.0."""
    return tff.learning.algorithms.build_weighted_fed_avg(
        task.model_fn(),
        client_optimizer_fn=tff.learning.optimizers.build_sgdm(learning_rate=learning_rate),
        server_optimizer_fn=tff.learning.optimizers.build_sgdm(learning_rate=1.0),
    )


def _next(process, state, values) -> tuple:
    output = process.next(state, values)
    return output.state, output.metrics


class ProcessRunner:
    """Runs a `LearningProcess` on round data prepared in advance, cycling through it.

    Attributes:
      build_s: Seconds spent building the process (tracing its computations), if given.
      first_round_s: Seconds of `initialize()` plus the first `next` (TFF compiles on first use).
    """

    def __init__(
        self,
        process,
        round_values: Sequence,
        *,
        build_s: float = 0.0,
        round_fn: Optional[Callable[[Any, Any], tuple]] = None,
    ):
        """`round_fn(state, values) -> (state, metrics)` runs a round in place of
        `process.next` (a `mfl_tff.training.fused_rounds.FusedRound`)."""
        if not round_values:
            raise ValueError("round_values is empty.")
        self._round = round_fn or (lambda state, values: _next(process, state, values))
        self._values = list(round_values)
        self.build_s = build_s
        begin = time.perf_counter()
        self._state = process.initialize()
        self.run_round(0)
        self.first_round_s = time.perf_counter() - begin

    def run_round(self, i: int):
        """Runs one round on the prepared data of round `i` (cycled); returns its metrics."""
        self._state, metrics = self._round(self._state, self._values[i % len(self._values)])
        return metrics

    @property
    def state(self):
        return self._state


# ---------------------------------------------------------------------------------------------
# Reports.
# ---------------------------------------------------------------------------------------------


def _ratio(a, b):
    return a / b if a is not None and b else None


def _ms(seconds) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.1f}"


def _x(ratio) -> str:
    return "-" if ratio is None else f"{ratio:.2f}x"


def _pct(value) -> str:
    return "-" if value is None else f"{value:+.2f}%"


def targets(report: dict) -> list:
    """The performance targets (README, issue 5) with the measured values of a benchmark report
    (`experiments/benchmark.py`); they are meant for digits at 20 clients per round."""
    rows = []
    limits = dict(fedavg=0.2, mfl=0.4, maml=0.5, meta_sgd=0.5)
    for name, limit in limits.items():
        if name in report["algorithms"]:
            value = report["algorithms"][name]["ratio_to_peer_fedavg"]
            rows.append((f"{name} round / peer FedAvg round", value, limit))
    if "fedavg" in report["algorithms"]:
        rows.append(
            ("fedavg round / TF floor", report["algorithms"]["fedavg"]["ratio_to_tf_floor"], 3.0)
        )
        slowest = max(r["first_round_s"] for r in report["algorithms"].values())
        rows.append(("slowest time to first round (s)", slowest, 10.0))
        fused = [r["fused"]["first_round_s"] for r in report["algorithms"].values() if "fused" in r]
        if fused:
            rows.append(("slowest time to first round, vectorized + fused (s)", max(fused), 10.0))
    for name, run in report["memory"].items():
        for proc in ("driver", "worker"):
            value = run[f"{proc}_growth_pct_per_100_rounds"]
            rows.append((f"{name} {proc} memory growth % per 100 rounds", value, 2.0))
    e2e_limits = {"sinusoid meta_sgd": 15.0, "digits_fewshot mfl": 40.0}
    for label, entry in report.get("end_to_end", {}).items():
        near, far = entry["near"]["ms_per_round"], entry["far"]["ms_per_round"]
        if label in e2e_limits:
            rows.append((f"{label}: training program ms per round", near, e2e_limits[label]))
        rows.append((f"{label}: round ~50,000 / round ~500", _ratio(far, near), 1.1))
        if entry.get("xla_floor_ms"):
            rows.append(
                (
                    f"{label}: training program / XLA floor",
                    _ratio(near, entry["xla_floor_ms"]),
                    20.0,
                )
            )
    return [
        collections.OrderedDict(
            target=label, value=value, limit=limit, met=None if value is None else value <= limit
        )
        for label, value, limit in rows
    ]


def _calls(entry: dict) -> str:
    """A round's intrinsic calls (`experiments.round_anatomy`), or '-' if not counted."""
    calls = entry.get("federated_calls_per_round")
    return "-" if not calls else str(calls["intrinsic_calls"])


def end_to_end_table(end_to_end: dict) -> list[str]:
    """The end-to-end section (`report["end_to_end"]`) as markdown table lines: each training
    program's round time near round 500 and far, its CPU, and its ratio to each floor measured."""
    lines = [
        "| training program (end to end) | round | ms per round | driver CPU ms "
        "| worker CPU ms | round | ms per round | XLA floor ms | x floor | TF floor ms "
        "| x TF floor | intrinsic calls |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, entry in end_to_end.items():
        near, far = entry["near"], entry["far"]
        floor, tf_floor = entry.get("xla_floor_ms"), entry.get("tf_floor_ms")
        lines.append(
            f"| {label} | {near['round']} | {near['ms_per_round']:.1f} | "
            f"{near['driver_cpu_ms_per_round']:.1f} | {near['worker_cpu_ms_per_round']:.1f} | "
            f"{far['round']} | {far['ms_per_round']:.1f} | "
            f"{'-' if floor is None else f'{floor:.2f}'} | "
            f"{_x(_ratio(near['ms_per_round'], floor))} | "
            f"{'-' if tf_floor is None else f'{tf_floor:.1f}'} | "
            f"{_x(_ratio(near['ms_per_round'], tf_floor))} | {_calls(entry)} |"
        )
    return lines


def format_report(report: dict) -> str:
    """A benchmark report as markdown tables: rounds, scaling, memory, targets."""
    peer = report["peer_fedavg_round_time_s"]
    lines = [
        f"Task `{report['task']}` ({report['task_options']}), "
        f"{report['clients_per_round']} clients per round, cohort {report['cohort_size']}, "
        f"{report['peer_local_steps_per_client']:.2f} local steps per client (peer), "
        f"inner steps {report['inner_steps']}; "
        f"{report['machine']['cpus']} CPUs, {report['machine']['gpus']} GPUs.",
        "",
        "| algorithm | round ms (median) | min-max ms | x peer FedAvg | TF floor ms | x floor "
        "| first round s | intrinsic calls |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def row(label, entry):
        t = entry["round_time_s"]
        floor = entry.get("tf_floor_round_time_s")
        floor_ms = _ms(floor["median"]) if isinstance(floor, dict) else _ms(floor)
        lines.append(
            f"| {label} | {_ms(t['median'])} | {_ms(t['min'])}-{_ms(t['max'])} | "
            f"{_x(entry['ratio_to_peer_fedavg'])} | {floor_ms} | {_x(entry['ratio_to_tf_floor'])} "
            f"| {entry['first_round_s']:.1f} | {_calls(entry)} |"
        )

    for name, entry in report["algorithms"].items():
        row(name, entry)
        if "fused" in entry:
            row(f"{name}, vectorized + fused", entry["fused"])
    for name, entry in report["unstacked"].items():
        row(
            f"{name} (no cohorts)",
            dict(entry, tf_floor_round_time_s=report["tf_floor_round_time_s"]),
        )
    p = report["peer_fedavg"]
    lines.append(
        f"| TFF build_weighted_fed_avg (peer) | {_ms(peer)} | {_ms(p['round_time_s']['min'])}-"
        f"{_ms(p['round_time_s']['max'])} | 1.00x | {_ms(report['tf_floor_round_time_s'])} | "
        f"{_x(_ratio(peer, report['tf_floor_round_time_s']))} | {p['first_round_s']:.1f} | - |"
    )
    lines += [
        "",
        "| clients per round | ours fedavg ms | peer ms | TF floor ms | x peer | x floor |",
        "|---|---|---|---|---|---|",
    ]
    for s in report["scaling"]:
        lines.append(
            f"| {s['clients_per_round']} | {_ms(s['round_time_s'])} | "
            f"{_ms(s['peer_fedavg_round_time_s'])} | {_ms(s['tf_floor_round_time_s'])} | "
            f"{_x(s['ratio_to_peer_fedavg'])} | {_x(s['ratio_to_tf_floor'])} |"
        )
    fits = report["scaling_fit_s"]
    lines.append("")
    lines.append(
        "Fit, round time = fixed + per client x clients: "
        + "; ".join(
            f"{name} {_ms(f['fixed'])} ms + {_ms(f['per_unit'])} ms"
            for name, f in fits.items()
            if f["fixed"] is not None
        )
    )
    lines += [
        "",
        "| memory run | rounds | driver MB first -> last | driver growth /100 rounds | "
        "worker MB first -> last | worker growth /100 rounds |",
        "|---|---|---|---|---|---|",
    ]
    for name, m in report["memory"].items():
        lines.append(
            f"| {name} | {m['rounds'][-1]} | {m['driver'][0]:.0f} -> {m['driver'][-1]:.0f} | "
            f"{_pct(m['driver_growth_pct_per_100_rounds'])} | {m['worker'][0]:.0f} -> "
            f"{m['worker'][-1]:.0f} | {_pct(m['worker_growth_pct_per_100_rounds'])} |"
        )
    if report.get("end_to_end"):
        lines += [""] + end_to_end_table(report["end_to_end"])
    lines += ["", "| target | measured | limit | met |", "|---|---|---|---|"]
    for t in report["targets"]:
        value = "-" if t["value"] is None else f"{t['value']:.3g}"
        met = "-" if t["met"] is None else ("yes" if t["met"] else "NO")
        lines.append(f"| {t['target']} | {value} | {t['limit']:g} | {met} |")
    return "\n".join(lines) + "\n"
