"""Tests of `mfl_tff.algorithms.checks`: argument checks that raise an error a user can act on.

Pure Python (and TFF/Keras object construction): no TFF computation runs, so no worker starts.
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_federated as tff

from mfl_tff.algorithms import checks


@pytest.mark.parametrize("value", [0, -1.0, float("nan"), float("inf"), "0.1", None, True])
def test_check_positive_rate_rejects(value):
    with pytest.raises(ValueError, match=r"my_rate must be a finite number > 0"):
        checks.check_positive_rate("my_rate", value)


@pytest.mark.parametrize("value", [1e-9, 3, 0.5, np.float32(0.01), np.int64(2)])
def test_check_positive_rate_accepts(value):
    checks.check_positive_rate("my_rate", value)


@pytest.mark.parametrize("value", [0, -2, 1.0, True, "3", None])
def test_check_positive_int_rejects(value):
    with pytest.raises(ValueError, match=r"my_steps must be a positive int"):
        checks.check_positive_int("my_steps", value)


def test_check_positive_int_accepts_python_and_numpy_ints():
    checks.check_positive_int("my_steps", 1)
    checks.check_positive_int("my_steps", np.int64(4))


def test_check_optimizer_names_the_option_and_what_was_passed():
    checks.check_optimizer("opt", tff.learning.optimizers.build_adam(1e-3))
    with pytest.raises(
        TypeError, match=r"opt must be a tff\.learning\.optimizers\.Optimizer.*Adam"
    ):
        checks.check_optimizer("opt", tf.keras.optimizers.Adam())
    # A builder function instead of the optimizer it builds.
    with pytest.raises(TypeError, match="function"):
        checks.check_optimizer("opt", lambda: tff.learning.optimizers.build_adam(1e-3))
    # An optimizer's name is resolved by the algorithm options, not here.
    with pytest.raises(TypeError, match="str"):
        checks.check_optimizer("opt", "adam")


def test_check_aggregator_accepts_weighted_and_unweighted_factories():
    checks.check_aggregator("agg", tff.aggregators.MeanFactory())
    checks.check_aggregator("agg", tff.aggregators.SumFactory())
    checks.check_aggregator("agg", tff.aggregators.UnweightedMeanFactory())


def test_check_aggregator_rejects_a_class_or_another_object_naming_it():
    with pytest.raises(TypeError, match=r"agg must be a tff\.aggregators\.Weighted.*class MeanF"):
        checks.check_aggregator("agg", tff.aggregators.MeanFactory)
    with pytest.raises(TypeError, match=r"agg must be .*Unweighted.*str"):
        checks.check_aggregator("agg", "mean")
