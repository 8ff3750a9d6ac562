"""Meta-parameters: the clients' learning rates alpha, at three granularities.

alpha is stored as a tuple of tensors:
  * `scalar`: one tensor of shape [] shared by every weight;
  * `per_layer`: one tensor of shape [] per trainable weight tensor (a layer's kernel and bias each
    get their own rate);
  * `per_coordinate`: one tensor shaped like each trainable weight tensor (Meta-SGD,
    arXiv 1707.09835).
`expand` broadcasts any of them to the structure of the trainable weights, so the inner loop never
needs to know the granularity.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import tensorflow as tf

GRANULARITIES = ("scalar", "per_layer", "per_coordinate")


def check_granularity(granularity: str) -> None:
    """Raises ValueError naming the choices when `granularity` is not one of them."""
    if granularity not in GRANULARITIES:
        raise ValueError(
            f"alpha granularity must be one of {', '.join(GRANULARITIES)}; got {granularity!r}."
        )


def initial_alpha(
    trainable_shapes: Sequence[Sequence[int]], granularity: str, value: float
) -> tuple[np.ndarray, ...]:
    """alpha filled with `value`, shaped for `granularity`."""
    check_granularity(granularity)
    # Checked in float32, the dtype alpha is stored in: 1e39 would become inf, 1e-46 zero.
    if not np.isfinite(np.float32(value)) or np.float32(value) <= 0:
        raise ValueError(f"initial alpha must be a finite float32 > 0, got {value!r}.")
    if granularity == "scalar":
        return (np.float32(value),)
    if granularity == "per_layer":
        return tuple(np.float32(value) for _ in trainable_shapes)
    return tuple(np.full(shape, value, np.float32) for shape in trainable_shapes)


def expand(alpha: Sequence[tf.Tensor], trainable: Sequence[tf.Tensor]) -> tuple[tf.Tensor, ...]:
    """alpha broadcast to the structure of `trainable` (differentiable w.r.t. alpha)."""
    if len(alpha) == 1 and len(trainable) != 1:
        return tuple(alpha[0] for _ in trainable)
    if len(alpha) != len(trainable):
        raise ValueError(f"alpha has {len(alpha)} tensors, the model {len(trainable)}.")
    return tuple(alpha)


def project_positive(alpha, min_value: float):
    """Projects alpha onto [min_value, inf): how alpha stays positive after a meta step."""
    return tf.nest.map_structure(lambda a: tf.maximum(a, min_value), alpha)


def summary(alpha: Sequence[tf.Tensor]) -> dict[str, tf.Tensor]:
    """Mean, min and max over alpha's stored values (per_layer: the mean of the layer rates)."""
    flat = tf.concat([tf.reshape(a, [-1]) for a in alpha], axis=0)
    return {
        "alpha_mean": tf.reduce_mean(flat),
        "alpha_min": tf.reduce_min(flat),
        "alpha_max": tf.reduce_max(flat),
    }
