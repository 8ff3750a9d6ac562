"""Tests of `mfl_tff.algorithms.builders`: algorithms and optimizers by name, and bad options.

Which optimizer each option selects is tested in algorithm_test, the registry in catalog_test.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_federated as tff

from mfl_tff.algorithms import aggregation, builders, fedavg
from mfl_tff.data import sinusoid

LEARNS_ALPHA = {"mfl", "meta_sgd"}


pytestmark = pytest.mark.usefixtures("tff_local_execution")


@pytest.fixture(scope="module")
def task():
    return sinusoid.build_sinusoid(num_train_clients=8, num_eval_clients=3, eval_query_points=10)


@pytest.fixture(scope="module")
def clients(task):
    return task.train_clients(task.train_data.client_ids[:3])


def leaves(metrics, prefix=""):
    """(path, value) of every numeric leaf of a nested metrics structure."""
    if isinstance(metrics, Mapping):
        for key, value in metrics.items():
            yield from leaves(value, f"{prefix}/{key}")
    elif isinstance(metrics, (tuple, list)):
        for i, value in enumerate(metrics):
            yield from leaves(value, f"{prefix}/{i}")
    else:
        yield prefix, metrics


# Every algorithm is composed by the same composer, as one of two kinds of record: a model stream
# alone (maml here) or model and meta streams (meta_sgd). These two are built with DP aggregators,
# which are unweighted, instead of the default weighted mean: each algorithm is built only once
# (a build costs seconds), and tests/aggregation_test.py covers fedavg and mfl with DP in depth.
DP_ALGORITHMS = ("maml", "meta_sgd")


def aggregators_for(name, num_clients):
    if name not in DP_ALGORITHMS:
        return {}
    aggregators = aggregation.build_aggregators(
        "dp",
        learns_alpha=name in builders.LEARNS_ALPHA,
        noise_multiplier=0.5,
        clip_norm=1.0,
        clients_per_round=num_clients,
    )
    return dict(model_aggregator=aggregators.model, meta_aggregator=aggregators.meta)


# fedavg and mfl are built for sinusoid and trained 3 rounds in tests/multi_worker_test.py (the
# one-machine reference, with their learned alpha); a build costs seconds of the suite's budget.
BUILT_ELSEWHERE = ("fedavg", "mfl")


@pytest.mark.parametrize("name", [n for n in builders.ALGORITHMS if n not in BUILT_ELSEWHERE])
def test_every_algorithm_builds_for_sinusoid_and_runs_a_round(name, task, clients):
    options = builders.AlgorithmOptions(
        inner_lr=0.01, inner_steps=1, **aggregators_for(name, len(clients))
    )
    process, spec = builders.build_algorithm(name, task, options)
    assert isinstance(process, tff.learning.templates.LearningProcess)
    assert spec.name == name
    assert spec.learns_alpha == (name in LEARNS_ALPHA)
    assert spec.eval_steps == 1
    state = process.initialize()
    before = process.get_model_weights(state).trainable
    output = process.next(state, clients)
    after = process.get_model_weights(output.state).trainable
    values = list(leaves(output.metrics))
    assert values, output.metrics
    for path, value in values:
        assert np.all(np.isfinite(value)), (path, value)
    moved = max(float(np.max(np.abs(a - b))) for a, b in zip(after, before))
    assert 0.0 < moved < 10.0, moved
    rejected = [v for path, v in values if path.endswith("num_clients_rejected")]
    assert rejected and all(v == 0 for v in rejected)
    # The rates evaluation adapts with: learned alpha, or the fixed inner rate.
    alpha = builders.evaluation_alpha(process, output.state, spec, inner_lr=0.03)
    if spec.learns_alpha:
        learned = process.get_hparams(output.state)["alpha"]
        assert len(alpha) == len(learned)
        for a, b in zip(alpha, learned):
            np.testing.assert_array_equal(a, b)
            assert a.dtype == np.float32
    else:
        assert len(alpha) == 1 and alpha[0] == np.float32(0.03) and np.shape(alpha[0]) == ()
    # The aggregators are the ones given: DP reports a `dp` measurement, the mean `mean_value`.
    model_aggregator = "model_aggregator" if spec.learns_alpha else "aggregator"
    kind = "dp" if name in DP_ALGORITHMS else "mean_value"
    assert kind in output.metrics[model_aggregator]
    if spec.learns_alpha:
        assert kind in output.metrics["meta_aggregator"]


def test_unknown_algorithm_lists_the_choices(task):
    with pytest.raises(ValueError, match="fedsgd") as error:
        builders.build_algorithm("fedsgd", task)
    for name in builders.ALGORITHMS:
        assert name in str(error.value)


def _one_step(optimizer, weight, grad):
    specs = tf.TensorSpec(np.shape(weight), tf.float32)
    state = optimizer.initialize(specs)
    state, new = optimizer.next(state, tf.constant(weight), tf.constant(grad))
    return state, np.asarray(new)


@pytest.mark.parametrize("name", builders.OPTIMIZERS)
def test_build_optimizer_by_name(name):
    optimizer = builders.build_optimizer(name, 0.25)
    assert isinstance(optimizer, tff.learning.optimizers.Optimizer)
    weight = np.array([1.0, -2.0, 3.0], np.float32)
    grad = np.array([0.5, -1.0, 0.0], np.float32)
    state, new = _one_step(optimizer, weight, grad)
    hparams = optimizer.get_hparams(state)
    assert hparams["learning_rate"] == pytest.approx(0.25)
    if name in ("sgd", "sgdm"):  # first step of (heavy-ball) SGD: w - lr * g
        np.testing.assert_allclose(new, weight - 0.25 * grad, rtol=1e-6)
        assert hparams.get("momentum", 0.0) == pytest.approx(0.9 if name == "sgdm" else 0.0)
    else:  # adaptive methods move every coordinate with a gradient, against its sign
        assert np.all(np.sign(weight - new)[:2] == np.sign(grad)[:2])
        assert new[2] == weight[2]


def test_unknown_optimizer_lists_the_choices():
    with pytest.raises(ValueError, match="rmsprop") as error:
        builders.build_optimizer("rmsprop", 0.1)
    for name in builders.OPTIMIZERS:
        assert name in str(error.value)


@pytest.mark.parametrize(
    "name, options, message",
    [
        ("maml", dict(meta_optimizer="rmsprop"), "rmsprop"),
        ("fedavg", dict(server_optimizer="lamb"), "lamb"),
        ("mfl", dict(alpha_granularity="per_unit"), "per_layer"),
        ("mfl", dict(adaptive_update="global"), "adaptive_update"),
        ("mfl", dict(adaptive_data="query"), "adaptive_data"),
        ("per_fedavg_fo", dict(outer_lr=-1.0), "outer_lr"),
        ("reptile", dict(inner_steps=0), "inner_steps"),
        ("meta_sgd", dict(inner_lr=0.0), "inner_lr"),
        ("fedprox", dict(proximal_strength=0.0), "proximal_strength"),
        ("mfl", dict(min_alpha=0.0), "min_alpha"),
    ],
)
def test_bad_options_raise_value_errors_naming_them(task, name, options, message):
    with pytest.raises(ValueError, match=message):
        builders.build_algorithm(name, task, builders.AlgorithmOptions(**options))


def test_keras_optimizer_is_a_type_error_pointing_at_tff_optimizers(task):
    with pytest.raises(TypeError, match=r"tff\.learning\.optimizers") as error:
        fedavg.build_fedavg(
            task.model_fn, task.client_data_type(), server_optimizer=tf.keras.optimizers.SGD()
        )
    assert "SGD" in str(error.value)  # names what was passed


def test_aggregator_that_is_not_a_factory_instance_is_a_type_error(task):
    options = builders.AlgorithmOptions(model_aggregator=tff.aggregators.MeanFactory)
    with pytest.raises(TypeError, match="WeightedAggregationFactory"):
        builders.build_algorithm("maml", task, options)
