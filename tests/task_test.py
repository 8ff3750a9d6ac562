"""Tests of `mfl_tff.data.task.FederatedTask`: packing on demand, caching, sampling, types."""

from __future__ import annotations

import collections
import dataclasses

import numpy as np
import pytest

from mfl_tff.data import packing
from mfl_tff.data.client_data import ArrayClientData
from mfl_tff.data.task import FederatedTask, check_positive

FEATURES = 2


def _client(offset: int, n: int) -> collections.OrderedDict:
    ids = np.arange(offset, offset + n)
    return collections.OrderedDict(
        x=np.repeat(ids[:, None], FEATURES, axis=1).astype(np.float32), y=ids.astype(np.int32)
    )


def _task(seed=0, train_ids=None, eval_ids=None, problem="classification", **kwargs):
    train_ids = train_ids or [f"train/{i}" for i in range(6)]
    eval_ids = eval_ids or [f"eval/{i}" for i in range(3)]
    clients = {cid: _client(100 * i, 5 + 3 * i) for i, cid in enumerate(train_ids + eval_ids)}
    return FederatedTask(
        name="toy",
        train_data=ArrayClientData(train_ids, clients.__getitem__),
        eval_data=ArrayClientData(eval_ids, clients.__getitem__),
        model_fn=lambda: None,
        problem=problem,
        train_split=packing.SplitSpec(),
        train_pack=packing.PackSpec(4, 3, 3),
        seed=seed,
        **kwargs,
    ), clients


def _real_y(part) -> np.ndarray:
    return part["y"][part["mask"] > 0]


def test_packed_clients_hold_exactly_the_clients_examples():
    task, clients = _task()
    ids = ["train/3", "train/0", "train/5"]
    for cid, packed in zip(ids, task.train_clients(ids)):
        ys = np.concatenate([_real_y(packed["support"]), _real_y(packed["query"])])
        expected = clients[cid]["y"]
        capacity = 2 * 3 * 4
        if len(expected) <= capacity:
            np.testing.assert_array_equal(np.sort(ys), expected)
        else:
            assert len(ys) == capacity and set(ys) <= set(expected)
    (packed,) = task.eval_clients(["eval/0"])
    ys = np.concatenate([_real_y(packed["support"]), _real_y(packed["query"])])
    np.testing.assert_array_equal(np.sort(ys), clients["eval/0"]["y"])


def test_packing_is_cached_and_deterministic_for_a_seed():
    task, _ = _task(seed=3)
    first = task.train_clients(["train/4"])[0]
    assert task.train_clients(["train/4"])[0] is first
    again = _task(seed=3)[0].train_clients(["train/4"])[0]
    np.testing.assert_array_equal(again["support"]["y"], first["support"]["y"])
    np.testing.assert_array_equal(again["query"]["y"], first["query"]["y"])
    other = _task(seed=4)[0].train_clients(["train/4"])[0]
    assert not np.array_equal(other["support"]["y"], first["support"]["y"])


def test_cache_evicts_the_least_recently_used_client():
    task, _ = _task(cache_size=2)
    a = task.train_clients(["train/0"])[0]
    b = task.train_clients(["train/1"])[0]
    assert task.train_clients(["train/0"])[0] is a  # refreshes train/0
    task.train_clients(["train/2"])  # evicts train/1, the least recently used
    assert task.train_clients(["train/0"])[0] is a
    b_again = task.train_clients(["train/1"])[0]
    assert b_again is not b
    np.testing.assert_array_equal(b_again["support"]["y"], b["support"]["y"])


def test_metric_follows_the_problem_and_eval_specs_default_to_train():
    task, _ = _task()
    assert task.metric == "accuracy"
    assert task.eval_split == task.train_split and task.eval_pack == task.train_pack
    assert _task(problem="regression")[0].metric == "mse"


def test_unknown_problem_raises():
    with pytest.raises(ValueError, match="problem"):
        _task(problem="ranking")


def test_held_out_ids_that_are_training_ids_raise():
    with pytest.raises(ValueError, match="Held-out"):
        _task(train_ids=["a", "b", "c"], eval_ids=["c", "d"])


def test_sampled_round_clients_are_distinct_training_ids_and_a_function_of_the_round():
    task, _ = _task(seed=1, train_ids=[f"train/{i}" for i in range(30)])
    rounds = [task.sample_train_ids(5, r) for r in range(6)]
    for ids in rounds:
        assert len(set(ids)) == 5
        assert set(ids) <= set(task.train_data.client_ids)
    assert len({tuple(ids) for ids in rounds}) > 1
    # A new task object (a resumed run) samples the same clients for the same round.
    resumed, _ = _task(seed=1, train_ids=[f"train/{i}" for i in range(30)])
    assert resumed.sample_train_ids(5, 4) == rounds[4]
    assert sorted(task.sample_train_ids(30, 0)) == sorted(task.train_data.client_ids)


@pytest.mark.parametrize("num_clients", [0, 7])
def test_sampling_more_clients_than_exist_or_none_raises(num_clients):
    task, _ = _task()
    with pytest.raises(ValueError, match="clients_per_round"):
        task.sample_train_ids(num_clients, 0)


def test_client_data_type_is_the_packed_shape():
    task, _ = _task(eval_pack=packing.PackSpec(2, 1, 5))
    train_type = task.client_data_type()
    assert tuple(train_type.support.x.shape) == (3, 4, FEATURES)
    assert tuple(train_type.query.mask.shape) == (3, 4)
    assert train_type.support.y.dtype == np.int32
    eval_type = task.client_data_type("eval")
    assert tuple(eval_type.support.x.shape) == (1, 2, FEATURES)
    assert tuple(eval_type.query.y.shape) == (5, 2)


def test_check_positive_names_the_bad_option():
    check_positive(a=1, b=5)
    with pytest.raises(ValueError, match="b must be >= 1"):
        check_positive(a=1, b=0)


def test_round_resplit_keeps_the_examples_draws_a_new_split_per_round_and_is_reproducible():
    task, clients = _task()
    cid = "train/2"  # 11 examples: all fit, so only the support/query assignment can change
    supports = []
    for round_num in range(6):
        (packed,) = task.train_clients([cid], round_num)
        ys = np.concatenate([_real_y(packed["support"]), _real_y(packed["query"])])
        np.testing.assert_array_equal(np.sort(ys), clients[cid]["y"])
        supports.append(frozenset(_real_y(packed["support"]).tolist()))
        (again,) = _task()[0].train_clients([cid], round_num)
        np.testing.assert_array_equal(again["support"]["y"], packed["support"]["y"])
    # 6 rounds drawing 6 of 11 examples: identical supports every round would mean no re-split.
    assert len(set(supports)) > 1


def test_round_resplit_leaves_a_generator_fixed_split_alone():
    task, clients = _task()
    task = dataclasses.replace(task, train_split=packing.SplitSpec(support_size=3, shuffle=False))
    cid = "train/1"
    first = {r: task.train_clients([cid], r)[0] for r in (0, 1)}
    for packed in first.values():
        np.testing.assert_array_equal(np.sort(_real_y(packed["support"])), clients[cid]["y"][:3])
