"""Tests of `mfl_tff.data.digits`: the `digits` and `digits_fewshot` tasks on sklearn's images.

Every image is traced back to its index in scikit-learn's raw `load_digits` (the 1,797 images are
pairwise distinct), so coverage, disjointness and labels are checked against the raw data set.
"""

from __future__ import annotations

import collections

import numpy as np
import pytest
from sklearn import datasets as sk_datasets

from mfl_tff.data import digits

RAW = sk_datasets.load_digits()
NUM_IMAGES = 1797
# Raw pixels are the integers 0..16; the task scales them to [0, 1].
INDEX_OF = {img.astype(np.int64).tobytes(): i for i, img in enumerate(RAW.images)}


def _indices(x: np.ndarray) -> np.ndarray:
    """Sklearn index of each [8, 8] image in `x` (raises KeyError if one is not a digits image)."""
    raw = np.rint(np.asarray(x) * 16.0).astype(np.int64)
    np.testing.assert_allclose(np.asarray(x) * 16.0, raw, atol=1e-5)
    return np.array([INDEX_OF[img.tobytes()] for img in raw], dtype=np.int64)


def test_raw_images_are_distinct():
    assert len(INDEX_OF) == NUM_IMAGES == len(RAW.images)


@pytest.fixture(scope="module")
def digits_task():
    return digits.build_digits()


def _all_clients(task):
    for data in (task.train_data, task.eval_data):
        for cid in data.client_ids:
            yield cid, data.client_arrays(cid)


def test_train_and_eval_clients_cover_every_image_exactly_once(digits_task):
    assert len(digits_task.train_data.client_ids) == 80
    assert len(digits_task.eval_data.client_ids) == 20
    train, held_out = [], []
    for cid, arrays in _all_clients(digits_task):
        idx = _indices(arrays["x"])
        np.testing.assert_array_equal(arrays["y"], RAW.target[idx])
        (train if cid.startswith("train/") else held_out).append(idx)
    train, held_out = np.concatenate(train), np.concatenate(held_out)
    assert not set(train) & set(held_out)
    np.testing.assert_array_equal(np.sort(np.concatenate([train, held_out])), np.arange(NUM_IMAGES))


def test_packed_clients_hold_only_the_clients_own_images(digits_task):
    ids = digits_task.train_data.client_ids[:10]
    for cid, packed in zip(ids, digits_task.train_clients(ids)):
        own = set(_indices(digits_task.train_data.client_arrays(cid)["x"]))
        for part in packed.values():
            real = part["mask"] > 0
            idx = _indices(part["x"][real])
            assert set(idx) <= own
            np.testing.assert_array_equal(part["y"][real], RAW.target[idx])


def test_clients_are_label_skewed(digits_task):
    # Dirichlet(0.5) skew: a typical client's most common digit is far above the pool's 10%.
    shares = [
        np.bincount(arrays["y"], minlength=10).max() / len(arrays["y"])
        for _, arrays in _all_clients(digits_task)
    ]
    assert np.median(shares) > 0.3


def _client_images(task):
    return {cid: _indices(arrays["x"]).tolist() for cid, arrays in _all_clients(task)}


def test_partition_is_deterministic_for_a_seed_and_differs_across_seeds(digits_task):
    same = _client_images(digits.build_digits(seed=0))
    assert same == _client_images(digits_task)
    assert _client_images(digits.build_digits(seed=1)) != same


@pytest.mark.parametrize("shots", [1, 3, 7])
def test_shots_sets_the_support_size(shots):
    task = digits.build_digits(shots=shots, batch_size=5, max_batches=8)
    ids = task.train_data.client_ids[:30] + task.eval_data.client_ids[:5]
    packed = task.train_clients(ids[:30]) + task.eval_clients(ids[30:])
    for cid, client in zip(ids, packed):
        data = task.train_data if cid.startswith("train/") else task.eval_data
        n = len(data.client_arrays(cid)["y"])
        support = min(shots, n - 1)
        assert client["support"]["mask"].sum() == support
        assert client["query"]["mask"].sum() == min(n - support, 40)


def test_without_shots_clients_split_in_half_up_to_the_cap(digits_task):
    ids = digits_task.train_data.client_ids
    for cid, client in zip(ids, digits_task.train_clients(ids)):
        n = len(digits_task.train_data.client_arrays(cid)["y"])
        support = client["support"]["mask"].sum()
        assert support == min(max(1, round(n / 2)), 40)
        assert client["support"]["x"].shape == (4, 10, 8, 8)


@pytest.mark.parametrize(
    "options",
    [
        dict(num_train_clients=0),
        dict(num_eval_clients=0),
        dict(batch_size=0),
        dict(max_batches=0),
        dict(shots=0),
        dict(dirichlet_concentration=0.0),
        dict(num_train_clients=800, num_eval_clients=100),  # 1,797 < 2 examples x 900 clients
        dict(model="rnn"),
    ],
)
def test_bad_options_raise_value_error(options):
    with pytest.raises(ValueError):
        digits.build_digits(**options)


# digits_fewshot ------------------------------------------------------------------------------

WAYS, SHOTS, QUERY = 5, 5, 10


@pytest.fixture(scope="module")
def fewshot_task():
    return digits.build_digits_fewshot(ways=WAYS, shots=SHOTS, query_shots=QUERY)


def _mapping(arrays) -> tuple:
    """Local label -> true digit of a few-shot client (asserting that it is a function)."""
    true = RAW.target[_indices(arrays["x"])]
    mapping = []
    for local in range(WAYS):
        digits_of_label = set(true[arrays["y"] == local])
        assert len(digits_of_label) == 1
        mapping.append(digits_of_label.pop())
    assert len(set(mapping)) == WAYS
    return tuple(mapping)


def test_fewshot_clients_have_ways_labels_with_k_support_and_q_query_each(fewshot_task):
    for data in (fewshot_task.train_data, fewshot_task.eval_data):
        for cid in data.client_ids[:20]:
            arrays = data.client_arrays(cid)
            y = arrays["y"]
            assert len(y) == WAYS * (SHOTS + QUERY)
            support, query = y[: WAYS * SHOTS], y[WAYS * SHOTS :]
            assert collections.Counter(support) == {k: SHOTS for k in range(WAYS)}
            assert collections.Counter(query) == {k: QUERY for k in range(WAYS)}
            assert len(set(_indices(arrays["x"]))) == len(y)  # no image twice in a client


def test_fewshot_packed_support_is_the_generated_support(fewshot_task):
    ids = fewshot_task.train_data.client_ids[:10]
    for cid, packed in zip(ids, fewshot_task.train_clients(ids)):
        idx = _indices(fewshot_task.train_data.client_arrays(cid)["x"])
        support, query = packed["support"], packed["query"]
        assert support["mask"].shape == (1, WAYS * SHOTS) and support["mask"].sum() == 25
        assert query["mask"].shape == (2, WAYS * SHOTS) and query["mask"].sum() == 50
        assert set(_indices(support["x"][support["mask"] > 0])) == set(idx[: WAYS * SHOTS])
        assert set(_indices(query["x"][query["mask"] > 0])) == set(idx[WAYS * SHOTS :])


def test_each_local_label_is_one_digit_and_the_mapping_differs_between_clients(fewshot_task):
    mappings = [
        _mapping(fewshot_task.train_data.client_arrays(cid))
        for cid in fewshot_task.train_data.client_ids[:30]
    ]
    assert len(set(mappings)) > 20
    # Across clients, local label 0 means many different digits.
    assert len({m[0] for m in mappings}) >= 6
    for cid in fewshot_task.eval_data.client_ids[:10]:
        _mapping(fewshot_task.eval_data.client_arrays(cid))


def test_train_and_held_out_clients_use_disjoint_images(fewshot_task):
    train = set()
    for cid in fewshot_task.train_data.client_ids[:300]:
        train |= set(_indices(fewshot_task.train_data.client_arrays(cid)["x"]))
    held_out = set()
    for cid in fewshot_task.eval_data.client_ids[:100]:
        held_out |= set(_indices(fewshot_task.eval_data.client_arrays(cid)["x"]))
    assert not train & held_out
    # The pools are large: 300 clients reach most of the training images.
    assert len(train) > 0.5 * NUM_IMAGES and len(held_out) > 0.2 * NUM_IMAGES


def test_fewshot_clients_are_reproducible_from_their_id(fewshot_task):
    rebuilt = digits.build_digits_fewshot(ways=WAYS, shots=SHOTS, query_shots=QUERY)
    other_seed = digits.build_digits_fewshot(ways=WAYS, shots=SHOTS, query_shots=QUERY, seed=1)
    for cid in ("train/0000000", "train/0012345"):
        first = fewshot_task.train_data.client_arrays(cid)
        again = rebuilt.train_data.client_arrays(cid)
        np.testing.assert_array_equal(first["x"], again["x"])
        np.testing.assert_array_equal(first["y"], again["y"])
        packed, packed_again = fewshot_task.train_clients([cid])[0], rebuilt.train_clients([cid])[0]
        np.testing.assert_array_equal(packed["support"]["x"], packed_again["support"]["x"])
        assert not np.array_equal(other_seed.train_data.client_arrays(cid)["x"], first["x"])
    # Different ids are different tasks.
    a = fewshot_task.train_data.client_arrays("train/0000001")["x"]
    b = fewshot_task.train_data.client_arrays("train/0000002")["x"]
    assert not np.array_equal(a, b)


def test_fewshot_model_has_one_logit_per_way():
    task = digits.build_digits_fewshot(ways=3, shots=1, query_shots=2, num_train_clients=5)
    model = task.model_fn()
    assert model.initial_weights[0][-1].shape == (3,)


@pytest.mark.parametrize(
    "options",
    [
        dict(shots=50, query_shots=10),  # the rarest held-out digit has 52 images
        dict(shots=1, query_shots=52),
        dict(ways=11),
        dict(ways=0),
        dict(shots=0),
        dict(query_shots=0),
        dict(num_train_clients=0),
        dict(num_eval_clients=0),
        dict(model="rnn"),
    ],
)
def test_fewshot_bad_options_raise_value_error(options):
    with pytest.raises(ValueError):
        digits.build_digits_fewshot(**options)


def test_fewshot_largest_valid_shots_build():
    task = digits.build_digits_fewshot(shots=42, query_shots=10, num_train_clients=3)
    assert len(task.eval_data.client_arrays("eval/0000000")["y"]) == 5 * 52


# digits_fewshot with a shot range: each client its own K ------------------------------------


@pytest.fixture(scope="module")
def ranged_task():
    return digits.build_digits_fewshot(
        ways=WAYS, shots=(1, 10), query_shots=QUERY, num_train_clients=200, num_eval_clients=20
    )


def test_a_shot_range_gives_each_client_balanced_support_of_its_own_size(ranged_task):
    assert ranged_task.settings.shots == (1, 10)
    drawn = []
    for data, pack in (
        (ranged_task.train_data, ranged_task.train_clients),
        (ranged_task.eval_data, ranged_task.eval_clients),
    ):
        for cid in data.client_ids[:20]:
            k = digits.fewshot_shots(cid, (1, 10), seed=0)
            assert 1 <= k <= 10
            drawn.append(k)
            arrays = data.client_arrays(cid)
            assert len(arrays["y"]) == WAYS * (k + QUERY)
            (packed,) = pack([cid])
            support, query = packed["support"], packed["query"]
            # One support batch of ways * hi examples; the mask counts ways * K real ones.
            assert support["mask"].shape == (1, WAYS * 10)
            assert support["mask"].sum() == WAYS * k
            assert query["mask"].sum() == WAYS * QUERY
            labels = support["y"][support["mask"] > 0]
            assert collections.Counter(labels.tolist()) == {c: k for c in range(WAYS)}
            idx = _indices(arrays["x"])
            assert set(_indices(support["x"][support["mask"] > 0])) == set(idx[: WAYS * k])
            _mapping(arrays)
    assert len(set(drawn)) >= 6
    again = digits.build_digits_fewshot(ways=WAYS, shots=(1, 10), query_shots=QUERY)
    cid = ranged_task.train_data.client_ids[7]
    np.testing.assert_array_equal(
        ranged_task.train_data.client_arrays(cid)["x"], again.train_data.client_arrays(cid)["x"]
    )


def test_an_integer_shot_count_is_unchanged_by_the_range_option(fewshot_task):
    # A range of one count is that count, and builds the clients an integer builds.
    same = digits.build_digits_fewshot(ways=WAYS, shots=(SHOTS, SHOTS), query_shots=QUERY)
    assert same.settings == fewshot_task.settings
    assert same.train_split == fewshot_task.train_split
    assert same.train_pack == fewshot_task.train_pack
    cid = fewshot_task.train_data.client_ids[3]
    a, b = fewshot_task.train_clients([cid])[0], same.train_clients([cid])[0]
    for part in ("support", "query"):
        for key in ("x", "y", "mask"):
            np.testing.assert_array_equal(a[part][key], b[part][key])


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(shots=(0, 3)), "lo >= 1"),
        (dict(shots=(4, 2)), "lo > hi"),
        (dict(shots=(1, 43), query_shots=10), "hi \\+ query_shots = 53"),
    ],
)
def test_fewshot_bad_shot_ranges_are_one_line_errors(options, message):
    with pytest.raises(ValueError, match=message) as error:
        digits.build_digits_fewshot(num_train_clients=3, **options)
    assert "\n" not in str(error.value)


def test_dirichlet_digits_refuses_a_shot_range():
    with pytest.raises(ValueError, match="integer"):
        digits.build_digits(shots=(2, 5))
