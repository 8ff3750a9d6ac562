"""Tests of Synthetic(alpha, beta) clients generated on the worker (`data_on_workers=True`).

The driver sends codes and a zero-byte placeholder label; the worker draws each client's model
and input mean, its inputs and labels with stateless TensorFlow ops
(`mfl_tff.data.synthetic_on_workers`). The built clients are checked against independent
references: argmax(W x + b) in numpy for the model the source reports, the Gaussian laws of the
inputs and of the models (tolerances from the sample sizes), and the default task's sizes, packing
and types.
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_federated as tff

from mfl_tff.algorithms import cohorts
from mfl_tff.data import example_sources, packing, synthetic
from tests import testing

# `testing.digest(testing.packed_sample(task))` of the default task (data_on_workers=False),
# computed with the code from before data_on_workers existed: the default clients stay identical.
DEFAULT_DIGEST = "13ab2ad9f3fe4a6c2ee8c90dbb91f17005bc7febd99ac180c0c7749ecb2e6837"
OPTIONS = dict(num_train_clients=20, num_eval_clients=5)
SCALE = np.arange(1, 61) ** -0.6  # the inputs' standard deviations around v


def test_the_default_task_is_unchanged():
    task = synthetic.build_synthetic(**OPTIONS)
    assert task.example_source is None
    assert testing.digest(testing.packed_sample(task)) == DEFAULT_DIGEST


@pytest.fixture(scope="module")
def tasks():
    """(default task, the same on workers), 60 training and 10 held-out clients."""
    options = dict(num_train_clients=60, num_eval_clients=10)
    return (
        synthetic.build_synthetic(**options),
        synthetic.build_synthetic(data_on_workers=True, **options),
    )


@pytest.fixture(scope="module")
def built(tasks):
    """The on-worker task's training clients, packed (round 1) and built in one graph call."""
    _, task = tasks
    clients = task.train_clients(task.train_data.client_ids, 1)
    build = tf.function(lambda data: example_sources.build_on_worker(data, task.example_source))
    built = build(packing.stack_clients(clients))
    return clients, tf.nest.map_structure(np.asarray, built)


def _examples(built, i):
    """Client i's real (x [n, 60], y [n]) across support and query."""
    xs, ys = [], []
    for part in built.values():
        keep = part["mask"][i] > 0
        xs.append(part["x"][i][keep])
        ys.append(part["y"][i][keep])
        # Padding is zeroed.
        assert np.all(part["x"][i][~keep] == 0.0) and np.all(part["y"][i][~keep] == 0)
    return np.concatenate(xs), np.concatenate(ys)


def test_sizes_packing_bytes_and_types_are_the_default_tasks(tasks, built):
    default, task = tasks
    clients, examples = built
    ids = task.train_data.client_ids
    want_type, got_type = default.client_data_type(), task.client_data_type()
    for i, (cid, want) in enumerate(zip(ids, default.train_clients(ids, 1))):
        assert len(task.train_data.client_arrays(cid)["x"]) == synthetic.client_size(cid, 400, 0)
        for part in ("support", "query"):
            np.testing.assert_array_equal(clients[i][part]["mask"], want[part]["mask"])
            for key in ("x", "y", "mask"):
                assert examples[part][key][i].shape == want[part][key].shape
                assert examples[part][key].dtype == want[part][key].dtype
        # 200 slots: 60 float32 + an int32 label + a mask by default; a code and a mask here.
        assert sum(a.nbytes for a in tf.nest.flatten(want)) == 200 * (60 * 4 + 4 + 4) == 49_600
        assert sum(a.nbytes for a in tf.nest.flatten(clients[i])) == 200 * (4 + 4) == 1_600
    for part in ("support", "query"):
        assert got_type[part].x.dtype == np.int32 and tuple(got_type[part].x.shape) == (10, 10)
        assert tuple(got_type[part].y.shape) == (10, 10, 0)
        assert got_type[part].mask == want_type[part].mask


def test_labels_are_the_reported_models_argmax(tasks, built):
    _, task = tasks
    ids = task.train_data.client_ids
    models = task.example_source.client_models(ids)
    labels = []
    for i in range(len(ids)):
        x, y = _examples(built[1], i)
        logits = x.astype(np.float64) @ models["w"][i] + models["bias"][i]
        np.testing.assert_array_equal(y, np.argmax(logits, axis=1))
        labels.append(y)
    labels = np.concatenate(labels)
    assert labels.dtype == np.int32 and set(labels) == set(range(10))


def test_inputs_are_gaussian_around_the_clients_mean(tasks, built):
    _, task = tasks
    ids = task.train_data.client_ids
    models = task.example_source.client_models(ids)
    z = []
    for i in range(len(ids)):
        x, _ = _examples(built[1], i)
        # Per coordinate j, the mean of n draws of N(v_j, s_j^2) is N(v_j, s_j^2 / n).
        z.append((x.mean(axis=0) - models["v"][i]) * np.sqrt(len(x)) / SCALE)
        # And each coordinate's spread is s_j: 60 x n residuals / s standardized.
        residual = (x - models["v"][i]) / SCALE
        assert abs(residual.std() - 1.0) < 4 / np.sqrt(2 * residual.size)
    z = np.concatenate(z)  # 3,600 standard normals
    assert np.abs(z).max() < 5.0
    assert abs(z.mean()) < 4 / np.sqrt(z.size)
    assert abs(z.std() - 1.0) < 4 / np.sqrt(2 * z.size)


def test_models_follow_synthetic_alpha_beta():
    alpha, beta, n = 0.5, 2.0, 1000
    task = synthetic.build_synthetic(
        alpha=alpha, beta=beta, num_train_clients=n, num_eval_clients=2, data_on_workers=True
    )
    models = task.example_source.client_models(task.train_data.client_ids)
    for values, variance in ((models["u"], alpha), (models["b_mean"], beta)):
        assert abs(values.mean()) < 4 * np.sqrt(variance / n)
        assert abs(values.var() / variance - 1.0) < 4 * np.sqrt(2 / n)
    # W, b ~ N(u, 1) and v ~ N(B, 1) around each client's own u and B.
    for values, center in (
        (models["w"], models["u"][:, None, None]),
        (models["bias"], models["u"][:, None]),
        (models["v"], models["b_mean"][:, None]),
    ):
        residual = (values - center).ravel()
        assert abs(residual.mean()) < 4 / np.sqrt(residual.size)
        assert abs(residual.std() - 1.0) < 4 / np.sqrt(2 * residual.size)
    # Held-out clients are other clients than the training ones of the same number.
    held_out = task.example_source.client_model("eval/00000")
    assert not np.array_equal(held_out["w"], models["w"][0])
    # alpha = beta = 0: every client's u and B are 0.
    flat = synthetic.build_synthetic(
        alpha=0.0, beta=0.0, num_train_clients=3, num_eval_clients=1, data_on_workers=True
    )
    zero = flat.example_source.client_models(flat.train_data.client_ids)
    assert np.all(zero["u"] == 0.0) and np.all(zero["b_mean"] == 0.0)


def test_an_example_is_a_function_of_its_code_only(tasks, built, tff_local_execution):
    _, task = tasks
    source = task.example_source
    ids = task.train_data.client_ids[:3]
    # Round 1's split and the fixed split pack the same codes differently: each code is built
    # into the same example either way.
    clients, examples = built
    fixed = task.train_clients(ids)
    (cohort,) = cohorts.make_cohorts(fixed, 3)
    eager = tf.nest.map_structure(np.asarray, example_sources.build_on_worker(cohort, source))
    compared = 0
    for i in range(3):
        by_code = {}
        for part in ("support", "query"):
            keep = clients[i][part]["mask"] > 0
            for code, x, y in zip(
                clients[i][part]["x"][keep],
                examples[part]["x"][i][keep],
                examples[part]["y"][i][keep],
            ):
                by_code[code] = (x, y)
        for part in ("support", "query"):
            keep = fixed[i][part]["mask"] > 0
            for code, x, y in zip(
                fixed[i][part]["x"][keep],
                eager[part]["x"][i][keep],
                eager[part]["y"][i][keep],
            ):
                if code in by_code:
                    np.testing.assert_array_equal(x, by_code[code][0])
                    assert y == by_code[code][1]
                    compared += 1
    assert compared > 100
    # Inside a TFF computation, on the worker: exactly the eager values.
    data_type = cohorts.stacked_type(task.client_data_type(), 3)

    @tff.tensorflow.computation(data_type)
    def build(data):
        return example_sources.build_on_worker(data, source)

    got = build(cohort)
    for part in ("support", "query"):
        for key in ("x", "y", "mask"):
            np.testing.assert_array_equal(np.asarray(got[part][key]), eager[part][key])


def test_codes_must_fit_int32():
    with pytest.raises(ValueError, match="exceed 2\\^31") as error:
        synthetic.build_synthetic(max_examples=10**8, data_on_workers=True)
    assert "\n" not in str(error.value)
