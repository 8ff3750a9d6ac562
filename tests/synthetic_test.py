"""Tests of `mfl_tff.data.synthetic`: LEAF/FedProx Synthetic(alpha, beta) clients."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score

from mfl_tff.data import synthetic


@pytest.fixture(scope="module")
def task():
    return synthetic.build_synthetic(num_train_clients=100, num_eval_clients=30)


def test_inputs_have_60_dims_and_labels_10_classes(task):
    labels = []
    for data in (task.train_data, task.eval_data):
        for cid in data.client_ids:
            arrays = data.client_arrays(cid)
            assert arrays["x"].ndim == 2 and arrays["x"].shape[1] == 60
            assert arrays["x"].dtype == np.float32
            assert len(arrays["y"]) == len(arrays["x"])
            labels.append(arrays["y"])
    labels = np.concatenate(labels)
    assert labels.min() >= 0 and labels.max() <= 9
    assert len(np.unique(labels)) == 10


def test_labels_of_a_client_are_linearly_separable():
    # Labels are argmax(W x + b) of the client's own linear model: a multinomial logistic
    # regression fits one large client almost perfectly. Synthetic clients are dominated by one
    # label, so take the client with the most examples outside its top label and score the fit
    # per class (balanced accuracy), which the majority label alone cannot pass.
    task = synthetic.build_synthetic(max_examples=2000, num_train_clients=100, num_eval_clients=1)

    def minority(cid):
        y = task.train_data.client_arrays(cid)["y"]
        return len(y) - np.bincount(y).max()

    arrays = task.train_data.client_arrays(max(task.train_data.client_ids, key=minority))
    x, y = arrays["x"], arrays["y"]
    assert len(y) >= 1000 and len(y) - np.bincount(y).max() >= 100
    fit = LogisticRegression(C=100.0, max_iter=1000).fit(x, y)
    assert fit.score(x, y) > 0.9
    assert balanced_accuracy_score(y, fit.predict(x)) > 0.9
    # The same fit on shuffled labels (not a linear function of x) scores far lower.
    shuffled = np.random.default_rng(0).permutation(y)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # shuffled labels cannot be fit
        control = LogisticRegression(C=100.0, max_iter=300).fit(x, shuffled)
    assert balanced_accuracy_score(shuffled, control.predict(x)) < 0.7


def test_clients_follow_a_heavy_tailed_size_law():
    task = synthetic.build_synthetic(max_examples=10**7, num_train_clients=300, num_eval_clients=1)
    data = task.train_data
    sizes = np.array([len(data.client_arrays(c)["y"]) for c in data.client_ids])
    assert sizes.min() >= 50
    # size - 50 ~ floor(lognormal(4, 2)): median e^4 ~ 55, a long right tail.
    assert 25 < np.median(sizes - 50) < 120
    assert sizes.max() > 10 * np.median(sizes)
    assert sizes.mean() > np.median(sizes)


def test_max_examples_caps_client_sizes(task):
    sizes = [len(task.train_data.client_arrays(c)["y"]) for c in task.train_data.client_ids]
    assert min(sizes) >= 50 and max(sizes) <= 400
    assert max(sizes) == 400  # LEAF's tail reaches the default cap among 100 clients
    assert len(set(sizes)) > 20


def test_clients_are_deterministic_and_seed_dependent(task):
    again = synthetic.build_synthetic(num_train_clients=100, num_eval_clients=30)
    other = synthetic.build_synthetic(num_train_clients=100, num_eval_clients=30, seed=1)
    cid = "train/00007"
    first = task.train_data.client_arrays(cid)
    np.testing.assert_array_equal(first["x"], again.train_data.client_arrays(cid)["x"])
    np.testing.assert_array_equal(first["y"], again.train_data.client_arrays(cid)["y"])
    assert not np.array_equal(first["x"][:50], other.train_data.client_arrays(cid)["x"][:50])


def test_clients_differ_in_their_input_distributions(task):
    data = task.train_data
    means = np.stack([data.client_arrays(c)["x"].mean(axis=0) for c in data.client_ids[:20]])
    # v_k ~ N(B_k, 1) per client: client means differ by order 1 in every coordinate.
    assert np.mean(np.std(means, axis=0)) > 0.5


def test_packed_clients_split_in_half_up_to_the_cap(task):
    ids = task.train_data.client_ids[:10]
    for cid, packed in zip(ids, task.train_clients(ids)):
        n = len(task.train_data.client_arrays(cid)["y"])
        assert packed["support"]["mask"].sum() == min(round(n / 2), 100)
        assert packed["support"]["x"].shape == (10, 10, 60)


@pytest.mark.parametrize(
    "options",
    [
        dict(alpha=-1.0),
        dict(beta=-0.5),
        dict(num_train_clients=0),
        dict(num_eval_clients=0),
        dict(batch_size=0),
        dict(max_batches=0),
        dict(max_examples=1),
    ],
)
def test_bad_options_raise(options):
    with pytest.raises(ValueError):
        synthetic.build_synthetic(**options)
