"""Tests of `mfl_tff.data.packing`: the padded support/query format every computation consumes."""

from __future__ import annotations

import zlib

import numpy as np
import pytest

from mfl_tff.data import packing

FEATURES = 3


def _examples(n: int) -> dict[str, np.ndarray]:
    """`n` examples whose identity is readable from both x (every feature = i + 1) and y (= i)."""
    ids = np.arange(n)
    x = np.repeat((ids + 1.0)[:, None], FEATURES, axis=1).astype(np.float32)
    return {"x": x, "y": ids.astype(np.int32)}


def _real_ids(part) -> np.ndarray:
    """Ids of the real examples of a packed part, in packed (row-major) order."""
    ids = []
    num_batches, batch_size = part["mask"].shape
    for b in range(num_batches):
        for j in range(batch_size):
            if part["mask"][b, j] == 1.0:
                # x and y must tell the same example apart.
                assert np.all(part["x"][b, j] == part["y"][b, j] + 1.0)
                ids.append(int(part["y"][b, j]))
    return np.array(ids, dtype=np.int64)


def _pack(n, split, pack, seed=0):
    return packing.pack_client(_examples(n), split, pack, np.random.default_rng(seed))


def test_every_example_is_packed_exactly_once_with_mask_one():
    packed = _pack(23, packing.SplitSpec(), packing.PackSpec(5, 4, 4))
    support, query = _real_ids(packed["support"]), _real_ids(packed["query"])
    both = np.concatenate([support, query])
    np.testing.assert_array_equal(np.sort(both), np.arange(23))
    # support_fraction 0.5 of 23 examples: 11.5 rounds to 12 (half to even), the rest is query.
    assert len(support) == 12 and len(query) == 11
    assert packing.num_examples(packed) == 23


def test_padding_rows_have_mask_zero_and_zero_features():
    packed = _pack(7, packing.SplitSpec(support_size=3), packing.PackSpec(4, 2, 3))
    for name, real in (("support", 3), ("query", 4)):
        part = packed[name]
        mask = part["mask"]
        assert set(np.unique(mask)) <= {0.0, 1.0}
        assert mask.sum() == real
        # Packing fills batches front to back: the real rows are the first ones.
        np.testing.assert_array_equal(mask.reshape(-1), np.arange(mask.size) < real)
        pad = mask == 0.0
        assert np.all(part["x"][pad] == 0.0)
        assert np.all(part["y"][pad] == 0)


def test_shapes_and_dtypes_follow_the_pack_spec():
    packed = _pack(
        9, packing.SplitSpec(), packing.PackSpec(batch_size=4, support_batches=2, query_batches=3)
    )
    assert packed["support"]["x"].shape == (2, 4, FEATURES)
    assert packed["support"]["y"].shape == (2, 4)
    assert packed["support"]["mask"].shape == (2, 4)
    assert packed["query"]["x"].shape == (3, 4, FEATURES)
    assert packed["support"]["x"].dtype == np.float32
    assert packed["support"]["mask"].dtype == np.float32
    assert packed["support"]["y"].dtype == np.int32


def test_a_client_larger_than_the_cap_keeps_exactly_cap_distinct_own_examples():
    n, cap = 100, 3 * 4
    packed = _pack(n, packing.SplitSpec(support_size=40), packing.PackSpec(4, 3, 3))
    support, query = _real_ids(packed["support"]), _real_ids(packed["query"])
    assert len(support) == cap and len(query) == cap
    both = np.concatenate([support, query])
    assert len(np.unique(both)) == 2 * cap
    assert np.all((both >= 0) & (both < n))


def test_truncation_draws_a_different_subset_for_a_different_generator():
    split, pack = packing.SplitSpec(), packing.PackSpec(4, 2, 2)
    kept = {tuple(np.sort(_real_ids(_pack(60, split, pack, seed)["support"]))) for seed in range(5)}
    # The kept examples are a random subset, not always the same (for example the first) ones.
    assert len(kept) > 1


@pytest.mark.parametrize(
    "spec, n, expected",
    [
        (packing.SplitSpec(), 0, 0),
        (packing.SplitSpec(), 1, 1),
        (packing.SplitSpec(), 2, 1),
        (packing.SplitSpec(), 10, 5),
        (packing.SplitSpec(support_fraction=0.1), 3, 1),  # round(0.3) = 0, at least one
        (packing.SplitSpec(support_fraction=0.9), 5, 4),  # at least one left for query
        (packing.SplitSpec(support_fraction=0.25), 8, 2),
        (packing.SplitSpec(support_size=5), 100, 5),
        (packing.SplitSpec(support_size=5), 3, 2),  # support_size > n: all but one
        (packing.SplitSpec(support_size=5), 6, 5),
        (packing.SplitSpec(support_size=1), 2, 1),
        (packing.SplitSpec(support_size=3), 1, 1),
        (packing.SplitSpec(support_size=3), 0, 0),
        (packing.SplitSpec(query_size=10), 30, 20),  # the rest after the query
        (packing.SplitSpec(query_size=10), 12, 2),
        (packing.SplitSpec(query_size=10), 10, 1),  # query_size >= n: one left for support
        (packing.SplitSpec(query_size=1), 2, 1),
        (packing.SplitSpec(query_size=3), 1, 1),
    ],
)
def test_num_support(spec, n, expected):
    assert spec.num_support(n) == expected


def test_a_one_example_client_packs_it_into_support_and_leaves_query_empty():
    packed = _pack(1, packing.SplitSpec(support_size=4), packing.PackSpec(2, 1, 1))
    np.testing.assert_array_equal(_real_ids(packed["support"]), [0])
    assert packed["query"]["mask"].sum() == 0.0


def test_an_empty_client_packs_to_all_padding():
    packed = packing.pack_client(
        {"x": np.zeros((0, FEATURES), np.float32), "y": np.zeros((0,), np.int32)},
        packing.SplitSpec(),
        packing.PackSpec(2, 1, 1),
        np.random.default_rng(0),
    )
    assert packing.num_examples(packed) == 0


def test_shuffle_false_keeps_the_generated_support_query_cut():
    for seed in range(5):
        packed = _pack(
            10, packing.SplitSpec(support_size=4, shuffle=False), packing.PackSpec(5, 1, 2), seed
        )
        np.testing.assert_array_equal(np.sort(_real_ids(packed["support"])), [0, 1, 2, 3])
        np.testing.assert_array_equal(np.sort(_real_ids(packed["query"])), np.arange(4, 10))


def test_shuffle_true_mixes_the_support_query_cut():
    supports = {
        tuple(
            np.sort(
                _real_ids(
                    _pack(10, packing.SplitSpec(support_size=4), packing.PackSpec(5, 1, 2), seed)[
                        "support"
                    ]
                )
            )
        )
        for seed in range(5)
    }
    assert supports != {(0, 1, 2, 3)}


def test_pack_examples_pads_in_order():
    x = np.arange(14, dtype=np.float32).reshape(7, 2)
    y = np.arange(7, dtype=np.int64)
    part = packing.pack_examples(x, y, num_batches=3, batch_size=4)
    expected_x = np.zeros((12, 2), np.float32)
    expected_x[:7] = x
    np.testing.assert_array_equal(part["x"], expected_x.reshape(3, 4, 2))
    np.testing.assert_array_equal(part["y"].reshape(-1), np.r_[y, np.zeros(5)])
    np.testing.assert_array_equal(part["mask"].reshape(-1), [1] * 7 + [0] * 5)
    assert part["y"].dtype == np.int64


def test_to_dataset_returns_the_real_examples_in_packed_order():
    x = np.arange(14, dtype=np.float32).reshape(7, 2)
    y = np.arange(7, dtype=np.int32) * 10
    part = packing.pack_examples(x, y, num_batches=3, batch_size=4)
    batches = list(packing.to_dataset(part).as_numpy_iterator())
    assert [len(bx) for bx, _ in batches] == [4, 3]
    np.testing.assert_array_equal(np.concatenate([bx for bx, _ in batches]), x)
    np.testing.assert_array_equal(np.concatenate([by for _, by in batches]), y)


def test_to_dataset_inverts_pack_client():
    packed = _pack(17, packing.SplitSpec(), packing.PackSpec(3, 4, 4))
    for name in ("support", "query"):
        batches = list(packing.to_dataset(packed[name]).as_numpy_iterator())
        ys = np.concatenate([by for _, by in batches])
        np.testing.assert_array_equal(ys, _real_ids(packed[name]))
        xs = np.concatenate([bx for bx, _ in batches])
        np.testing.assert_array_equal(xs[:, 0], ys + 1.0)
        assert all(len(bx) == 3 for bx, _ in batches[:-1])


def test_client_seed_is_seed_and_crc32_of_the_id():
    # 0xCBF43926 is the published CRC-32 check value of b"123456789".
    assert packing.client_seed(0, "123456789").entropy == [0, 0xCBF43926]
    expected = np.random.SeedSequence([7, 0xCBF43926]).generate_state(4)
    np.testing.assert_array_equal(packing.client_seed(7, "123456789").generate_state(4), expected)
    cid = "train/00042"
    reference = np.random.SeedSequence([123, zlib.crc32(cid.encode("utf-8"))])
    np.testing.assert_array_equal(
        np.random.default_rng(packing.client_seed(123, cid)).random(5),
        np.random.default_rng(reference).random(5),
    )


def test_client_seed_is_stable_across_calls_and_differs_by_id_and_seed():
    first = packing.client_seed(3, "client_a").generate_state(4)
    np.testing.assert_array_equal(packing.client_seed(3, "client_a").generate_state(4), first)
    assert not np.array_equal(packing.client_seed(3, "client_b").generate_state(4), first)
    assert not np.array_equal(packing.client_seed(4, "client_a").generate_state(4), first)


def test_stack_clients_adds_a_leading_axis():
    spec = packing.PackSpec(2, 1, 2)
    clients = [_pack(n, packing.SplitSpec(), spec) for n in (3, 4, 5)]
    stacked = packing.stack_clients(clients)
    assert stacked["support"]["x"].shape == (3, 1, 2, FEATURES)
    assert stacked["query"]["mask"].shape == (3, 2, 2)
    np.testing.assert_array_equal(stacked["query"]["y"][1], clients[1]["query"]["y"])


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(batch_size=0, support_batches=1, query_batches=1),
        dict(batch_size=1, support_batches=0, query_batches=1),
        dict(batch_size=1, support_batches=1, query_batches=0),
        dict(batch_size=-3, support_batches=1, query_batches=1),
    ],
)
def test_invalid_pack_spec_raises(kwargs):
    with pytest.raises(ValueError):
        packing.PackSpec(**kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(support_size=0),
        dict(support_size=-1),
        dict(query_size=0),
        dict(support_size=2, query_size=3),
        dict(support_fraction=0.0),
        dict(support_fraction=1.0),
        dict(support_fraction=1.5),
        dict(support_fraction=-0.2),
    ],
)
def test_invalid_split_spec_raises(kwargs):
    with pytest.raises(ValueError):
        packing.SplitSpec(**kwargs)


def test_x_and_y_of_different_lengths_raise():
    with pytest.raises(ValueError, match="differ in length"):
        packing.pack_client(
            {"x": np.zeros((4, 2)), "y": np.zeros(3)},
            packing.SplitSpec(),
            packing.PackSpec(2, 2, 2),
            np.random.default_rng(0),
        )


def test_a_fixed_query_size_gives_clients_of_any_size_their_own_support():
    # Generated clients with support first and a fixed query (shots=(lo, hi) tasks).
    split, pack = packing.SplitSpec(query_size=4, shuffle=False), packing.PackSpec(6, 1, 1)
    for n in (5, 7, 10):
        packed = _pack(n, split, pack)
        np.testing.assert_array_equal(np.sort(_real_ids(packed["support"])), np.arange(n - 4))
        np.testing.assert_array_equal(np.sort(_real_ids(packed["query"])), np.arange(n - 4, n))
        assert packed["support"]["mask"].sum() == n - 4
