"""The --aggregator flags that experiments/train.py and experiments/compare.py share, their checks,
and the `AggregatorSet` they build (`mfl_tff.algorithms.aggregation`).

    --aggregator=mean|dp|robust|compressed|secure
    --noise_multiplier, --clip_norm, --dp_delta          dp only
    --quantization_bits, --quantization_threshold        compressed only

Bad input raises `UsageError`, whose message is one line naming the flag and the fix; the
binaries print it and exit with status 2. Cohorts stack clients into one federated client, which a
per-client aggregator (dp, robust, compressed, secure) must not see: an explicit non-zero
--cohort_size is refused with one, and `cohort_size` turns the binary's default off. TFF's runtime
has no secure summation: with --aggregator=secure the binaries run a worker whose computations
simulate secure sums as plain sums (`runtime.local_execution(simulate_secure_sums=True)`), on one
worker only.
"""

from __future__ import annotations

import math
from typing import Optional

from absl import flags

from mfl_tff.algorithms import aggregation
from mfl_tff.training import multi_worker

AGGREGATOR = flags.DEFINE_string(
    "aggregator",
    "mean",
    "How client updates (and alpha meta-gradients) are combined: mean (weighted by examples); "
    "dp (user-level differential privacy: each client clipped to --clip_norm, Gaussian noise "
    "--noise_multiplier, every client weighted the same; epsilon reported); robust (TFF's "
    "robust_aggregator: adaptive zeroing of outliers and clipping); compressed (robust's zeroing "
    "and clipping, and each client's update uniformly quantized to --quantization_bits and "
    "bitpacked: TFF's compression_aggregator); secure (TFF's secure_aggregator: the server sees "
    "only sums; simulated here as plain sums, on one worker). dp, robust, compressed and secure "
    "turn cohorts off.",
)
NOISE_MULTIPLIER = flags.DEFINE_float(
    "noise_multiplier",
    None,
    "--aggregator=dp (required): noise multiplier of a round, > 0: the noise standard deviation "
    "over the clip, as the privacy accountant counts it (mfl/meta_sgd noise each of their two "
    "streams with sqrt(2) times it).",
)
CLIP_NORM = flags.DEFINE_string(
    "clip_norm",
    None,
    "--aggregator=dp: L2 clip of each client's update and alpha meta-gradient, a number > 0, or "
    "'adaptive' (TFF's adaptive clipping to the median norm, inside the same budget); empty: "
    "adaptive.",
)
DP_DELTA = flags.DEFINE_float(
    "dp_delta",
    None,
    "--aggregator=dp: delta of the reported (epsilon, delta) guarantee, in (0, 1); empty: 1 / the "
    "number of training clients.",
)
QUANTIZATION_BITS = flags.DEFINE_integer(
    "quantization_bits",
    aggregation.DEFAULT_QUANTIZATION_BITS,
    "--aggregator=compressed: bits per coordinate of each quantized tensor, 1..16 (TFF's default "
    "8).",
)
QUANTIZATION_THRESHOLD = flags.DEFINE_integer(
    "quantization_threshold",
    aggregation.DEFAULT_QUANTIZATION_THRESHOLD,
    "--aggregator=compressed: tensors with more elements than this are quantized, smaller ones "
    "are sent as float32; the default 4 quantizes every tensor that gets smaller (at 8 bits, one "
    "of 4 or fewer elements would not), 0 every tensor (TFF's 20000 would quantize none of the "
    "built-in models).",
)

KINDS = aggregation.KINDS
# The flags that only --aggregator=dp reads.
DP_FLAGS = ("noise_multiplier", "clip_norm", "dp_delta")
# The flags that only --aggregator=compressed reads (given: `present`, as they have defaults).
COMPRESSION_FLAGS = ("quantization_bits", "quantization_threshold")
SECURE_SUMS_NOTE = (
    "--aggregator=secure: secure sums are simulated as plain sums (no cryptography; the "
    "simulation sees every client's value)."
)


class UsageError(Exception):
    """Bad input; the message is one line naming the flag or file and the fix."""


def require(condition: bool, message: str) -> None:
    if not condition:
        raise UsageError(message)


def check_kind() -> None:
    """Checks that --aggregator names a known kind."""
    require(
        AGGREGATOR.value in KINDS,
        f"--aggregator={AGGREGATOR.value!r} is not supported; choose one of: {', '.join(KINDS)}.",
    )


def check_aggregator_flags(*, num_workers: int = 1, accounts_privacy: bool = True) -> None:
    """Checks --aggregator and its own flags against each other, cohorts and the workers.

    Args:
      num_workers: Workers the binary runs on (--worker targets; 1 for a local worker).
      accounts_privacy: Whether the binary reports epsilon (train.py); where it does not
        (compare.py), --dp_delta is refused as having no use.

    Raises:
      UsageError: An unknown kind; dp without --noise_multiplier > 0, a bad --clip_norm or
        --dp_delta; dp or compressed flags with another kind; --quantization_bits outside 1..16
        or a negative --quantization_threshold; an explicit non-zero --cohort_size with a
        per-client kind; secure on several workers.
    """
    check_kind()
    kind = AGGREGATOR.value
    if kind != "dp":
        for name in DP_FLAGS:
            require(
                flags.FLAGS[name].value is None,
                f"--{name} applies only with --aggregator=dp; drop it or pass --aggregator=dp.",
            )
    else:
        noise = NOISE_MULTIPLIER.value
        require(
            noise is not None,
            "--aggregator=dp needs --noise_multiplier (> 0, e.g. --noise_multiplier=1.0).",
        )
        require(
            math.isfinite(noise) and noise > 0,
            f"--noise_multiplier must be a number > 0 with --aggregator=dp (without noise epsilon "
            f"is infinite), got {noise}.",
        )
        if CLIP_NORM.value is not None:
            try:
                aggregation.parse_clip_norm(CLIP_NORM.value)
            except ValueError:
                raise UsageError(
                    f"--clip_norm={CLIP_NORM.value!r} must be a number > 0 or 'adaptive'."
                ) from None
        delta = DP_DELTA.value
        require(
            delta is None or accounts_privacy,
            "--dp_delta is only used where epsilon is reported (experiments.train); drop it.",
        )
        require(delta is None or 0 < delta < 1, f"--dp_delta must be in (0, 1), got {delta}.")
    if kind != "compressed":
        for name in COMPRESSION_FLAGS:
            require(
                not flags.FLAGS[name].present,
                f"--{name} applies only with --aggregator=compressed; drop it or pass "
                "--aggregator=compressed.",
            )
    else:
        lo, hi = aggregation.QUANTIZATION_BITS_RANGE
        bits = QUANTIZATION_BITS.value
        require(lo <= bits <= hi, f"--quantization_bits must be in {lo}..{hi}, got {bits}.")
        threshold = QUANTIZATION_THRESHOLD.value
        require(
            threshold >= 0,
            f"--quantization_threshold must be >= 0 (0 quantizes every tensor), got {threshold}.",
        )
    cohort = flags.FLAGS["cohort_size"]
    if kind in aggregation.PER_CLIENT_KINDS and cohort.present:
        require(
            cohort.value == 0,
            f"--cohort_size={cohort.value} stacks clients into one federated client, but "
            f"--aggregator={kind} must clip each client alone; drop --cohort_size or pass "
            "--cohort_size=0.",
        )
    require(
        kind != "secure" or num_workers <= 1,
        f"--aggregator=secure runs on one worker (secure sums are simulated there), not "
        f"{num_workers}; pass one --worker.",
    )


def build(*, learns_alpha: bool, clients_per_round: int) -> aggregation.AggregatorSet:
    """The `AggregatorSet` of the checked flags, for an algorithm that learns alpha or not.

    Raises:
      UsageError: If `aggregation.build_aggregators` refuses the settings.
    """
    kind = AGGREGATOR.value
    dp = kind == "dp"
    compressed = kind == "compressed"
    try:
        return aggregation.build_aggregators(
            kind,
            learns_alpha=learns_alpha,
            noise_multiplier=NOISE_MULTIPLIER.value if dp else None,
            clip_norm=(CLIP_NORM.value or aggregation.ADAPTIVE) if dp else None,
            clients_per_round=clients_per_round if dp else None,
            quantization_bits=QUANTIZATION_BITS.value if compressed else None,
            quantization_threshold=QUANTIZATION_THRESHOLD.value if compressed else None,
        )
    except ValueError as e:
        raise UsageError(f"--aggregator={kind}: {e}") from None


def cohort_size(
    aggregators: aggregation.AggregatorSet,
    requested: Optional[int],
    clients_per_round: int,
    num_workers: int,
) -> Optional[int]:
    """The cohort size to build with: None (off) for per-client aggregators, else the requested
    one capped to leave every worker clients (`multi_worker.cohort_size_for`)."""
    if aggregators.per_client:
        return None
    return multi_worker.cohort_size_for(requested, clients_per_round, max(1, num_workers))


def simulate_secure_sums() -> bool:
    """Whether the runtime must simulate secure sums (--aggregator=secure)."""
    return AGGREGATOR.value == "secure"


def describe() -> str:
    """The aggregator as `name=value` pairs, e.g. 'aggregator=compressed quantization_bits=8
    quantization_threshold=4'."""
    kind = AGGREGATOR.value
    parts = [f"aggregator={kind}"]
    if kind == "compressed":
        parts += [f"{name}={flags.FLAGS[name].value}" for name in COMPRESSION_FLAGS]
    elif kind == "dp":
        parts.append(f"noise_multiplier={NOISE_MULTIPLIER.value:g}")
        parts.append(f"clip_norm={CLIP_NORM.value or aggregation.ADAPTIVE}")
    return " ".join(parts)
