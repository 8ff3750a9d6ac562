"""The meta-model M: from a client's own support data, the step sizes (and optimizer) of its
inner loop.

Meta-learning the inner loop's rates is Meta-SGD (Li et al., arXiv 1707.09835): one learned rate
per coordinate, the same for every client. M(D_i) goes further and makes the rates a function of
the client, computed on the client from its own data (ALFA, Baik et al., "Meta-Learning with
Adaptive Hyperparameters", arXiv 2011.00209, does this centrally; FedL2P, NeurIPS 2023, is its
federated relative). Step k of client i's inner loop is

    g_k = clip(grad L(theta_k; support batch k))              (global norm, `clip_norm`)
    v_k = beta * v_{k-1} + g_k, v_{-1} = 0                    (client_optimizer='momentum')
    theta_{k+1} = theta_k - alpha * m_k * (v_k or g_k)

per weight tensor l, where alpha is the learned rate (any granularity, `mfl_tff.meta.hparams`)
and the multiplier m_k[l] comes from the meta-model:

* `rates`: m = 1 (Meta-SGD / MFL's alpha alone);
* `per_step`: m_k = exp(3 tanh(P[k] / 3)) with learned logits P of shape [K, L] (no data);
* `conditioned`: the same squashing of o_k = MLP(f_k)[k], a network (features -> 16 ReLU ->
  K x L) of the client's features at the current iterate, f_k = [log support loss,
  log ||grad_l L(theta_k)|| for each tensor l], with gradients stopped through the features.
  The norms are read BEFORE clipping: clipped norms would all read as the clip value exactly
  when they matter most. The features
  never leave the client: only the network's parameters are broadcast and meta-trained.

With `momentum`, beta = sigmoid(b) is a learned per-tensor heavy-ball coefficient. Steps past
the K the meta-model was trained for (personalization curves) reuse step K-1's row.

Storage: with `rates` and `sgd` the meta-parameters are alpha's tuple, exactly as before;
otherwise `OrderedDict(alpha=alpha, meta_model=OrderedDict(...))` with `step_logits`,
`network` (w1, b1, w2, b2) and `momentum_logits` as they apply. The output layer starts at zero
(m = 1) and beta at `INITIAL_MOMENTUM`, so training starts from today's rates.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Sequence
from typing import Optional

import numpy as np
import tensorflow as tf

from mfl_tff.meta import hparams, inner_loop, losses

META_MODELS = ("rates", "per_step", "conditioned")
CLIENT_OPTIMIZERS = ("sgd", "momentum")
HIDDEN_UNITS = 16
# Multipliers are squashed into [exp(-3), exp(3)]: a 20x range either way around alpha.
LOG_MULTIPLIER_RANGE = 3.0
INITIAL_MOMENTUM = 0.1
# The first layer's initializer seed: fixed, so that a meta-model is reproducible from the run's
# own seed alone (it varies the data, the model and the sampling).
NETWORK_SEED = 0
# Added before the log of losses and norms so that an all-padding batch gives a finite feature.
_FEATURE_EPSILON = 1e-12


def check(meta_model: Optional[str], client_optimizer: str, *, allow_default: bool = False) -> None:
    """Raises ValueError naming the choices for an unknown meta-model or client optimizer.

    With `allow_default`, a meta-model of None passes: options not yet resolved by an algorithm
    (`mfl_tff.algorithms.algorithm.Algorithm.resolve`) mean its default by it.
    """
    if not (meta_model is None and allow_default) and meta_model not in META_MODELS:
        raise ValueError(f"meta_model must be one of {', '.join(META_MODELS)}; got {meta_model!r}.")
    if client_optimizer not in CLIENT_OPTIMIZERS:
        raise ValueError(
            f"client_optimizer must be one of {', '.join(CLIENT_OPTIMIZERS)}; "
            f"got {client_optimizer!r}."
        )


@dataclasses.dataclass(frozen=True)
class InnerLoop:
    """How a client's inner loop turns the meta-parameters into steps.

    Attributes:
      meta_model: 'rates', 'per_step' or 'conditioned'.
      client_optimizer: 'sgd' or 'momentum'.
      num_steps: K, the steps the meta-model is trained for (rows of its per-step outputs).
      clip_norm: Global-norm clipping of each support gradient (None: off).
      first_order: Stop the gradient through the support gradients (FOMAML-style
        meta-gradients; the rates and the network still receive first-order gradients).
    """

    meta_model: str = "rates"
    client_optimizer: str = "sgd"
    num_steps: int = 1
    clip_norm: Optional[float] = None
    first_order: bool = False

    def __post_init__(self):
        check(self.meta_model, self.client_optimizer)

    @property
    def structured(self) -> bool:
        """Whether the meta-parameters hold more than alpha (and so are an OrderedDict)."""
        return self.meta_model != "rates" or self.client_optimizer != "sgd"


def initial_meta(
    loop: InnerLoop,
    trainable_shapes: Sequence[Sequence[int]],
    granularity: str,
    value: float,
):
    """The meta-parameters before training: alpha at `value`, multipliers 1, beta 0.1."""
    alpha = hparams.initial_alpha(trainable_shapes, granularity, value)
    if not loop.structured:
        return alpha
    num_tensors = len(trainable_shapes)
    extra = collections.OrderedDict()
    if loop.meta_model == "per_step":
        extra["step_logits"] = np.zeros([loop.num_steps, num_tensors], np.float32)
    elif loop.meta_model == "conditioned":
        features = 1 + num_tensors
        limit = np.sqrt(6.0 / (features + HIDDEN_UNITS))  # Glorot uniform
        rng = np.random.default_rng(NETWORK_SEED)
        extra["network"] = (
            rng.uniform(-limit, limit, [features, HIDDEN_UNITS]).astype(np.float32),
            np.zeros([HIDDEN_UNITS], np.float32),
            np.zeros([HIDDEN_UNITS, loop.num_steps * num_tensors], np.float32),
            np.zeros([loop.num_steps * num_tensors], np.float32),
        )
    if loop.client_optimizer == "momentum":
        logit = np.log(INITIAL_MOMENTUM / (1.0 - INITIAL_MOMENTUM))
        extra["momentum_logits"] = np.full([num_tensors], logit, np.float32)
    return collections.OrderedDict(alpha=alpha, meta_model=extra)


def alpha_of(meta) -> tuple:
    """The learned rates alpha inside the meta-parameters."""
    if isinstance(meta, collections.abc.Mapping):
        return tuple(meta["alpha"])
    return tuple(meta)


def project(meta, min_alpha: float):
    """Projects alpha onto [min_alpha, inf); the meta-model's own parameters are unconstrained."""
    if isinstance(meta, collections.abc.Mapping):
        return collections.OrderedDict(
            alpha=hparams.project_positive(tuple(meta["alpha"]), min_alpha),
            meta_model=meta["meta_model"],
        )
    return hparams.project_positive(meta, min_alpha)


def momentum(meta) -> Optional[tf.Tensor]:
    """beta per weight tensor, or None without momentum."""
    if isinstance(meta, collections.abc.Mapping) and "momentum_logits" in meta["meta_model"]:
        return tf.sigmoid(meta["meta_model"]["momentum_logits"])
    return None


def summary(meta) -> dict[str, tf.Tensor]:
    """alpha's mean/min/max, and the mean momentum when there is one (server metrics)."""
    result = hparams.summary(alpha_of(meta))
    beta = momentum(meta)
    if beta is not None:
        result["momentum_mean"] = tf.reduce_mean(beta)
    return result


def _squash(logits: tf.Tensor) -> tf.Tensor:
    return tf.exp(LOG_MULTIPLIER_RANGE * tf.tanh(logits / LOG_MULTIPLIER_RANGE))


def features(loss: tf.Tensor, grads: Sequence[tf.Tensor]) -> tf.Tensor:
    """f = [log loss, log ||g[l]|| per tensor], gradients stopped: what `conditioned` reads."""
    norms = [tf.sqrt(tf.reduce_sum(tf.square(g))) for g in grads]
    values = tf.stack([loss] + norms)
    return tf.stop_gradient(tf.math.log(values + _FEATURE_EPSILON))


def multipliers(meta, loop: InnerLoop, step: int, loss, grads) -> Optional[tf.Tensor]:
    """m_k per weight tensor (a [L] vector), or None for `rates`."""
    row = min(step, loop.num_steps - 1)
    if loop.meta_model == "per_step":
        return _squash(meta["meta_model"]["step_logits"][row])
    if loop.meta_model == "conditioned":
        w1, b1, w2, b2 = meta["meta_model"]["network"]
        hidden = tf.nn.relu(tf.linalg.matvec(w1, features(loss, grads), transpose_a=True) + b1)
        outputs = tf.linalg.matvec(w2, hidden, transpose_a=True) + b2
        num_tensors = len(grads)
        return _squash(outputs[row * num_tensors : (row + 1) * num_tensors])
    return None


def _clip(grads: tuple, clip_norm: Optional[float]) -> tuple:
    if clip_norm is None:
        return grads
    # Spelled out (not tf.clip_by_global_norm): client cohorts run this under
    # tf.vectorized_map, which has no converter for its L2Loss op.
    norm = tf.sqrt(tf.add_n([tf.reduce_sum(tf.square(g)) for g in grads]))
    scale = clip_norm / tf.maximum(norm, clip_norm)
    return tuple(g * scale for g in grads)


def inner_step(model, trainable, non_trainable, batch, meta, loop: InnerLoop, step: int, velocity):
    """Step `step` of the inner loop on `batch`.

    Differentiable in `trainable` and in every meta-parameter (exactly, unless
    `loop.first_order`).

    Returns:
      (new trainable, new velocity or None, the step's effective rate per tensor as a [L]
      vector: the mean over the tensor's coordinates of alpha * m_k).
    """
    trainable = tuple(trainable)
    alpha = hparams.expand(alpha_of(meta), trainable)
    if loop.meta_model == "conditioned":
        with tf.GradientTape() as tape:
            tape.watch(trainable)
            loss = losses.model_loss(
                model, (trainable, non_trainable), batch["x"], batch["y"], batch["mask"]
            )
        grads = tuple(tape.gradient(loss, trainable))
    else:
        loss = None
        grads = tuple(inner_loop.batch_gradient(model, trainable, non_trainable, batch))
    if loop.first_order:
        grads = tuple(tf.stop_gradient(g) for g in grads)
    scale = multipliers(meta, loop, step, loss, grads)
    grads = _clip(grads, loop.clip_norm)
    beta = momentum(meta)
    if beta is not None:
        velocity = (
            grads
            if velocity is None
            else tuple(beta[i] * v + g for i, (v, g) in enumerate(zip(velocity, grads)))
        )
        direction = velocity
    else:
        direction = grads
    if scale is None:
        rates = alpha
    else:
        rates = tuple(a * scale[i] for i, a in enumerate(alpha))
    new = tuple(w - a * d for w, a, d in zip(trainable, rates, direction))
    effective = tf.stack([tf.reduce_mean(r) for r in rates])
    return new, velocity, effective


def adapt(model, trainable, non_trainable, support, meta, loop: InnerLoop, num_steps: int):
    """`num_steps` inner steps on `support`, unrolled so that gradients reach theta and meta.

    Returns:
      (adapted trainable weights, effective rates [num_steps, L]).
    """
    velocity, effective = None, []
    for k in range(num_steps):
        trainable, velocity, rates = inner_step(
            model,
            trainable,
            non_trainable,
            inner_loop.support_batch(support, k),
            meta,
            loop,
            k,
            velocity,
        )
        effective.append(rates)
    return trainable, tf.stack(effective)
