"""Argument checks of the algorithm builders: a `TypeError` or `ValueError` a user can act on."""

from __future__ import annotations

import numpy as np
import tensorflow_federated as tff


def check_positive_rate(name: str, value: float) -> None:
    """Raises ValueError unless `value` is a finite number > 0."""
    is_real = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(
        value, bool
    )
    if not is_real or not np.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}.")


def check_optimizer(name: str, optimizer) -> None:
    """Raises TypeError unless `optimizer` is a `tff.learning.optimizers.Optimizer`."""
    if not isinstance(optimizer, tff.learning.optimizers.Optimizer):
        raise TypeError(
            f"{name} must be a tff.learning.optimizers.Optimizer (e.g. "
            f"tff.learning.optimizers.build_adam(1e-3)), got {type(optimizer).__name__}."
        )


def check_aggregator(name: str, factory) -> None:
    """Raises TypeError unless `factory` is a `tff.aggregators` factory, weighted or unweighted
    (unweighted ones, such as `tff.aggregators.DifferentiallyPrivateFactory`, count every client
    the same; see `mfl_tff.algorithms.composer.create_aggregator`)."""
    kinds = (
        tff.aggregators.WeightedAggregationFactory,
        tff.aggregators.UnweightedAggregationFactory,
    )
    if not isinstance(factory, kinds):
        what = (
            f"the class {factory.__name__}" if isinstance(factory, type) else type(factory).__name__
        )
        raise TypeError(
            f"{name} must be a tff.aggregators.WeightedAggregationFactory or "
            "UnweightedAggregationFactory instance (e.g. tff.aggregators.MeanFactory()), got "
            f"{what}."
        )


def check_positive_int(name: str, value: int) -> None:
    """Raises ValueError unless `value` is an int >= 1."""
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}.")
