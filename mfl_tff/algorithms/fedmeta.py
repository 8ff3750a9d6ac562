"""The FedMeta family: MAML, first-order MAML and Reptile as federated algorithms.

FedMeta (Chen et al., "Federated Meta-Learning with Fast Convergence and Efficient Communication",
arXiv 1802.07876) runs a meta-learner's outer loop at the server and its inner loop on each client:
every client adapts the global model on its `support` set and reports a meta-gradient measured on
its `query` set; the server averages them and steps a meta-optimizer (a `tff.learning.optimizers`
one).

* `maml`: exact second-order meta-gradient through K inner steps (Finn et al., arXiv 1703.03400).
* `fomaml`: the first-order approximation (same paper, section 5.2).
* `reptile`: K SGD steps on all of a client's batches; the server moves toward the adapted model
  with step epsilon (Nichol et al., "On First-Order Meta-Learning Algorithms", arXiv 1803.02999).
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from typing import Optional

import tensorflow as tf
import tensorflow_federated as tff

from mfl_tff.algorithms import checks, client_work, composer
from mfl_tff.algorithms.algorithm import Algorithm, AlgorithmOptions, ClientPhase, check_common
from mfl_tff.meta import gradients, inner_loop, losses, meta_model


def maml_client_fn(model, *, inner_lr: float, inner_steps: int, first_order: bool) -> Callable:
    """`client_fn(weights, data)`: the meta-gradient w.r.t. theta of the query loss after
    `inner_steps` steps on the support set, weighted by the query size."""

    def client_update(weights, data):
        alpha = (tf.constant(inner_lr, tf.float32),)
        theta = (weights.trainable, weights.non_trainable)
        grad_theta, _, pre_loss, post_loss, post_metric = gradients.meta_gradients(
            model, theta, data, alpha, inner_steps, first_order=first_order, wrt="theta"
        )
        _, pre_metric = losses.part_loss_and_metric(model, theta, data["query"])
        return client_work.client_output(
            grad_theta,
            tf.reduce_sum(data["query"]["mask"]),
            collections.OrderedDict(
                pre_adaptation_loss=pre_loss,
                post_adaptation_loss=post_loss,
                pre_adaptation_metric=pre_metric,
                post_adaptation_metric=post_metric,
            ),
        )

    return client_update


def reptile_client_fn(model, *, inner_lr: float, inner_steps: int) -> Callable:
    """`client_fn(weights, data)`: K SGD steps over all batches in turn; returns theta - theta_K."""

    def client_update(weights, data):
        batches = inner_loop.concat_parts(data)
        trainable, _ = meta_model.adapt(
            model,
            tuple(weights.trainable),
            tuple(weights.non_trainable),
            batches,
            (tf.constant(inner_lr, tf.float32),),
            meta_model.InnerLoop(num_steps=inner_steps),
            inner_steps,
        )
        delta = tf.nest.map_structure(tf.subtract, tuple(weights.trainable), trainable)
        loss, _ = losses.part_loss_and_metric(
            model, (weights.trainable, weights.non_trainable), batches
        )
        return client_work.client_output(
            delta, tf.reduce_sum(batches["mask"]), collections.OrderedDict(train_loss=loss)
        )

    return client_update


def _maml(name: str, first_order: bool) -> Algorithm:
    return Algorithm(
        name=name,
        paper="Model-Agnostic Meta-Learning, arXiv 1703.03400; FedMeta, arXiv 1802.07876",
        phases=lambda model, options: (
            ClientPhase(
                "",
                maml_client_fn(
                    model,
                    inner_lr=options.inner_lr,
                    inner_steps=options.inner_steps,
                    first_order=first_order,
                ),
            ),
        ),
        model_optimizer="meta",
        check=check_common,
    )


MAML = _maml("maml", first_order=False)
FOMAML = _maml("fomaml", first_order=True)


def _check_reptile(options: AlgorithmOptions) -> None:
    check_common(options)
    if options.server_lr is not None:
        checks.check_positive_rate("server_lr (Reptile's epsilon)", options.server_lr)


REPTILE = Algorithm(
    name="reptile",
    paper="On First-Order Meta-Learning Algorithms, arXiv 1803.02999",
    phases=lambda model, options: (
        ClientPhase(
            "",
            reptile_client_fn(model, inner_lr=options.inner_lr, inner_steps=options.inner_steps),
        ),
    ),
    default_server_optimizer=("sgd", 1.0),
    check=_check_reptile,
)


def build_maml(
    model_fn: Callable[[], tff.learning.models.FunctionalModel],
    client_data_type: tff.Type,
    *,
    inner_lr: float = 0.01,
    inner_steps: int = 1,
    meta_optimizer: Optional[tff.learning.optimizers.Optimizer] = None,
    model_aggregator: Optional[tff.aggregators.AggregationFactory] = None,
    cohort_size: Optional[int] = None,
    vectorize_cohorts: bool = False,
    first_order: bool = False,
) -> tff.learning.templates.LearningProcess:
    """Federated MAML with the exact second-order meta-gradient (first-order with `first_order`).

    Args:
      model_fn: No-argument callable returning a `tff.learning.models.FunctionalModel`.
      client_data_type: TFF type of one packed client.
      inner_lr: Inner-loop SGD step size (fixed, not learned).
      inner_steps: Inner steps K on the support set.
      meta_optimizer: Server optimizer on theta; default Adam(1e-3).
      model_aggregator: Aggregator of the meta-gradients, weighted or unweighted; default mean.
      cohort_size: Stack this many clients per federated client (see `cohorts`); None: off.
      vectorize_cohorts: Run each cohort under `tf.vectorized_map`, not in a loop (see
        `cohorts`): faster rounds on small models, seconds more to build.
      first_order: FOMAML: drop the second-order terms.

    Returns:
      A `tff.learning.templates.LearningProcess`.
    """
    options = AlgorithmOptions(
        inner_lr=inner_lr,
        inner_steps=inner_steps,
        meta_optimizer=meta_optimizer or "adam",
        model_aggregator=model_aggregator,
        cohort_size=cohort_size,
        vectorize_cohorts=vectorize_cohorts,
    )
    return composer.compose(FOMAML if first_order else MAML, model_fn, client_data_type, options)


def build_fomaml(
    model_fn: Callable[[], tff.learning.models.FunctionalModel],
    client_data_type: tff.Type,
    **kwargs,
) -> tff.learning.templates.LearningProcess:
    """Federated first-order MAML: the meta-gradient is grad L_query(theta_K).

    Keyword options are those of `build_maml`.
    """
    return build_maml(model_fn, client_data_type, first_order=True, **kwargs)


def build_reptile(
    model_fn: Callable[[], tff.learning.models.FunctionalModel],
    client_data_type: tff.Type,
    *,
    inner_lr: float = 0.01,
    inner_steps: int = 5,
    outer_step_size: float = 1.0,
    model_aggregator: Optional[tff.aggregators.AggregationFactory] = None,
    cohort_size: Optional[int] = None,
    vectorize_cohorts: bool = False,
) -> tff.learning.templates.LearningProcess:
    """Federated Reptile: theta <- theta - epsilon * mean(theta - theta_K).

    Args:
      model_fn: No-argument callable returning a `tff.learning.models.FunctionalModel`.
      client_data_type: TFF type of one packed client.
      inner_lr: Client SGD step size.
      inner_steps: SGD steps K per client (batches used in turn, support then query).
      outer_step_size: Reptile's epsilon: the server SGD step on the mean delta.
      model_aggregator: Aggregator of the deltas, weighted or unweighted; default mean.
      cohort_size: Stack this many clients per federated client (see `cohorts`); None: off.
      vectorize_cohorts: Run each cohort under `tf.vectorized_map`, not in a loop (see
        `cohorts`): faster rounds on small models, seconds more to build.

    Returns:
      A `tff.learning.templates.LearningProcess`.
    """
    checks.check_positive_rate("outer_step_size", outer_step_size)
    options = AlgorithmOptions(
        inner_lr=inner_lr,
        inner_steps=inner_steps,
        server_lr=outer_step_size,
        model_aggregator=model_aggregator,
        cohort_size=cohort_size,
        vectorize_cohorts=vectorize_cohorts,
    )
    return composer.compose(REPTILE, model_fn, client_data_type, options)
