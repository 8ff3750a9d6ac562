"""Meta-gradients through a K-step inner loop, exact (second-order) or first-order.

For a client with support batches s_0..s_{S-1} and query set q, with per-coordinate step sizes a:

    theta_0 = theta,  theta_k = theta_{k-1} - a * grad L(theta_{k-1}; s_{(k-1) mod S}),
    meta-loss  L_q(theta_K).

Exact mode differentiates L_q(theta_K) w.r.t. theta and a through every inner step (Hessian terms
included), as MAML (arXiv 1703.03400) and Meta-SGD (arXiv 1707.09835). First-order mode stops the
gradient through the inner gradients, so d theta_K / d theta = I and
d L_q / d a = -sum_k grad L_q(theta_K) * g_k, the first-order formula (FOMAML).
"""

from __future__ import annotations

import collections
from typing import Optional

import tensorflow as tf

from mfl_tff.meta import inner_loop, losses, meta_model

# Where the inner loop's batches come from; kept here under its old name for callers.
support_batch = inner_loop.support_batch


def meta_gradients(
    model,
    weights,
    data,
    alpha,
    num_steps: int,
    *,
    first_order: bool = False,
    wrt: str = "both",
    loop: Optional[meta_model.InnerLoop] = None,
):
    """Gradients of the post-adaptation query loss w.r.t. theta and the meta-parameters.

    Computing only the gradient a caller uses (`wrt`) keeps the second-order graph smaller: it
    is traced, converted for client cohorts and compiled before the first round, and that build
    is most of a meta-learner's time to first round.

    Args:
      model: A `tff.learning.models.FunctionalModel`.
      weights: (trainable, non_trainable) tuples: theta.
      data: A packed client (`support`, `query`).
      alpha: Meta-parameters: alpha's tuple (see `mfl_tff.meta.hparams`), any granularity, or
        the structure of `mfl_tff.meta.meta_model` for `loop`.
      num_steps: Inner steps K.
      first_order: Drop second-order terms (when `loop` is None).
      wrt: 'both', 'theta' or 'alpha': which gradients to compute (the other is None);
        'alpha' means every meta-parameter.
      loop: The inner loop (`meta_model.InnerLoop`); None: plain SGD with rates alpha.

    Returns:
      (grad_theta, grad_meta (same structure as `alpha`), pre_adaptation_query_loss,
       post_adaptation_query_loss, post_adaptation_query_metric).
    """
    if wrt not in ("both", "theta", "alpha"):
        raise ValueError(f"wrt must be 'both', 'theta' or 'alpha', got {wrt!r}.")
    if loop is None:
        loop = meta_model.InnerLoop(num_steps=num_steps, first_order=first_order)
    trainable, non_trainable = tuple(weights[0]), tuple(weights[1])
    meta = alpha if isinstance(alpha, collections.abc.Mapping) else tuple(alpha)
    sources = {"both": (trainable, meta), "theta": (trainable,), "alpha": (meta,)}[wrt]
    with tf.GradientTape(persistent=False) as tape:
        tape.watch(sources)
        adapted, _ = meta_model.adapt(
            model, trainable, non_trainable, data["support"], meta, loop, num_steps
        )
        post_loss, post_metric = losses.part_loss_and_metric(
            model, (adapted, non_trainable), data["query"]
        )
    # A parameter a step never reaches (beta with one step) has a zero gradient, not None.
    grads = tape.gradient(post_loss, sources, unconnected_gradients=tf.UnconnectedGradients.ZERO)
    grad_theta = grads[0] if wrt in ("both", "theta") else None
    grad_alpha = grads[-1] if wrt in ("both", "alpha") else None
    pre_loss, _ = losses.part_loss_and_metric(model, (trainable, non_trainable), data["query"])
    return grad_theta, grad_alpha, pre_loss, post_loss, post_metric


def hessian_vector_product(model, trainable, non_trainable, batch, vector):
    """H v for the Hessian of the batch loss at `trainable`, by double backprop (no Hessian is
    built)."""
    with tf.GradientTape() as outer:
        outer.watch(trainable)
        with tf.GradientTape() as inner:
            inner.watch(trainable)
            loss = losses.model_loss(
                model, (trainable, non_trainable), batch["x"], batch["y"], batch["mask"]
            )
        grads = inner.gradient(loss, trainable)
        dot = tf.add_n([tf.reduce_sum(g * tf.stop_gradient(v)) for g, v in zip(grads, vector)])
    return outer.gradient(dot, trainable)
