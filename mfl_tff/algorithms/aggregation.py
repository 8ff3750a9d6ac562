"""Aggregator factories by name: plain mean, differential privacy, robust, compressed, secure.

    aggregators = aggregation.build_aggregators(
        "dp", learns_alpha=True, noise_multiplier=1.0, clip_norm="adaptive", clients_per_round=100
    )
    options = builders.AlgorithmOptions(
        model_aggregator=aggregators.model, meta_aggregator=aggregators.meta
    )

Every algorithm aggregates one or two streams of client values each round: the model updates
(deltas or theta meta-gradients) and, for the algorithms that learn rates alpha (mfl, meta_sgd),
the alpha meta-gradients. Alpha is learned from client data too, so every kind below applies to
both streams (with `dp` both are clipped per client and noised).

* `mean`: `tff.aggregators.MeanFactory`, weighted by example counts (the default everywhere).
* `dp`: user-level DP-FedAvg (McMahan et al., "Learning Differentially Private Recurrent Language
  Models", arXiv 1710.06963) with `tff.aggregators.DifferentiallyPrivateFactory`: each client's
  value is clipped to L2 norm `clip_norm` (fixed, or adaptive as in Andrew et al., arXiv
  1905.03871), the clipped values are summed, Gaussian noise is added and the sum is divided by
  the expected clients per round. Unweighted: every client counts the same, whatever its size.
* `robust`: `tff.learning.robust_aggregator` (adaptive zeroing of very large values, then adaptive
  L2 clipping, then the weighted mean); no noise and no privacy guarantee.
* `compressed`: `tff.learning.compression_aggregator`'s structure: robust's adaptive zeroing and
  clipping around a weighted mean whose sum is
  `tff.aggregators.EncodedSumFactory.quantize_above_threshold`. Each client uniformly quantizes
  each weighted tensor with more than `quantization_threshold` elements to `quantization_bits`
  bits between the tensor's own min and max (stochastic rounding, unbiased), bitpacks it, and
  sends the packed integers with that (min, max); smaller tensors travel as float32. TFF's default
  threshold, 20,000 elements, quantizes nothing in this project's models (the largest tensor of
  the digits MLP has 4,096 elements, sinusoid's 1,600), so the default here is 4: every tensor
  that quantization makes smaller (the (min, max) pair costs 8 bytes, so at 8 bits a tensor of 4
  or fewer elements would not shrink). With `quantization_bits=8, quantization_threshold=20000`
  the factory is TFF's own
  `tff.learning.compression_aggregator()`.
* `secure`: `tff.learning.secure_aggregator` (adaptive zeroing and clipping, and a weighted mean
  whose value and weight sums, and the counts that adapt the bounds, are
  `tff.federated_secure_sum_bitwidth`s of values clipped and quantized to integers): on a platform
  that implements secure summation the server sees only sums. TFF's C++ runtime does not
  implement it: run such computations under
  `mfl_tff.training.runtime.local_execution(simulate_secure_sums=True)`, which replaces each
  secure sum by a plain sum (no cryptography; the simulation sees every value).

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
per-client aggregator would clip, zero or quantize a cohort's mean, not each client's value:
`dp`, `robust`, `compressed` and `secure` need cohorts off (`AggregatorSet.per_client` is True;
`builders.build_algorithm` refuses the mix).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Union

import numpy as np
import tensorflow_federated as tff

KINDS = ("mean", "dp", "robust", "compressed", "secure")
# The kinds that clip, zero or quantize each client's value: cohorts must be off.
PER_CLIENT_KINDS = ("dp", "robust", "compressed", "secure")
ADAPTIVE = "adaptive"

# `compressed`: bits per quantized coordinate, and the element count a tensor must exceed to be
# quantized. TFF's own threshold (`tff.learning.compression_aggregator`) quantizes nothing in this
# project's models, whose largest tensor has 4,096 elements. Ours quantizes every tensor that gets
# smaller: a quantized tensor also carries its (min, max), 8 bytes, so at 8 bits one of 4 or fewer
# elements (per-layer alpha, a tiny bias) would not shrink and stays float32.
DEFAULT_QUANTIZATION_BITS = 8
DEFAULT_QUANTIZATION_THRESHOLD = 4
TFF_QUANTIZATION_BITS = 8
TFF_QUANTIZATION_THRESHOLD = 20000
# TFF's range of quantization bits (`EncodedSumFactory.quantize_above_threshold`).
QUANTIZATION_BITS_RANGE = (1, 16)

# The share of a round's privacy budget spent on the alpha meta-gradients (mfl, meta_sgd).
DEFAULT_META_NOISE_SHARE = 0.5
# TFF's default standard deviation of the noised clipped-count, per expected client of a round.
_CLIPPED_COUNT_STDDEV_PER_CLIENT = 0.05


@dataclasses.dataclass(frozen=True)
class AggregatorSet:
    """The factories for an algorithm's streams, and what they imply.

    Attributes:
      kind: One of `KINDS`.
      model: Factory for the model updates.
      meta: Factory for the alpha meta-gradients (used by mfl and meta_sgd; None otherwise).
      per_client: Whether the factories clip, zero or quantize each client's value (cohorts must
        be off).
      model_noise_multiplier, meta_noise_multiplier: With `dp`, the noise multiplier each stream
        is released with (see the module docstring); None otherwise.
      quantization_bits, quantization_threshold: With `compressed`, its settings; None otherwise.
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
    quantization_bits: Optional[int] = None
    quantization_threshold: Optional[int] = None

    @property
    def uses_secure_sums(self) -> bool:
        """Whether the factories aggregate with `tff.federated_secure_sum_bitwidth`, which TFF's
        C++ runtime only runs simulated (`runtime.local_execution(simulate_secure_sums=True)`)."""
        return self.kind == "secure"


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


def _check_quantization(bits, threshold) -> tuple[int, int]:
    lo, hi = QUANTIZATION_BITS_RANGE
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not lo <= bits <= hi:
        raise ValueError(f"quantization_bits must be an int in {lo}..{hi}, got {bits!r}.")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, np.integer)) or threshold < 0:
        raise ValueError(
            "quantization_threshold must be an int >= 0 (tensors with more elements than it are "
            f"quantized), got {threshold!r}."
        )
    return int(bits), int(threshold)


def _composed_compression(
    quantization_bits: int, quantization_threshold: int, **encoder_options
) -> tff.aggregators.WeightedAggregationFactory:
    """`tff.learning.compression_aggregator`'s structure, built from public TFF parts.

    Adaptive zeroing (outside) and adaptive L2 clipping around a weighted mean whose sum is
    `EncodedSumFactory.quantize_above_threshold`, with the constants of TFF 0.87's
    `_default_zeroing` and `_default_clipping` (tensorflow_federated/python/learning/
    model_update_aggregator.py). `encoder_options` go to TFF's uniform quantization encoder (as
    `compression_aggregator(**kwargs)` passes them): `stochastic=False` rounds deterministically.
    """
    value_sum = tff.aggregators.EncodedSumFactory.quantize_above_threshold(
        quantization_bits=quantization_bits, threshold=quantization_threshold, **encoder_options
    )
    factory = tff.aggregators.MeanFactory(value_sum)
    # Adapts relatively quickly to a moderately high norm (TFF's `_default_clipping`).
    clipping_norm = tff.aggregators.PrivateQuantileEstimationProcess.no_noise(
        initial_estimate=1.0, target_quantile=0.8, learning_rate=0.2
    )
    factory = tff.aggregators.clipping_factory(clipping_norm, factory)
    # Adapts very quickly to a value somewhat higher than the highest values so far seen (TFF's
    # `_default_zeroing`).
    zeroing_norm = tff.aggregators.PrivateQuantileEstimationProcess.no_noise(
        initial_estimate=10.0,
        target_quantile=0.98,
        learning_rate=math.log(10.0),
        multiplier=2.0,
        increment=1.0,
    )
    return tff.aggregators.zeroing_factory(zeroing_norm, factory)


def compression_factory(
    quantization_bits: int = DEFAULT_QUANTIZATION_BITS,
    quantization_threshold: int = DEFAULT_QUANTIZATION_THRESHOLD,
) -> tff.aggregators.WeightedAggregationFactory:
    """One stream's `compressed` factory (see the module docstring).

    Args:
      quantization_bits: Bits per quantized coordinate, an int in 1..16.
      quantization_threshold: Tensors with more elements than this are quantized; the others are
        summed as float32. 0 quantizes every tensor; the default, 4, those that get smaller.

    Returns:
      `tff.learning.compression_aggregator()` itself for TFF's settings (8 bits, threshold
      20,000); otherwise the same structure with these settings.

    Raises:
      ValueError: For bits outside 1..16 or a negative threshold (or not ints).
    """
    bits, threshold = _check_quantization(quantization_bits, quantization_threshold)
    if (bits, threshold) == (TFF_QUANTIZATION_BITS, TFF_QUANTIZATION_THRESHOLD):
        return tff.learning.compression_aggregator(zeroing=True, clipping=True, weighted=True)
    return _composed_compression(bits, threshold)


def secure_factory() -> tff.aggregators.WeightedAggregationFactory:
    """One stream's `secure` factory: `tff.learning.secure_aggregator` with adaptive zeroing and
    clipping, weighted (see the module docstring for where it runs)."""
    return tff.learning.secure_aggregator(zeroing=True, clipping=True, weighted=True)


def build_aggregators(
    kind: str,
    *,
    learns_alpha: bool,
    noise_multiplier: Optional[float] = None,
    clip_norm: Optional[Union[str, float]] = None,
    clients_per_round: Optional[int] = None,
    meta_clip_norm: Optional[Union[str, float]] = None,
    meta_noise_share: Optional[float] = None,
    quantization_bits: Optional[int] = None,
    quantization_threshold: Optional[int] = None,
) -> AggregatorSet:
    """The model and meta aggregator factories of `kind` (see the module docstring).

    Args:
      kind: One of `KINDS`: 'mean', 'dp', 'robust', 'compressed' or 'secure'.
      learns_alpha: Whether the algorithm also aggregates alpha meta-gradients (mfl, meta_sgd);
        with `dp` that makes two noised streams a round.
      noise_multiplier: `dp` only (required): the round's effective noise multiplier, >= 0.
      clip_norm: `dp` only (required): a clip > 0 or 'adaptive'.
      clients_per_round: `dp` only (required): expected clients per round.
      meta_clip_norm: `dp` only: the alpha meta-gradients' clip; default `clip_norm`.
      meta_noise_share: `dp` with `learns_alpha` only: the share s in (0, 1) of the round's
        privacy budget spent on the alpha stream (module docstring); default
        `DEFAULT_META_NOISE_SHARE`.
      quantization_bits: `compressed` only: bits per quantized coordinate, 1..16; default
        `DEFAULT_QUANTIZATION_BITS` (8).
      quantization_threshold: `compressed` only: tensors with more elements than this are
        quantized; default `DEFAULT_QUANTIZATION_THRESHOLD` (0, every tensor).

    Returns:
      An `AggregatorSet`; `meta` is None when `learns_alpha` is False.

    Raises:
      ValueError: For an unknown kind, a missing or out-of-range setting, or a setting given with
        a kind it does not apply to.
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
    compression_settings = dict(
        quantization_bits=quantization_bits, quantization_threshold=quantization_threshold
    )
    for owner, settings in (("dp", dp_settings), ("compressed", compression_settings)):
        given = [name for name, value in settings.items() if value is not None]
        if kind != owner and given:
            raise ValueError(
                f"{', '.join(given)} apply only to the {owner!r} aggregator, not {kind!r}."
            )

    def per_stream(make) -> tuple:
        return make(), (make() if learns_alpha else None)

    if kind == "mean":
        return AggregatorSet(kind, *per_stream(tff.aggregators.MeanFactory), per_client=False)
    if kind == "robust":
        model, meta = per_stream(
            lambda: tff.learning.robust_aggregator(zeroing=True, clipping=True, weighted=True)
        )
        return AggregatorSet(kind, model, meta, per_client=True)
    if kind == "secure":
        return AggregatorSet(kind, *per_stream(secure_factory), per_client=True)
    if kind == "compressed":
        bits, threshold = _check_quantization(
            DEFAULT_QUANTIZATION_BITS if quantization_bits is None else quantization_bits,
            DEFAULT_QUANTIZATION_THRESHOLD
            if quantization_threshold is None
            else quantization_threshold,
        )
        model, meta = per_stream(lambda: compression_factory(bits, threshold))
        return AggregatorSet(
            kind,
            model,
            meta,
            per_client=True,
            quantization_bits=bits,
            quantization_threshold=threshold,
        )
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
