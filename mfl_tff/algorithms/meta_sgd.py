"""Federated Meta-SGD: theta and per-coordinate rates alpha learned together in one client pass.

Meta-SGD (Li et al., "Meta-SGD: Learning to Learn Quickly for Few-Shot Learning", arXiv 1707.09835)
adapts with theta_1 = theta - alpha * grad L_support(theta) and learns both theta and alpha from the
query loss after adaptation. Federated as in FedMeta (Chen et al., arXiv 1802.07876): each client
returns the exact gradients w.r.t. theta and alpha; the server averages each and steps the
meta-optimizer on both. As in the paper, alpha is unconstrained (a coordinate may learn a negative
rate); use `mfl` for rates kept positive.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable
from typing import Optional

import tensorflow as tf
import tensorflow_federated as tff

from mfl_tff.algorithms import checks, client_work, composer
from mfl_tff.algorithms.algorithm import Algorithm, AlgorithmOptions, ClientPhase, check_common
from mfl_tff.meta import gradients, meta_model


def meta_sgd_client_fn(
    model, *, inner_steps: int, loop: Optional[meta_model.InnerLoop] = None
) -> Callable:
    """`client_fn(weights, meta, data)`: the exact gradients of the query loss after K steps
    with rates alpha (or the meta-model of `loop`), w.r.t. theta (`model` stream) and the
    meta-parameters (`meta` stream)."""
    loop = loop or meta_model.InnerLoop(num_steps=inner_steps)

    def client_update(weights, meta, data):
        grad_theta, grad_meta, pre_loss, post_loss, post_metric = gradients.meta_gradients(
            model,
            (tuple(weights.trainable), tuple(weights.non_trainable)),
            data,
            meta,
            inner_steps,
            loop=loop,
        )
        return client_work.client_output(
            collections.OrderedDict(model=grad_theta, meta=grad_meta),
            tf.reduce_sum(data["query"]["mask"]),
            collections.OrderedDict(
                pre_adaptation_loss=pre_loss,
                post_adaptation_loss=post_loss,
                post_adaptation_metric=post_metric,
            ),
        )

    return client_update


def _loop(options: AlgorithmOptions) -> meta_model.InnerLoop:
    # Meta-SGD's meta-gradients are exact; `first_order` is mfl's option.
    return dataclasses.replace(options.inner_loop(), first_order=False)


def per_coordinate_alpha(model, options: AlgorithmOptions):
    """alpha shaped like every trainable tensor, filled with `options.inner_lr` (with the
    meta-model's own parameters when `options.meta_model` or `client_optimizer` add some)."""
    shapes = [tuple(w.shape) for w in model.initial_weights[0]]
    return meta_model.initial_meta(_loop(options), shapes, "per_coordinate", options.inner_lr)


META_SGD = Algorithm(
    name="meta_sgd",
    paper="Meta-SGD: Learning to Learn Quickly for Few-Shot Learning, arXiv 1707.09835",
    phases=lambda model, options: (
        ClientPhase(
            "",
            meta_sgd_client_fn(model, inner_steps=options.inner_steps, loop=_loop(options)),
            streams=("model", "meta"),
            takes_meta=True,
        ),
    ),
    model_optimizer="meta",
    initial_meta=per_coordinate_alpha,
    check=check_common,
    gradient_streams=lambda options: ("model", "meta"),
)


def build_meta_sgd(
    model_fn: Callable[[], tff.learning.models.FunctionalModel],
    client_data_type: tff.Type,
    *,
    initial_alpha: float = 0.01,
    inner_steps: int = 1,
    meta_model: str = "rates",
    client_optimizer: str = "sgd",
    inner_clip_norm: Optional[float] = None,
    meta_clip_norm: Optional[float] = None,
    meta_optimizer: Optional[tff.learning.optimizers.Optimizer] = None,
    model_aggregator: Optional[tff.aggregators.AggregationFactory] = None,
    meta_aggregator: Optional[tff.aggregators.AggregationFactory] = None,
    cohort_size: Optional[int] = None,
    vectorize_cohorts: bool = False,
) -> tff.learning.templates.LearningProcess:
    """Builds federated Meta-SGD.

    Args:
      model_fn: No-argument callable returning a `tff.learning.models.FunctionalModel`.
      client_data_type: TFF type of one packed client.
      initial_alpha: Initial value of every rate.
      inner_steps: Inner steps K on the support set.
      meta_optimizer: Optimizer on theta and on alpha (separate states); default Adam(1e-3).
      model_aggregator: Factory for the theta meta-gradients, weighted or unweighted (e.g.
        `mfl_tff.algorithms.aggregation.build_aggregators`); default mean.
      meta_aggregator: Factory for the alpha meta-gradients, likewise; default mean.
      cohort_size: Stack this many clients per federated client (see `cohorts`); None: off.
      vectorize_cohorts: Run each cohort under `tf.vectorized_map`, not in a loop (see
        `cohorts`): faster rounds on small models, seconds more to build.
      meta_model: 'rates', 'per_step' or 'conditioned' (`mfl_tff.meta.meta_model`): how each
        client's step sizes follow from alpha and the client's own support data.
      client_optimizer: The inner loop's optimizer: 'sgd' or 'momentum' (learned beta).
      inner_clip_norm, meta_clip_norm: Global-norm clipping of the support gradients and of
        the aggregated meta-gradients; None: 50 and 10 when inner_steps > 1, else off; 0: off.

    Returns:
      A `tff.learning.templates.LearningProcess`; `get_hparams(state)['alpha']` is the learned
      alpha.
    """
    checks.check_positive_rate("initial_alpha", initial_alpha)
    options = AlgorithmOptions(
        inner_lr=initial_alpha,
        inner_steps=inner_steps,
        meta_model=meta_model,
        client_optimizer=client_optimizer,
        inner_clip_norm=inner_clip_norm,
        meta_clip_norm=meta_clip_norm,
        meta_optimizer=meta_optimizer or "adam",
        model_aggregator=model_aggregator,
        meta_aggregator=meta_aggregator,
        cohort_size=cohort_size,
        vectorize_cohorts=vectorize_cohorts,
    )
    return composer.compose(META_SGD, model_fn, client_data_type, options)
