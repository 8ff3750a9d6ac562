"""Tests of `mfl_tff.data.partition`: Dirichlet label-skew partitions and client sizes."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn import datasets as sk_datasets

from mfl_tff.data import partition

LABELS = sk_datasets.load_digits().target


def _partition(concentration, seed, num_clients=100, labels=LABELS):
    rng = np.random.default_rng(seed)
    return partition.dirichlet_label_partition(labels, num_clients, concentration, rng)


def test_every_example_lands_in_exactly_one_client():
    parts = _partition(0.5, seed=0)
    assert len(parts) == 100
    everything = np.concatenate(parts)
    assert len(everything) == len(LABELS)
    np.testing.assert_array_equal(np.sort(everything), np.arange(len(LABELS)))


def test_client_sizes_are_unequal_and_at_least_two():
    sizes = np.array([len(p) for p in _partition(0.5, seed=0)])
    assert sizes.sum() == len(LABELS)
    assert sizes.min() >= 2
    assert sizes.max() / sizes.min() > 2


def test_label_skew_grows_as_concentration_falls():
    skew = {
        c: np.mean([partition.label_skew(LABELS, _partition(c, seed)) for seed in range(3)])
        for c in (100.0, 1.0, 0.1)
    }
    assert skew[100.0] < skew[1.0] < skew[0.1]
    # A strongly skewed client is dominated by few labels: most of each client is one label.
    top_share = np.mean([np.bincount(LABELS[p]).max() / len(p) for p in _partition(0.1, 0)])
    assert top_share > 0.6


def test_partition_is_deterministic_for_a_seed_and_differs_across_seeds():
    a, b, c = _partition(0.5, 7), _partition(0.5, 7), _partition(0.5, 8)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(len(x) == len(y) and np.array_equal(x, y) for x, y in zip(a, c))


@pytest.mark.parametrize("concentration", [0.0, -1.0])
def test_non_positive_concentration_raises(concentration):
    with pytest.raises(ValueError, match="concentration"):
        _partition(concentration, seed=0)


def test_too_many_clients_for_the_pool_raise():
    with pytest.raises(ValueError, match="fewer clients"):
        _partition(1.0, seed=0, num_clients=len(LABELS) // 2 + 1)


def test_client_sizes_sum_exactly_and_respect_the_minimum():
    for seed in range(5):
        sizes = partition.client_sizes(1000, 37, np.random.default_rng(seed))
        assert len(sizes) == 37
        assert sizes.sum() == 1000
        assert sizes.min() >= 2
    # The smallest possible pool: every client gets exactly two.
    smallest = partition.client_sizes(20, 10, np.random.default_rng(0))
    np.testing.assert_array_equal(smallest, [2] * 10)


def test_label_skew_closed_forms():
    labels = np.array([0, 0, 1, 1, 2, 2])
    # Each client holds the pool's distribution: distance 0.
    assert partition.label_skew(labels, [np.array([0, 2, 4]), np.array([1, 3, 5])]) == 0.0
    # Each client holds one label: TV(one-hot, uniform over 3) = 1 - 1/3.
    one_label = [np.array([0, 1]), np.array([2, 3]), np.array([4, 5])]
    assert partition.label_skew(labels, one_label) == pytest.approx(2 / 3)
