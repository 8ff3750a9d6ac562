"""Faulty clients: NaN or Inf data, no data, an update that explodes, a round where every client
fails, and a finite outlier. For fedavg and mfl with the mean and the robust aggregator (and DP
for the first and the fourth): the round completes (or its step is skipped), the global model and
alpha stay finite, and the metrics count the dropped clients. The training program logs why.

A rejected client has weight 0, so under a weighted aggregator the round must equal the same
round without that client; that is checked to 1e-6.

Task, clients and options are aggregation_test.py's (conftest.py, `testing.with_aggregators`), so
the processes both build are built once.
"""

from __future__ import annotations

import collections
import csv

import numpy as np
import pytest
import tensorflow as tf

from mfl_tff.algorithms import builders
from mfl_tff.training import outputs, program, progress
from tests import testing

NUM_CLIENTS = testing.AGGREGATOR_TEST_CLIENTS
FAULTS = ("nan_data", "inf_data", "empty", "exploding_update", "all_fail")

pytestmark = pytest.mark.usefixtures("tff_local_execution")


def faulty(fault: str, client, outlier_scale: float = 1e3):
    """`client` with `fault`."""
    client = testing.copy_client(client)
    if fault in ("nan_data", "all_fail"):
        client["support"]["x"][0, 3, 2, 2] = np.nan
    elif fault == "inf_data":
        client["query"]["x"][1, 0, 4, 4] = -np.inf
    elif fault == "empty":
        client = tf.nest.map_structure(np.zeros_like, client)
    elif fault == "exploding_update":
        # Finite data whose update overflows float32 (or whose norm does).
        for part in ("support", "query"):
            client[part]["x"] *= np.float32(1e30)
    elif fault == "outlier":
        for part in ("support", "query"):
            client[part]["x"] *= np.float32(outlier_scale)
    else:
        raise ValueError(fault)
    return client


def build(task, algorithm, kind):
    settings = dict(noise_multiplier=1.0, clip_norm=0.1) if kind == "dp" else {}
    return testing.with_aggregators(task, algorithm, kind, NUM_CLIENTS, **settings)


def run(process, clients):
    """(move of theta and alpha, flattened metrics) of one round from the initial state."""
    state = process.initialize()
    output = process.next(state, clients)
    before, after = (
        np.concatenate([v for v in testing.model_and_meta(process, s) if v is not None])
        for s in (state, output.state)
    )
    return after - before, progress.flat_metrics(output.metrics)


def ending(metrics, suffix):
    return [int(v) for k, v in metrics.items() if k.split("/")[-1] == suffix]


CASES = [
    (algorithm, kind, fault)
    for algorithm in ("fedavg", "mfl")
    for kind in ("mean", "robust")
    for fault in FAULTS
] + [
    (algorithm, "dp", fault)
    for algorithm in ("fedavg", "mfl")
    for fault in ("nan_data", "all_fail")
]


@pytest.mark.parametrize("algorithm, kind, fault", CASES)
def test_fault_is_dropped_and_the_model_stays_finite(
    fewshot_task, fewshot_clients, algorithm, kind, fault
):
    process = build(fewshot_task, algorithm, kind)
    if fault == "all_fail":
        round_clients = [faulty(fault, c) for c in fewshot_clients]
    else:
        round_clients = [faulty(fault, fewshot_clients[0])] + fewshot_clients[1:]
    move, metrics = run(process, round_clients)
    assert np.all(np.isfinite(move)), metrics

    counts = progress.client_counts(metrics, NUM_CLIENTS)
    expected_dropped = {"all_fail": NUM_CLIENTS}.get(fault, 1)
    assert counts["dropped"] == expected_dropped, counts
    if fault == "empty":
        assert counts["empty"] == 1 and counts["rejected"] == 0
        assert ending(metrics, "num_clients") == [NUM_CLIENTS - 1] * len(
            ending(metrics, "num_clients")
        )
    else:
        # Every client pass (mfl has two) rejected the same clients.
        assert set(ending(metrics, "num_clients_rejected")) == {expected_dropped}, metrics

    skipped = ending(metrics, "update_non_finite")
    if fault == "all_fail" and kind != "dp":
        # 0/0 aggregates: TFF's finalizer (and ours for alpha) skip the step; nothing moves.
        assert skipped and all(s == 1 for s in skipped), metrics
        assert np.all(move == 0.0)
        return
    assert all(s == 0 for s in skipped), metrics
    if kind == "dp":
        return  # Noise differs from run to run; finiteness and the counts are the contract.
    # The faulty client had weight 0: the round is the round of the other clients.
    reference, _ = run(process, fewshot_clients[1:])
    np.testing.assert_allclose(move, reference, rtol=0, atol=1e-6)


@pytest.mark.parametrize("algorithm", ["fedavg", "mfl"])
def test_robust_aggregation_zeroes_a_finite_outlier_that_the_mean_lets_through(
    fewshot_task, fewshot_clients, algorithm
):
    # Large, but small enough that mfl's second-order meta-gradients stay finite.
    scale = 1e3 if algorithm == "fedavg" else 10.0
    outlier = [faulty("outlier", fewshot_clients[0], scale)] + fewshot_clients[1:]
    clean, _ = run(build(fewshot_task, algorithm, "robust"), fewshot_clients[1:])
    robust, metrics = run(build(fewshot_task, algorithm, "robust"), outlier)
    assert sum(ending(metrics, "zeroed_count")) >= 1, metrics
    assert progress.client_counts(metrics, NUM_CLIENTS)["zeroed"] >= 1
    # Zeroed, the outlier adds nothing (its weight still divides, so the move is at most the
    # clean round's).
    assert np.linalg.norm(robust) <= np.linalg.norm(clean) * 1.01
    mean, _ = run(build(fewshot_task, algorithm, "mean"), outlier)
    assert np.all(np.isfinite(mean))
    assert np.linalg.norm(mean) > 5 * np.linalg.norm(clean)


def test_program_logs_dropped_clients_and_skipped_steps(
    fewshot_task, fewshot_clients, tmp_path, monkeypatch
):
    """Round 1: one NaN client; round 2: every client fails. The CSV counts them and the log
    says why."""
    process = build(fewshot_task, "fedavg", "robust")
    spec = builders.AlgorithmSpec(name="fedavg", learns_alpha=False, eval_steps=2)

    def train_clients(ids, round_num=None):
        packed = [testing.copy_client(c) for c in fewshot_clients[: len(ids)]]
        if round_num == 1:
            return [faulty("nan_data", packed[0])] + packed[1:]
        return [faulty("all_fail", c) for c in packed]

    monkeypatch.setattr(fewshot_task, "train_clients", train_clients)
    config = program.ProgramConfig(
        total_rounds=2,
        clients_per_round=NUM_CLIENTS,
        fine_tune_lr=0.4,
        eval_adaptation_steps=2,
        num_eval_clients=2,
    )
    paths = outputs.OutputPaths(str(tmp_path), "faults")
    lines = []
    program.run_training(process, spec, fewshot_task, config, paths, log=lines.append)
    notes = [line for line in lines if line.startswith("note:")]
    assert notes == [
        f"note: round 1 dropped 1 of {NUM_CLIENTS} clients (0 without examples, 1 non-finite, "
        "0 zeroed as outliers)",
        f"note: round 2 dropped {NUM_CLIENTS} of {NUM_CLIENTS} clients (0 without examples, "
        f"{NUM_CLIENTS} non-finite, 0 zeroed as outliers); no finite aggregate, step skipped: "
        "model",
    ], lines
    with open(paths.metrics_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["clients/dropped"]) for r in rows] == [1, NUM_CLIENTS]
    assert [int(r["clients/sampled"]) for r in rows] == [NUM_CLIENTS, NUM_CLIENTS]
    assert [int(r["finalizer/update_non_finite"]) for r in rows] == [0, 1]


def test_client_counts_from_metric_names():
    metrics = collections.OrderedDict(
        [
            ("meta_client_work/num_clients", 9),
            ("meta_client_work/num_clients_rejected", 2),
            ("adaptive_client_work/num_clients", 9),
            ("adaptive_client_work/num_clients_rejected", 3),
            ("model_aggregator/zeroed_count", 1),
            ("model_aggregator/zeroing/clipped_count", 4),
        ]
    )
    counts = progress.client_counts(metrics, 10)
    assert dict(counts) == dict(sampled=10, dropped=5, empty=1, rejected=3, zeroed=1)
    assert progress.dropped_line(7, counts, {"meta_update/update_non_finite": 1}) == (
        "note: round 7 dropped 5 of 10 clients (1 without examples, 3 non-finite, 1 zeroed as "
        "outliers); no finite aggregate, step skipped: meta_update"
    )
    clean = progress.client_counts({"client_work/num_clients": 4}, 4)
    assert clean["dropped"] == 0 and progress.dropped_line(1, clean, {}) == ""
