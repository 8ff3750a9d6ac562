"""Tests of the public pieces of `mfl_tff.algorithms.client_utils`.

Everything here is plain TensorFlow run eagerly (and TFF type construction): no TFF computation
executes, so no worker may be started. How the rejection of non-finite clients shows in a whole
round is tested through the builders (fedavg_test, mfl_test, fedmeta_test).
"""

from __future__ import annotations

import collections

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_federated as tff

from mfl_tff.algorithms import client_utils
from mfl_tff.models import functional, keras_models
from mfl_tff.training import runtime


@pytest.fixture(scope="module", autouse=True)
def no_worker_started():
    yield
    assert runtime.live_worker_pids() == []


@pytest.fixture(scope="module")
def model():
    return functional.functional_model(
        lambda: keras_models.mlp((3,), (4,), 2), x_shape=(3,), problem="classification", seed=1
    )


def test_model_weights_type_matches_the_model(model):
    weights_type = client_utils.model_weights_type(model)
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
    weights = client_utils.initial_model_weights(model)
    assert isinstance(weights, tff.learning.models.ModelWeights)
    for got, want in zip(weights.trainable, model.initial_weights[0]):
        assert isinstance(got, np.ndarray)
        np.testing.assert_array_equal(got, want)


def test_all_finite():
    finite = {"a": np.ones((2, 3), np.float32), "b": (np.float32(2.0), np.zeros(4, np.float32))}
    assert bool(client_utils.all_finite(finite))
    for bad in (np.nan, np.inf, -np.inf):
        broken = {"a": np.ones((2, 3), np.float32), "b": (np.float32(2.0), np.zeros(4, np.float32))}
        broken["b"][1][2] = bad
        assert not bool(client_utils.all_finite(broken))


def test_global_norm_is_the_norm_of_all_tensors_together():
    rng = np.random.default_rng(0)
    parts = [rng.normal(size=s).astype(np.float32) for s in ((3, 2), (5,), ())]
    expected = np.sqrt(sum(np.sum(np.square(p.astype(np.float64))) for p in parts))
    np.testing.assert_allclose(client_utils.global_norm(parts), expected, rtol=1e-6)


def _output(update, weight, metrics):
    out = client_utils.client_output(update, tf.constant(weight), metrics)
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
    assert out["metrics"]["loss"] == np.float32(0.5)
    np.testing.assert_allclose(out["metrics"]["update_norm"], 5.0, rtol=1e-6)


@pytest.mark.parametrize("where", ["update", "metric"])
def test_client_output_rejects_a_non_finite_client(where):
    update = (np.array([3.0, np.nan if where == "update" else 4.0], np.float32),)
    loss = np.inf if where == "metric" else 0.5
    metrics = collections.OrderedDict(loss=tf.constant(loss, tf.float32))
    out = _output(update, 7.0, metrics)
    np.testing.assert_array_equal(out["update"][0], [0.0, 0.0])  # zeroed, not NaN
    assert out["update_weight"] == 0.0  # so it weighs nothing in the mean
    assert out["rejected"] == 1
    assert out["metrics"]["loss"] == 0.0 and out["metrics"]["update_norm"] == 0.0
    assert out["num_examples"] == 7.0  # the client's examples are still reported


def test_client_output_casts_an_integer_weight():
    out = _output((np.ones(2, np.float32),), 3, collections.OrderedDict())
    assert out["update_weight"].dtype == np.float32 and out["update_weight"] == 3.0


@pytest.mark.parametrize("value", [0, -1.0, float("nan"), float("inf"), "0.1", None])
def test_check_positive_rate_rejects(value):
    with pytest.raises(ValueError, match=r"my_rate must be a finite number > 0"):
        client_utils.check_positive_rate("my_rate", value)


@pytest.mark.parametrize("value", [1e-9, 3, 0.5])
def test_check_positive_rate_accepts(value):
    client_utils.check_positive_rate("my_rate", value)


@pytest.mark.parametrize("value", [0, -2, 1.0, True, "3", None])
def test_check_positive_int_rejects(value):
    with pytest.raises(ValueError, match=r"my_steps must be a positive int"):
        client_utils.check_positive_int("my_steps", value)


def test_check_positive_int_accepts_python_and_numpy_ints():
    client_utils.check_positive_int("my_steps", 1)
    client_utils.check_positive_int("my_steps", np.int64(4))


def test_check_optimizer():
    client_utils.check_optimizer("opt", tff.learning.optimizers.build_adam(1e-3))
    with pytest.raises(
        TypeError, match=r"opt must be a tff\.learning\.optimizers\.Optimizer.*Adam"
    ):
        client_utils.check_optimizer("opt", tf.keras.optimizers.Adam())
    with pytest.raises(TypeError, match="function"):
        client_utils.check_optimizer("opt", lambda: tff.learning.optimizers.build_adam(1e-3))


def test_check_aggregator_accepts_weighted_and_unweighted_factories():
    client_utils.check_aggregator("agg", tff.aggregators.MeanFactory())
    client_utils.check_aggregator("agg", tff.aggregators.SumFactory())
    with pytest.raises(TypeError, match=r"agg must be a tff\.aggregators\.Weighted.*class MeanF"):
        client_utils.check_aggregator("agg", tff.aggregators.MeanFactory)
    with pytest.raises(TypeError, match=r"agg must be .*Unweighted.*str"):
        client_utils.check_aggregator("agg", "mean")


def test_check_positive_rate_accepts_numpy_float32():
    client_utils.check_positive_rate("my_rate", np.float32(0.01))
