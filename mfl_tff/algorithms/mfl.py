"""MFL: the two-phase meta-federated learning round, learning theta and the clients' rates alpha.

One round, as TFF computations (see DESIGN.md, "The MFL round"):
  1. broadcast theta and alpha;
  2. local update (clients): K inner steps on `support` with rates alpha, then the meta-gradient of
     the `query` loss w.r.t. alpha (exact through the inner loop, or first-order);
  3. meta update (server): aggregate those (any `tff.aggregators` factory; DP and robust ones clip
     each client's), step a `tff.learning.optimizers` meta-optimizer on alpha, project alpha onto
     [min_alpha, inf);
  4. adaptive update (clients): broadcast the new alpha; each client either
     * `local`: runs E epochs of SGD with per-parameter steps alpha and returns its model delta
       (FedAvg-like; trains on `support` only by default, so the query examples that scored alpha
       in this round are not memorised by theta; `adaptive_data='all'` trains on everything), or
     * `meta`: returns the gradient w.r.t. theta of the query loss after K steps with the new alpha
       (MAML-like);
  5. aggregation (server): aggregate those, step the server optimizer on theta.

Meta-learning the inner-loop rates follows Meta-SGD (Li et al., arXiv 1707.09835) and FedMeta
(Chen et al., arXiv 1802.07876); with `local` the model step is Federated Averaging (McMahan et al.,
arXiv 1602.05629).
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from typing import Optional

import tensorflow as tf
import tensorflow_federated as tff

from mfl_tff.algorithms import client_utils, meta_composer
from mfl_tff.meta import gradients, hparams, inner_loop, losses

ADAPTIVE_UPDATES = ("local", "meta")
ADAPTIVE_DATA = ("support", "all")


def _adaptation_metrics(model, problem, weights, data, alpha, steps, first_order):
    grad_theta, grad_alpha, pre_loss, post_loss, post_metric = gradients.meta_gradients(
        model, problem, weights, data, alpha, steps, first_order=first_order
    )
    metrics = collections.OrderedDict(
        pre_adaptation_loss=pre_loss,
        post_adaptation_loss=post_loss,
        post_adaptation_metric=post_metric,
    )
    return grad_theta, grad_alpha, metrics


def build_mfl(
    model_fn: Callable[[], tff.learning.models.FunctionalModel],
    client_data_type: tff.Type,
    *,
    problem: str,
    alpha_granularity: str = "per_layer",
    initial_alpha: float = 0.01,
    inner_steps: int = 1,
    adaptive_update: str = "meta",
    local_epochs: int = 1,
    adaptive_data: str = "support",
    first_order: bool = False,
    min_alpha: float = 1e-6,
    meta_optimizer: Optional[tff.learning.optimizers.Optimizer] = None,
    server_optimizer: Optional[tff.learning.optimizers.Optimizer] = None,
    model_aggregator: Optional[tff.aggregators.AggregationFactory] = None,
    meta_aggregator: Optional[tff.aggregators.AggregationFactory] = None,
    cohort_size: Optional[int] = None,
) -> tff.learning.templates.LearningProcess:
    """Builds the two-phase MFL learning process.

    alpha stays positive because the meta update projects it onto [min_alpha, inf) after every
    meta-optimizer step (a projected-gradient step; unlike a log parameterisation it keeps the
    optimizer's step sizes in the units of alpha itself, as Meta-SGD learns them).

    Args:
      model_fn: No-argument callable returning a `tff.learning.models.FunctionalModel`.
      client_data_type: TFF type of one packed client.
      problem: 'classification' or 'regression'.
      alpha_granularity: 'scalar', 'per_layer' (one rate per weight tensor) or 'per_coordinate'.
      initial_alpha: Initial rate (every coordinate).
      inner_steps: K, inner steps on the support set.
      adaptive_update: 'meta' (MAML-like) or 'local' (FedAvg-like).
      local_epochs: E, epochs of the `local` adaptive update.
      adaptive_data: Data of the `local` update: 'support' (default) or 'all'.
      first_order: Use first-order meta-gradients (no second derivatives).
      min_alpha: Lower bound of alpha.
      meta_optimizer: Optimizer on alpha; default Adam(1e-3).
      server_optimizer: Optimizer on theta; default Adam(1e-3) for 'meta', SGD(1.0) for 'local'.
      model_aggregator: Factory for the adaptive updates, weighted or unweighted (e.g.
        `mfl_tff.algorithms.aggregation.build_aggregators`); default mean.
      meta_aggregator: Factory for the alpha meta-gradients, likewise; default mean.
      cohort_size: Stack this many clients per federated client (see `cohorts`); None: off.

    Returns:
      A `tff.learning.templates.LearningProcess`. Metrics: `meta_client_work` (pre/post-adaptation
      query loss and metric, update norm, counts), `meta_update` (meta-gradient norm, alpha
      mean/min/max), `adaptive_client_work`, `finalizer`.

    Raises:
      ValueError: For an unknown choice or an out-of-range number.
      TypeError: For an optimizer or aggregator of the wrong kind.
    """
    hparams.check_granularity(alpha_granularity)
    if adaptive_update not in ADAPTIVE_UPDATES:
        raise ValueError(
            f"adaptive_update must be one of {ADAPTIVE_UPDATES}, got {adaptive_update!r}."
        )
    if adaptive_data not in ADAPTIVE_DATA:
        raise ValueError(f"adaptive_data must be one of {ADAPTIVE_DATA}, got {adaptive_data!r}.")
    client_utils.check_positive_int("inner_steps", inner_steps)
    client_utils.check_positive_int("local_epochs", local_epochs)
    client_utils.check_positive_rate("min_alpha", min_alpha)
    model = model_fn()
    shapes = [tuple(w.shape) for w in model.initial_weights[0]]
    alpha0 = hparams.initial_alpha(shapes, alpha_granularity, initial_alpha)
    alpha_type = meta_composer.alpha_type_of(alpha0)
    weights_type = client_utils.model_weights_type(model)
    if server_optimizer is None:
        server_optimizer = (
            tff.learning.optimizers.build_adam(1e-3)
            if adaptive_update == "meta"
            else tff.learning.optimizers.build_sgdm(1.0)
        )

    def unpack(weights):
        return tuple(weights.trainable), tuple(weights.non_trainable)

    def local_update(weights, alpha, data):
        _, grad_alpha, metrics = _adaptation_metrics(
            model, problem, unpack(weights), data, tuple(alpha), inner_steps, first_order
        )
        return client_utils.client_output(
            tuple(grad_alpha), tf.reduce_sum(data["query"]["mask"]), metrics
        )

    def adaptive_update_fn(weights, alpha, data):
        trainable, non_trainable = unpack(weights)
        if adaptive_update == "meta":
            grad_theta, _, metrics = _adaptation_metrics(
                model,
                problem,
                (trainable, non_trainable),
                data,
                tuple(alpha),
                inner_steps,
                first_order,
            )
            return client_utils.client_output(
                grad_theta, tf.reduce_sum(data["query"]["mask"]), metrics
            )
        batches = inner_loop.concat_parts(data) if adaptive_data == "all" else data["support"]
        trained = inner_loop.local_sgd(
            model,
            problem,
            (trainable, non_trainable),
            batches,
            hparams.expand(tuple(alpha), trainable),
            local_epochs,
        )
        delta = tf.nest.map_structure(tf.subtract, trainable, trained)
        loss, _ = losses.part_loss_and_metric(model, problem, (trainable, non_trainable), batches)
        return client_utils.client_output(
            delta, tf.reduce_sum(batches["mask"]), collections.OrderedDict(train_loss=loss)
        )

    local_computation, adaptive_computation = (
        client_utils.build_client_computation(
            fn, (weights_type, alpha_type), client_data_type, cohort_size=cohort_size
        )
        for fn in (local_update, adaptive_update_fn)
    )

    def round_fn(parts, state, client_data):
        distributed = parts["distributor"].next(state.distributor, state.global_model_weights)
        alpha_at_clients = tff.federated_broadcast(state.alpha)
        phase1 = tff.federated_map(
            local_computation,
            tff.federated_zip((distributed.result, alpha_at_clients, client_data)),
        )
        meta_agg = parts["meta_aggregator"].next(
            state.meta_aggregator, phase1.update, phase1.update_weight
        )
        meta_fin = parts["meta_finalizer"].next(state.meta_finalizer, state.alpha, meta_agg.result)
        phase2 = tff.federated_map(
            adaptive_computation,
            tff.federated_zip(
                (distributed.result, tff.federated_broadcast(meta_fin.result), client_data)
            ),
        )
        model_agg = parts["model_aggregator"].next(
            state.model_aggregator, phase2.update, phase2.update_weight
        )
        model_fin = parts["model_finalizer"].next(
            state.model_finalizer, state.global_model_weights, model_agg.result
        )
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
            meta_client_work=client_utils.federated_client_metrics(phase1),
            meta_update=meta_fin.measurements,
            adaptive_client_work=client_utils.federated_client_metrics(phase2),
            meta_aggregator=meta_agg.measurements,
            model_aggregator=model_agg.measurements,
            finalizer=model_fin.measurements,
        )
        return new_state, metrics

    return meta_composer.build_meta_process(
        model=model,
        initial_alpha=alpha0,
        round_fn=round_fn,
        client_data_type=local_computation.type_signature.parameter[2],
        model_aggregator=model_aggregator or tff.aggregators.MeanFactory(),
        meta_aggregator=meta_aggregator or tff.aggregators.MeanFactory(),
        server_optimizer=server_optimizer,
        meta_optimizer=meta_optimizer or tff.learning.optimizers.build_adam(1e-3),
        min_alpha=min_alpha,
    )
