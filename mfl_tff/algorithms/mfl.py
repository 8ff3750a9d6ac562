"""MFL: the two-phase meta-federated learning round, learning theta and the clients' rates alpha.

One round (README, "The MFL round"), as the phases the composer runs in order:
  1. broadcast theta and alpha;
  2. local update (`meta` phase, clients): K inner steps on `support` with rates alpha, then the
     meta-gradient of the `query` loss w.r.t. alpha (exact through the inner loop, or
     first-order);
  3. meta update (server): aggregate those (any `tff.aggregators` factory), step the meta
     optimizer on alpha, project alpha onto [min_alpha, inf);
  4. adaptive update (`adaptive` phase, clients): with the NEW alpha, either
     * `meta`: the gradient w.r.t. theta of the query loss after K steps (MAML-like), or
     * `local`: E epochs of SGD with per-parameter steps alpha, returning the model delta
       (FedAvg-like; on `support` only by default, so that the query examples that scored alpha
       in this round are not memorised by theta; `adaptive_data='all'` trains on everything);
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

from mfl_tff.algorithms import checks, client_work, composer
from mfl_tff.algorithms.algorithm import Algorithm, AlgorithmOptions, ClientPhase, check_common
from mfl_tff.meta import gradients, hparams, inner_loop, losses, meta_model

ADAPTIVE_UPDATES = ("local", "meta")
ADAPTIVE_DATA = ("support", "all")


def _adapted(model, weights, meta, data, options: AlgorithmOptions, wrt: str):
    theta = (tuple(weights.trainable), tuple(weights.non_trainable))
    grad_theta, grad_alpha, pre_loss, post_loss, post_metric = gradients.meta_gradients(
        model,
        theta,
        data,
        meta,
        options.inner_steps,
        wrt=wrt,
        loop=options.inner_loop(),
    )
    metrics = collections.OrderedDict(
        pre_adaptation_loss=pre_loss,
        post_adaptation_loss=post_loss,
        post_adaptation_metric=post_metric,
    )
    return grad_theta, grad_alpha, metrics


def local_update_fn(model, options: AlgorithmOptions) -> Callable:
    """Phase 1, `client_fn(weights, meta, data)`: the meta-gradient w.r.t. alpha (and the
    meta-model's parameters)."""

    def local_update(weights, meta, data):
        _, grad_meta, metrics = _adapted(model, weights, meta, data, options, "alpha")
        return client_work.client_output(grad_meta, tf.reduce_sum(data["query"]["mask"]), metrics)

    return local_update


def adaptive_update_fn(model, options: AlgorithmOptions) -> Callable:
    """Phase 2, `client_fn(weights, new_alpha, data)`: the update of theta (`meta` or `local`)."""

    def meta_update(weights, alpha, data):
        grad_theta, _, metrics = _adapted(model, weights, alpha, data, options, "theta")
        return client_work.client_output(grad_theta, tf.reduce_sum(data["query"]["mask"]), metrics)

    def local_update(weights, alpha, data):
        trainable, non_trainable = tuple(weights.trainable), tuple(weights.non_trainable)
        all_data = options.adaptive_data == "all"
        batches = inner_loop.concat_parts(data) if all_data else data["support"]
        trained = inner_loop.local_sgd(
            model,
            (trainable, non_trainable),
            batches,
            hparams.expand(tuple(alpha), trainable),
            options.local_epochs,
        )
        delta = tf.nest.map_structure(tf.subtract, trainable, trained)
        loss, _ = losses.part_loss_and_metric(model, (trainable, non_trainable), batches)
        return client_work.client_output(
            delta, tf.reduce_sum(batches["mask"]), collections.OrderedDict(train_loss=loss)
        )

    return meta_update if options.adaptive_update == "meta" else local_update


def phases(model, options: AlgorithmOptions) -> tuple[ClientPhase, ...]:
    """The MFL round: score and step alpha, then step theta with the new alpha."""
    return (
        ClientPhase("meta", local_update_fn(model, options), streams=("meta",), takes_meta=True),
        ClientPhase(
            "adaptive", adaptive_update_fn(model, options), streams=("model",), takes_meta=True
        ),
    )


def initial_alpha(model, options: AlgorithmOptions):
    """alpha at `options.alpha_granularity`, filled with `options.inner_lr` (with the
    meta-model's own parameters when `options.meta_model` or `client_optimizer` add some)."""
    shapes = [tuple(w.shape) for w in model.initial_weights[0]]
    return meta_model.initial_meta(
        options.inner_loop(), shapes, options.alpha_granularity, options.inner_lr
    )


def check(options: AlgorithmOptions) -> None:
    """Raises ValueError for an unknown choice or an out-of-range number."""
    check_common(options)
    hparams.check_granularity(options.alpha_granularity)
    if options.adaptive_update not in ADAPTIVE_UPDATES:
        raise ValueError(
            f"adaptive_update must be one of {ADAPTIVE_UPDATES}, got {options.adaptive_update!r}."
        )
    if options.adaptive_data not in ADAPTIVE_DATA:
        raise ValueError(
            f"adaptive_data must be one of {ADAPTIVE_DATA}, got {options.adaptive_data!r}."
        )
    checks.check_positive_rate("min_alpha", options.min_alpha)
    if options.adaptive_update == "local" and options.inner_loop().structured:
        raise ValueError(
            "adaptive_update='local' steps with alpha alone; use meta_model='rates' and "
            "client_optimizer='sgd' with it, or adaptive_update='meta'."
        )


MFL = Algorithm(
    name="mfl",
    paper="this project's two-phase round; Meta-SGD arXiv 1707.09835, FedMeta arXiv 1802.07876",
    phases=phases,
    # `meta` steps theta with meta-gradients (Adam, as MAML); `local` with deltas (FedAvg).
    default_server_optimizer=lambda options: (
        ("adam", 1e-3) if options.adaptive_update == "meta" else ("sgd", 1.0)
    ),
    initial_meta=initial_alpha,
    min_meta=lambda options: options.min_alpha,
    check=check,
    gradient_streams=lambda options: (
        ("meta", "model") if options.adaptive_update == "meta" else ("meta",)
    ),
    # The conditioned meta-model beat the learned rates alone in 11 of 12 federated sinusoid
    # runs at 20,000 rounds and in every few-shot digits run (README, "Meta-models: rates
    # against conditioned"). The `local` update steps with alpha alone, so it keeps `rates`.
    default_meta_model=lambda options: (
        "conditioned" if options.adaptive_update == "meta" else "rates"
    ),
)


def build_mfl(
    model_fn: Callable[[], tff.learning.models.FunctionalModel],
    client_data_type: tff.Type,
    *,
    alpha_granularity: str = "per_layer",
    initial_alpha: float = 0.01,
    inner_steps: int = 1,
    adaptive_update: str = "meta",
    local_epochs: int = 1,
    adaptive_data: str = "support",
    first_order: bool = False,
    min_alpha: float = 1e-6,
    meta_model: Optional[str] = None,
    client_optimizer: str = "sgd",
    inner_clip_norm: Optional[float] = None,
    meta_clip_norm: Optional[float] = None,
    meta_optimizer: Optional[tff.learning.optimizers.Optimizer] = None,
    server_optimizer: Optional[tff.learning.optimizers.Optimizer] = None,
    model_aggregator: Optional[tff.aggregators.AggregationFactory] = None,
    meta_aggregator: Optional[tff.aggregators.AggregationFactory] = None,
    cohort_size: Optional[int] = None,
    vectorize_cohorts: bool = False,
) -> tff.learning.templates.LearningProcess:
    """Builds the two-phase MFL learning process.

    alpha stays positive because the meta update projects it onto [min_alpha, inf) after every
    meta-optimizer step (a projected-gradient step; unlike a log parameterisation it keeps the
    optimizer's step sizes in the units of alpha itself, as Meta-SGD learns them).

    Args:
      model_fn: No-argument callable returning a `tff.learning.models.FunctionalModel`.
      client_data_type: TFF type of one packed client.
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
      vectorize_cohorts: Run each cohort under `tf.vectorized_map`, not in a loop (see
        `cohorts`): faster rounds on small models, seconds more to build.
      meta_model: 'rates', 'per_step' or 'conditioned' (`mfl_tff.meta.meta_model`): how each
        client's step sizes follow from alpha and the client's own support data. None:
        'conditioned' with adaptive_update='meta', 'rates' with 'local' (which steps with
        alpha alone).
      client_optimizer: The inner loop's optimizer: 'sgd' or 'momentum' (learned beta).
      inner_clip_norm, meta_clip_norm: Global-norm clipping of the support gradients and of
        the aggregated meta-gradients; None: 50 and 10 when inner_steps > 1, else off; 0: off.

    Returns:
      A `tff.learning.templates.LearningProcess`. Metrics: `meta_client_work` (pre/post-adaptation
      query loss and metric, update norm, counts), `meta_aggregator`, `meta_update`
      (meta-gradient norm, alpha mean/min/max), `adaptive_client_work`, `model_aggregator`,
      `finalizer`.

    Raises:
      ValueError: For an unknown choice or an out-of-range number.
      TypeError: For an optimizer or aggregator of the wrong kind.
    """
    checks.check_positive_rate("initial_alpha", initial_alpha)
    options = AlgorithmOptions(
        alpha_granularity=alpha_granularity,
        inner_lr=initial_alpha,
        inner_steps=inner_steps,
        adaptive_update=adaptive_update,
        local_epochs=local_epochs,
        adaptive_data=adaptive_data,
        first_order=first_order,
        min_alpha=min_alpha,
        meta_model=meta_model,
        client_optimizer=client_optimizer,
        inner_clip_norm=inner_clip_norm,
        meta_clip_norm=meta_clip_norm,
        meta_optimizer=meta_optimizer or "adam",
        server_optimizer=server_optimizer,
        model_aggregator=model_aggregator,
        meta_aggregator=meta_aggregator,
        cohort_size=cohort_size,
        vectorize_cohorts=vectorize_cohorts,
    )
    return composer.compose(MFL, model_fn, client_data_type, options)
