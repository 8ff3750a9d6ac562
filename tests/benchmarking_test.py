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
