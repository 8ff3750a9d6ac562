"""Tests of `mfl_tff.algorithms.client_work`: the client result and the client work process.

The helpers (`client_output`, `all_finite`, `global_norm`, the weights type) are plain TensorFlow
run eagerly. The client work process is run once on a TFF worker, with a client function written
here whose update, weight and metric are known per client, so the server-side summary (weighted
metric means, counts, rejected clients) has a closed form. How rejection shows in whole rounds is
tested through the algorithms (fedavg_test, mfl_test, fedmeta_test).
"""

from __future__ import annotations

import collections

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_federated as tff

from mfl_tff.algorithms import client_work
from mfl_tff.data import example_sources
from mfl_tff.models import functional, keras_models


@pytest.fixture(scope="module")
def model():
    return functional.functional_model(
        lambda: keras_models.mlp((3,), (4,), 2), x_shape=(3,), problem="classification", seed=1
    )


def test_model_weights_type_matches_the_model(model):
    weights_type = client_work.model_weights_type(model)
    trainable, non_trainable = model.initial_weights
    assert len(weights_type.trainable) == len(trainable) == 4
    assert len(weights_type.non_trainable) == len(non_trainable) == 0
    for t, w in zip(weights_type.trainable, trainable):
        assert t.dtype == np.float32 and tuple(t.shape) == np.shape(w)
    # It is the type TFF's own learning code uses for model weights.
    expected = tff.types.to_type(
        tff.learning.models.ModelWeights(
            trainable=tuple((np.float32, np.shape(w)) for w in trainable), non_trainable=()
        )
    )
    assert weights_type.is_equivalent_to(expected)


def test_initial_model_weights_are_the_models_numpy_weights(model):
    weights = client_work.initial_model_weights(model)
    assert isinstance(weights, tff.learning.models.ModelWeights)
    for got, want in zip(weights.trainable, model.initial_weights[0]):
        assert isinstance(got, np.ndarray)
        np.testing.assert_array_equal(got, want)


def test_all_finite():
    def structure():
        return {"a": np.ones((2, 3), np.float32), "b": (np.float32(2.0), np.zeros(4, np.float32))}

    assert bool(client_work.all_finite(structure()))
    for bad in (np.nan, np.inf, -np.inf):
        broken = structure()
        broken["b"][1][2] = bad
        assert not bool(client_work.all_finite(broken))


def test_global_norm_is_the_norm_of_all_tensors_together():
    rng = np.random.default_rng(0)
    parts = [rng.normal(size=s).astype(np.float32) for s in ((3, 2), (5,), ())]
    expected = np.sqrt(sum(np.sum(np.square(p.astype(np.float64))) for p in parts))
    np.testing.assert_allclose(client_work.global_norm(parts), expected, rtol=1e-6)


def _output(update, weight, metrics):
    out = client_work.client_output(update, tf.constant(weight), metrics)
    return tf.nest.map_structure(np.asarray, out)


def test_client_output_keeps_a_finite_update():
    update = (np.array([3.0, 4.0], np.float32), np.array([[0.0]], np.float32))
    metrics = collections.OrderedDict(loss=tf.constant(0.5))
    out = _output(update, 7.0, metrics)
    np.testing.assert_array_equal(out["update"][0], update[0])
    np.testing.assert_array_equal(out["update"][1], update[1])
    assert out["update_weight"] == 7.0
    assert out["num_examples"] == 7.0
    assert out["rejected"] == 0
    assert out["num_clients"] == 1
    assert out["metrics"]["loss"] == np.float32(0.5)
    np.testing.assert_allclose(out["metrics"]["update_norm"], 5.0, rtol=1e-6)


@pytest.mark.parametrize("where", ["update", "metric", "norm"])
def test_client_output_rejects_a_non_finite_client(where):
    first = {"update": np.nan, "norm": 3e38}.get(where, 3.0)
    # Two finite float32 values whose L2 norm overflows float32: clipping would make it NaN.
    update = (np.array([first, 3e38 if where == "norm" else 4.0], np.float32),)
    loss = np.inf if where == "metric" else 0.5
    metrics = collections.OrderedDict(loss=tf.constant(loss, tf.float32))
    out = _output(update, 7.0, metrics)
    np.testing.assert_array_equal(out["update"][0], [0.0, 0.0])  # zeroed, not NaN
    assert out["update_weight"] == 0.0  # so it weighs nothing in the mean
    assert out["rejected"] == 1
    assert out["metrics"]["loss"] == 0.0 and out["metrics"]["update_norm"] == 0.0
    assert out["num_examples"] == 7.0  # the client's examples are still reported


def test_client_output_casts_an_integer_weight_and_does_not_count_an_empty_client():
    out = _output((np.ones(2, np.float32),), 3, collections.OrderedDict())
    assert out["update_weight"].dtype == np.float32 and out["update_weight"] == 3.0
    # A cohort's padding client has no examples: it is not a client.
    empty = _output((np.ones(2, np.float32),), 0, collections.OrderedDict())
    assert empty["num_clients"] == 0 and empty["rejected"] == 0


# ---------------------------------------------------------------------------------------------
# The client work process, run on a worker.

DATA_TYPE = tff.types.to_type(collections.OrderedDict(n=np.float32, loss=np.float32))
WEIGHTS_TYPE = tff.types.to_type((np.float32, (2,)))


def scaled_client_fn(weights, data):
    """Update n * weights with weight n and metric `loss` as given (inf makes it rejected)."""
    return client_work.client_output(
        tf.nest.map_structure(lambda w: data["n"] * w, weights),
        data["n"],
        collections.OrderedDict(loss=data["loss"]),
    )


def client(n, loss):
    return collections.OrderedDict(n=np.float32(n), loss=np.float32(loss))


def test_client_work_process_returns_updates_and_weighted_metrics(tff_local_execution):
    work = client_work.build_client_work(scaled_client_fn, (WEIGHTS_TYPE,), DATA_TYPE)
    state = work.initialize()
    weights = np.array([1.0, -2.0], np.float32)
    clients = [client(2, 1.0), client(3, 4.0), client(5, np.inf)]
    # The server argument is CLIENTS-placed: one copy per client, as the distributor gives it.
    output = work.next(state, [weights] * 3, clients)
    assert output.state == state == ()
    # One `ClientResult` per client (the result is CLIENTS-placed).
    np.testing.assert_allclose(
        [r.update for r in output.result], [2 * weights, 3 * weights, [0.0, 0.0]]
    )
    assert [r.update_weight for r in output.result] == [2.0, 3.0, 0.0]
    summary = output.measurements
    # Metrics are means weighted by the accepted clients' weights; the rejected one counts 0.
    assert summary["loss"] == pytest.approx((2 * 1.0 + 3 * 4.0) / 5)
    norms = [np.linalg.norm(2 * weights), np.linalg.norm(3 * weights)]
    assert summary["update_norm"] == pytest.approx((2 * norms[0] + 3 * norms[1]) / 5, rel=1e-6)
    assert summary["num_examples"] == 10.0
    assert summary["num_clients"] == 3
    assert summary["num_clients_rejected"] == 1
    # Every client rejected: 0 / 0, as tff.federated_mean gives (the finalizers then skip).
    everyone_rejected = work.next(state, [weights], [client(4, np.nan)]).measurements
    assert np.isnan(everyone_rejected["loss"]) and everyone_rejected["num_clients_rejected"] == 1


def test_client_work_with_two_server_arguments_and_a_cohort(tff_local_execution):
    """The meta-parameters are a second server argument; cohorts stack clients on axis 0."""
    meta_type = tff.types.to_type((np.float32,))

    def client_fn(weights, meta, data):
        out = scaled_client_fn(weights, data)
        out["update"] = meta[0] * out["update"]
        return out

    work = client_work.build_client_work(
        client_fn, (WEIGHTS_TYPE, meta_type), DATA_TYPE, cohort_size=2
    )
    weights = np.array([1.0, 1.0], np.float32)
    cohort = collections.OrderedDict(
        n=np.array([1.0, 3.0], np.float32), loss=np.array([2.0, 6.0], np.float32)
    )
    output = work.next(work.initialize(), [weights], [(np.float32(0.5),)], [cohort])
    # The cohort's update is its clients' weighted mean, its weight their total.
    (result,) = output.result
    np.testing.assert_allclose(result.update, 0.5 * (1 * 1 + 3 * 3) / 4 * weights, rtol=1e-6)
    assert result.update_weight == 4.0
    assert output.measurements["loss"] == pytest.approx((1 * 2.0 + 3 * 6.0) / 4)
    assert output.measurements["num_clients"] == 2


def test_three_server_arguments_are_refused():
    with pytest.raises(ValueError, match="1 or 2 server arguments"):
        client_work.build_client_computation(scaled_client_fn, (WEIGHTS_TYPE,) * 3, DATA_TYPE)


# Pool mode: clients' x are row indices into a pool the computation carries.

POOL = np.arange(5 * 2 * 3, dtype=np.float32).reshape(5, 2, 3) + 1.0  # no row is all zeros


def _indexed_part(x, mask):
    x = np.asarray(x, np.int32)
    return collections.OrderedDict(x=x, y=x % 2, mask=np.asarray(mask, np.float32))


def test_build_on_worker_takes_pool_rows_under_any_leading_axes_and_zeroes_padding():
    # A cohort of 2 clients, 1 batch of 3 slots each; the second client's last slot is padding.
    part = _indexed_part([[[4, 0, 2]], [[1, 3, 0]]], [[[1, 1, 1]], [[1, 1, 0]]])
    data = collections.OrderedDict(support=part, query=part)
    gathered = example_sources.build_on_worker(data, example_sources.FeaturePool(POOL))
    assert list(gathered) == ["support", "query"]
    x = gathered["support"]["x"].numpy()
    assert x.shape == (2, 1, 3, 2, 3) and x.dtype == np.float32
    np.testing.assert_array_equal(x[0, 0], POOL[[4, 0, 2]])
    np.testing.assert_array_equal(x[1, 0, :2], POOL[[1, 3]])
    np.testing.assert_array_equal(x[1, 0, 2], np.zeros((2, 3)))
    for key in ("y", "mask"):
        np.testing.assert_array_equal(gathered["query"][key], part[key])
    assert example_sources.build_on_worker(data, None) is data


def test_client_computation_carries_the_pool_and_takes_only_indices(tff_local_execution):
    part_type = tff.types.to_type(
        collections.OrderedDict(
            x=(np.int32, (1, 2)), y=(np.int32, (1, 2)), mask=(np.float32, (1, 2))
        )
    )
    data_type = tff.types.to_type(collections.OrderedDict(support=part_type, query=part_type))

    def client_fn(weights, data):
        # The update is the masked sum of the support features, seen by the algorithm's code.
        total = tf.reduce_sum(data["support"]["x"])
        return client_work.client_output(
            tf.nest.map_structure(lambda w: total * w, weights), 1.0, collections.OrderedDict()
        )

    computation = client_work.build_client_computation(
        client_fn, (WEIGHTS_TYPE,), data_type, example_source=example_sources.FeaturePool(POOL)
    )
    # No argument for the pool: it is a constant of the computation, which runs on the worker.
    assert computation.type_signature.parameter[1] == data_type
    part = _indexed_part([[3, 1]], [[1, 1]])
    out = computation(np.ones(2, np.float32), collections.OrderedDict(support=part, query=part))
    np.testing.assert_allclose(out["update"], [POOL[[3, 1]].sum()] * 2)
