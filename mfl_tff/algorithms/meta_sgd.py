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
from collections.abc import Callable
from typing import Optional

import tensorflow as tf
import tensorflow_federated as tff

from mfl_tff.algorithms import client_utils, meta_composer
from mfl_tff.meta import gradients, hparams


def build_meta_sgd(
    model_fn: Callable[[], tff.learning.models.FunctionalModel],
    client_data_type: tff.Type,
    *,
    problem: str,
    initial_alpha: float = 0.01,
    inner_steps: int = 1,
    meta_optimizer: Optional[tff.learning.optimizers.Optimizer] = None,
    model_aggregator: Optional[tff.aggregators.AggregationFactory] = None,
    meta_aggregator: Optional[tff.aggregators.AggregationFactory] = None,
    cohort_size: Optional[int] = None,
) -> tff.learning.templates.LearningProcess:
    """Builds federated Meta-SGD.

    Args:
      model_fn: No-argument callable returning a `tff.learning.models.FunctionalModel`.
      client_data_type: TFF type of one packed client.
      problem: 'classification' or 'regression'.
      initial_alpha: Initial value of every rate.
      inner_steps: Inner steps K on the support set.
      meta_optimizer: Optimizer on theta and on alpha (separate states); default Adam(1e-3).
      model_aggregator: Factory for the theta meta-gradients, weighted or unweighted (e.g.
        `mfl_tff.algorithms.aggregation.build_aggregators`); default mean.
      meta_aggregator: Factory for the alpha meta-gradients, likewise; default mean.
      cohort_size: Stack this many clients per federated client (see `cohorts`); None: off.

    Returns:
      A `tff.learning.templates.LearningProcess`; `get_hparams(state)['alpha']` is the learned
      alpha.
    """
    client_utils.check_positive_int("inner_steps", inner_steps)
    meta_optimizer = meta_optimizer or tff.learning.optimizers.build_adam(1e-3)
    model = model_fn()
    shapes = [tuple(w.shape) for w in model.initial_weights[0]]
    alpha0 = hparams.initial_alpha(shapes, "per_coordinate", initial_alpha)
    alpha_type = meta_composer.alpha_type_of(alpha0)
    weights_type = client_utils.model_weights_type(model)

    def client_update(weights, alpha, data):
        grad_theta, grad_alpha, pre_loss, post_loss, post_metric = gradients.meta_gradients(
            model,
            problem,
            (tuple(weights.trainable), tuple(weights.non_trainable)),
            data,
            tuple(alpha),
            inner_steps,
        )
        return client_utils.client_output(
            collections.OrderedDict(theta=grad_theta, alpha=tuple(grad_alpha)),
            tf.reduce_sum(data["query"]["mask"]),
            collections.OrderedDict(
                pre_adaptation_loss=pre_loss,
                post_adaptation_loss=post_loss,
                post_adaptation_metric=post_metric,
            ),
        )

    client_computation = client_utils.build_client_computation(
        client_update, (weights_type, alpha_type), client_data_type, cohort_size=cohort_size
    )

    def round_fn(parts, state, client_data):
        distributed = parts["distributor"].next(state.distributor, state.global_model_weights)
        out = tff.federated_map(
            client_computation,
            tff.federated_zip(
                (distributed.result, tff.federated_broadcast(state.alpha), client_data)
            ),
        )
        model_agg = parts["model_aggregator"].next(
            state.model_aggregator, out.update.theta, out.update_weight
        )
        meta_agg = parts["meta_aggregator"].next(
            state.meta_aggregator, out.update.alpha, out.update_weight
        )
        model_fin = parts["model_finalizer"].next(
            state.model_finalizer, state.global_model_weights, model_agg.result
        )
        meta_fin = parts["meta_finalizer"].next(state.meta_finalizer, state.alpha, meta_agg.result)
        new_state = meta_composer.next_state(
            weights=model_fin.result,
            alpha=meta_fin.result,
            distributed=distributed,
            model_agg=model_agg,
            meta_agg=meta_agg,
            model_fin=model_fin,
            meta_fin=meta_fin,
        )
        metrics = collections.OrderedDict(
            client_work=client_utils.federated_client_metrics(out),
            meta_update=meta_fin.measurements,
            model_aggregator=model_agg.measurements,
            meta_aggregator=meta_agg.measurements,
            finalizer=model_fin.measurements,
        )
        return new_state, metrics

    return meta_composer.build_meta_process(
        model=model,
        initial_alpha=alpha0,
        round_fn=round_fn,
        client_data_type=client_computation.type_signature.parameter[2],
        model_aggregator=model_aggregator or tff.aggregators.MeanFactory(),
        meta_aggregator=meta_aggregator or tff.aggregators.MeanFactory(),
        server_optimizer=meta_optimizer,
        meta_optimizer=meta_optimizer,
        min_alpha=None,
    )
