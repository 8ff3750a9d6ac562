"""Aggregator factories by name: plain mean, user-level differential privacy, robust aggregation.

    aggregators = aggregation.build_aggregators(
        "dp", learns_alpha=True, noise_multiplier=1.0, clip_norm="adaptive", clients_per_round=100
    )
    options = builders.AlgorithmOptions(
        model_aggregator=aggregators.model, meta_aggregator=aggregators.meta
    )

Every algorithm aggregates one or two streams of client values each round: the model updates
(deltas or theta meta-gradients) and, for the algorithms that learn rates alpha (mfl, meta_sgd),
the alpha meta-gradients. Alpha is learned from client data too, so with `dp` both streams are
clipped per client and noised.

* `mean`: `tff.aggregators.MeanFactory`, weighted by example counts (the default everywhere).
* `dp`: user-level DP-FedAvg (McMahan et al., "Learning Differentially Private Recurrent Language
  Models", arXiv 1710.06963) with `tff.aggregators.DifferentiallyPrivateFactory`: each client's
  value is clipped to L2 norm `clip_norm` (fixed, or adaptive as in Andrew et al., arXiv
  1905.03871), the clipped values are summed, Gaussian noise is added and the sum is divided by
  the expected clients per round. Unweighted: every client counts the same, whatever its size.
* `robust`: `tff.learning.robust_aggregator` (adaptive zeroing of very large values, then adaptive
  L2 clipping, then the weighted mean); no noise and no privacy guarantee.

Noise and privacy accounting. `noise_multiplier` z is the effective noise multiplier of one round
as a whole, the number a privacy accountant takes (`mfl_tff.training.privacy`). Two Gaussian
mechanisms with multipliers z1, z2 (each relative to its own clip) on the same clients are,
together, one Gaussian mechanism with multiplier (z1**-2 + z2**-2)**-0.5, adaptively composed too.
So with two streams the round's budget z**-2 is split: the alpha stream gets the share s
(`meta_noise_share`), z_meta = z / sqrt(s), and the model stream the rest,
z_model = z / sqrt(1 - s); the round then costs exactly what a single release at z costs. With
adaptive clipping, TFF's `gaussian_adaptive(noise_multiplier)` likewise treats its multiplier as
the effective total of its stream and spends part of it on the noised clipped-count that adapts
the clip, adding a little more noise to the values.

Cohorts (`mfl_tff.algorithms.cohorts`) stack several clients into one federated client, so a
per-client aggregator would clip or zero a cohort's mean, not each client: `dp` and `robust` need
cohorts off (`AggregatorSet.per_client` is True; `builders.build_algorithm` refuses the mix).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Union

import numpy as np
import tensorflow_federated as tff

KINDS = ("mean", "dp", "robust")
ADAPTIVE = "adaptive"

# The share of a round's privacy budget spent on the alpha meta-gradients (mfl, meta_sgd).
DEFAULT_META_NOISE_SHARE = 0.5
# TFF's default standard deviation of the noised clipped-count, per expected client of a round.
_CLIPPED_COUNT_STDDEV_PER_CLIENT = 0.05


@dataclasses.dataclass(frozen=True)
class AggregatorSet:
    """The factories for an algorithm's streams, and what they imply.

    Attributes:
      kind: 'mean', 'dp' or 'robust'.
      model: Factory for the model updates.
      meta: Factory for the alpha meta-gradients (used by mfl and meta_sgd; None otherwise).
      per_client: Whether the factories clip or zero each client's value (cohorts must be off).
      model_noise_multiplier, meta_noise_multiplier: With `dp`, the noise multiplier each stream
        is released with (see the module docstring); None otherwise.
    """

    kind: str
    model: Union[
        tff.aggregators.WeightedAggregationFactory, tff.aggregators.UnweightedAggregationFactory
    ]
    meta: Optional[
        Union[
            tff.aggregators.WeightedAggregationFactory, tff.aggregators.UnweightedAggregationFactory
        ]
    ]
    per_client: bool
    model_noise_multiplier: Optional[float] = None
    meta_noise_multiplier: Optional[float] = None


def parse_clip_norm(value: Union[str, float, int]) -> Union[str, float]:
    """`'adaptive'` or a finite float > 0, from a number or its text.

    Raises:
      ValueError: For anything else (the message names both accepted forms).
    """
    if isinstance(value, str):
        text = value.strip()
        if text.lower() == ADAPTIVE:
            return ADAPTIVE
        try:
            value = float(text)
        except ValueError:
            value = None
    if (
        isinstance(value, (int, float, np.integer, np.floating))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value > 0
    ):
        return float(value)
    raise ValueError(f"clip_norm must be a number > 0 or 'adaptive', got {value!r}.")


def _check_noise_multiplier(value) -> float:
    is_real = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(
        value, bool
    )
    if not is_real or not math.isfinite(value) or value < 0:
        raise ValueError(f"noise_multiplier must be a finite number >= 0, got {value!r}.")
    return float(value)


def _check_clients_per_round(value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"clients_per_round must be a positive int, got {value!r}.")
    return float(value)


def dp_factory(
    *,
    noise_multiplier: float,
    clip_norm: Union[str, float],
    clients_per_round: int,
) -> tff.aggregators.UnweightedAggregationFactory:
    """One stream's `tff.aggregators.DifferentiallyPrivateFactory`.

    Args:
      noise_multiplier: This stream's noise multiplier (Gaussian noise of standard deviation
        `noise_multiplier * clip` on the sum); with adaptive clipping, the effective total of the
        value noise and the clipped-count noise (TFF's convention). 0: clipping only.
      clip_norm: The L2 clip of each client's value, or 'adaptive' (TFF's geometric adaptive
        clipping to the median norm, starting at 0.1).
      clients_per_round: Expected clients per round: the sum is divided by it.

    With adaptive clipping TFF requires `noise_multiplier < 2 * clipped_count_stddev`; its default
    clipped-count noise, 0.05 per expected client, is kept where it allows the multiplier, and
    otherwise raised to `noise_multiplier` (the values then get 15% more noise than the multiplier,
    the clipped count the rest of the budget).
    """
    noise_multiplier = _check_noise_multiplier(noise_multiplier)
    clip_norm = parse_clip_norm(clip_norm)
    expected = _check_clients_per_round(clients_per_round)
    if clip_norm != ADAPTIVE:
        return tff.aggregators.DifferentiallyPrivateFactory.gaussian_fixed(
            noise_multiplier=noise_multiplier, clients_per_round=expected, clip=clip_norm
        )
    count_stddev = None
    if noise_multiplier > 0:
        count_stddev = _CLIPPED_COUNT_STDDEV_PER_CLIENT * expected
        if noise_multiplier >= 2 * count_stddev:
            count_stddev = noise_multiplier
    return tff.aggregators.DifferentiallyPrivateFactory.gaussian_adaptive(
        noise_multiplier=noise_multiplier,
        clients_per_round=expected,
        clipped_count_stddev=count_stddev,
    )


def build_aggregators(
    kind: str,
    *,
    learns_alpha: bool,
    noise_multiplier: Optional[float] = None,
    clip_norm: Optional[Union[str, float]] = None,
    clients_per_round: Optional[int] = None,
    meta_clip_norm: Optional[Union[str, float]] = None,
    meta_noise_share: Optional[float] = None,
) -> AggregatorSet:
    """The model and meta aggregator factories of `kind` (see the module docstring).

    Args:
      kind: 'mean', 'dp' or 'robust'.
      learns_alpha: Whether the algorithm also aggregates alpha meta-gradients (mfl, meta_sgd);
        with `dp` that makes two noised streams a round.
      noise_multiplier: `dp` only (required): the round's effective noise multiplier, >= 0.
      clip_norm: `dp` only (required): a clip > 0 or 'adaptive'.
      clients_per_round: `dp` only (required): expected clients per round.
      meta_clip_norm: `dp` only: the alpha meta-gradients' clip; default `clip_norm`.
      meta_noise_share: `dp` with `learns_alpha` only: the share s in (0, 1) of the round's
        privacy budget spent on the alpha stream (module docstring); default
        `DEFAULT_META_NOISE_SHARE`.

    Returns:
      An `AggregatorSet`; `meta` is None when `learns_alpha` is False.

    Raises:
      ValueError: For an unknown kind, a missing or out-of-range `dp` setting, or a `dp` setting
        given with another kind.
    """
    if kind not in KINDS:
        raise ValueError(f"Unknown aggregator {kind!r}; choose one of: {', '.join(KINDS)}.")
    dp_settings = dict(
        noise_multiplier=noise_multiplier,
        clip_norm=clip_norm,
        clients_per_round=clients_per_round,
        meta_clip_norm=meta_clip_norm,
        meta_noise_share=meta_noise_share,
    )
    if kind != "dp":
        given = [name for name, value in dp_settings.items() if value is not None]
        if given:
            raise ValueError(f"{', '.join(given)} apply only to the 'dp' aggregator, not {kind!r}.")
        if kind == "mean":
            model = tff.aggregators.MeanFactory()
            meta = tff.aggregators.MeanFactory() if learns_alpha else None
            return AggregatorSet(kind, model, meta, per_client=False)
        model = tff.learning.robust_aggregator(zeroing=True, clipping=True, weighted=True)
        meta = (
            tff.learning.robust_aggregator(zeroing=True, clipping=True, weighted=True)
            if learns_alpha
            else None
        )
        return AggregatorSet(kind, model, meta, per_client=True)
    missing = [
        name
        for name in ("noise_multiplier", "clip_norm", "clients_per_round")
        if dp_settings[name] is None
    ]
    if missing:
        raise ValueError(f"The 'dp' aggregator needs {', '.join(missing)}.")
    effective = _check_noise_multiplier(noise_multiplier)
    if not learns_alpha:
        if meta_noise_share is not None or meta_clip_norm is not None:
            raise ValueError("meta_noise_share and meta_clip_norm need learns_alpha=True.")
        model = dp_factory(
            noise_multiplier=effective, clip_norm=clip_norm, clients_per_round=clients_per_round
        )
        return AggregatorSet(kind, model, None, per_client=True, model_noise_multiplier=effective)
    share = DEFAULT_META_NOISE_SHARE if meta_noise_share is None else meta_noise_share
    if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 < share < 1:
        raise ValueError(f"meta_noise_share must be in (0, 1), got {share!r}.")
    model_noise = effective / math.sqrt(1 - share)
    meta_noise = effective / math.sqrt(share)
    model = dp_factory(
        noise_multiplier=model_noise, clip_norm=clip_norm, clients_per_round=clients_per_round
    )
    meta = dp_factory(
        noise_multiplier=meta_noise,
        clip_norm=clip_norm if meta_clip_norm is None else meta_clip_norm,
        clients_per_round=clients_per_round,
    )
    return AggregatorSet(
        kind,
        model,
        meta,
        per_client=True,
        model_noise_multiplier=model_noise,
        meta_noise_multiplier=meta_noise,
    )
