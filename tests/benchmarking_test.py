"""Tests of `experiments.benchmarking`: the peer's datasets take the same steps as our packed
clients, and the statistics helpers."""

from __future__ import annotations

import numpy as np
import pytest

from experiments import benchmarking as bm
from mfl_tff.data import packing

CLIENTS = 3
ROUNDS = 2

pytestmark = pytest.mark.usefixtures("tff_local_execution")


@pytest.fixture(scope="module")
def rounds(small_digits_task):
    return bm.pack_rounds(small_digits_task, CLIENTS, ROUNDS)


def test_peer_dataset_has_one_batch_per_real_packed_batch(rounds):
    for client in rounds[0]:
        batches = list(bm.client_dataset(client))
        assert len(batches) == bm.real_batches(client)
        assert sum(len(y) for _, y in batches) == packing.num_examples(client)
        assert len(list(bm.client_dataset(client, epochs=2))) == 2 * len(batches)


def test_pack_rounds_feeds_what_the_training_program_feeds(small_digits_task, rounds):
    ids = small_digits_task.sample_train_ids(CLIENTS, 2)
    expected = small_digits_task.train_clients(ids, 2)
    for got, want in zip(rounds[1], expected):
        np.testing.assert_array_equal(got["support"]["x"], want["support"]["x"])


def test_summarize_and_fits():
    assert bm.summarize([3.0, 1.0, 2.0]) == {"median": 2.0, "min": 1.0, "max": 3.0, "n": 3}
    with pytest.raises(ValueError):
        bm.summarize([])
    fit = bm.linear_fit([5, 10, 20], [0.02 + 0.001 * n for n in (5, 10, 20)])
    assert fit["fixed"] == pytest.approx(0.02) and fit["per_unit"] == pytest.approx(0.001)
    assert bm.linear_fit([4], [1.0]) == {"fixed": None, "per_unit": None}


def test_growth_ignores_the_first_20_rounds():
    rounds = [0, 10, 20, 30, 40, 120]
    # Warm-up growth (500 -> 1000) is ignored; afterwards 1000 -> 1010 over 100 rounds: 1%.
    values = [500.0, 800.0, 1000.0, 1001.0, 1002.0, 1010.0]
    assert bm.growth_pct_per_100_rounds(rounds, values) == pytest.approx(1.0, rel=0.05)
    assert bm.growth_pct_per_100_rounds([0, 10], [1.0, 2.0]) is None


def _timed_run(round_num: int, ms: float) -> dict:
    return {
        "round": round_num,
        "ms_per_round": ms,
        "driver_cpu_ms_per_round": 11.9,
        "worker_cpu_ms_per_round": 11.6,
    }


def test_end_to_end_table_puts_each_floor_ratio_in_its_column():
    entries = {
        "sinusoid meta_sgd": {
            "near": _timed_run(500, 18.6),
            "far": _timed_run(50020, 16.6),
            "xla_floor_ms": 2.3,
            "tf_floor_ms": 9.3,
        },
        "digits_fewshot mfl": {"near": _timed_run(500, 54.0), "far": _timed_run(50020, 60.0)},
    }
    header, rule, sinusoid, digits = bm.end_to_end_table(entries)
    columns = [c.strip() for c in header.strip("|").split("|")]
    assert len(columns) == rule.count("---")

    def cells(line):
        return dict(zip(columns, (c.strip() for c in line.strip("|").split("|"))))

    row = cells(sinusoid)
    # 18.6 / 2.3 and 18.6 / 9.3: each ratio is the near round over its own floor.
    assert (row["XLA floor ms"], row["x floor"]) == ("2.30", "8.09x")
    assert (row["TF floor ms"], row["x TF floor"]) == ("9.3", "2.00x")
    row = cells(digits)
    assert [row[c] for c in ("XLA floor ms", "x floor", "TF floor ms", "x TF floor")] == ["-"] * 4
    # The near and the far run have columns of the same names; they come in that order.
    values = [c.strip() for c in digits.strip("|").split("|")]
    assert values[1:3] + values[5:7] == ["500", "54.0", "50020", "60.0"]
