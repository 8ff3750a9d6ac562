"""Per-FedAvg: personalized FedAvg with a MAML objective (Fallah et al., "Personalized Federated
Learning: A Meta-Learning Approach", arXiv 2002.07948).

Each client takes `local_steps` steps of the MAML objective on its own data, then the server
averages the resulting models. Local step t, with batches D = support batch t, D' = query batch t
and D'' = support batch t + 1:

    theta_tmp = theta - alpha grad f(theta; D)
    FO:  theta <- theta - beta grad f(theta_tmp; D')
    HF:  theta <- theta - beta (I - alpha H(theta; D'')) grad f(theta_tmp; D')

where H v is a Hessian-vector product by double backprop, never a Hessian. Batches cycle over a
client's non-empty batches. Deviation from the paper: it asks for D'' independent of D, which
holds when a client has two or more support batches; a client with ONE support batch (as packed
by `sinusoid` and `digits_fewshot`) uses that batch as both D and D''.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from typing import Optional

import tensorflow as tf
import tensorflow_federated as tff

from mfl_tff.algorithms import checks, client_work, composer
from mfl_tff.algorithms.algorithm import Algorithm, AlgorithmOptions, ClientPhase, check_common
from mfl_tff.meta import gradients, inner_loop, losses

VARIANTS = ("fo", "hf")


def per_fedavg_step(model, trainable, non_trainable, data, step: int, alpha, beta, variant: str):
    """One local Per-FedAvg step (see the module docstring); returns the new trainable weights."""
    batch_d = gradients.support_batch(data["support"], step)
    batch_d2 = gradients.support_batch(data["query"], step)
    grad = inner_loop.batch_gradient(model, trainable, non_trainable, batch_d)
    theta_tmp = tuple(w - alpha * g for w, g in zip(trainable, grad))
    outer = inner_loop.batch_gradient(model, theta_tmp, non_trainable, batch_d2)
    if variant == "hf":
        batch_d3 = gradients.support_batch(data["support"], step + 1)
        hvp = gradients.hessian_vector_product(model, trainable, non_trainable, batch_d3, outer)
        outer = tuple(o - alpha * h for o, h in zip(outer, hvp))
    return tuple(w - beta * o for w, o in zip(trainable, outer))


def per_fedavg_client_fn(
    model, *, variant: str, inner_lr: float, outer_lr: float, local_steps: int
) -> Callable:
    """`client_fn(weights, data)`: `local_steps` Per-FedAvg steps; returns the model delta."""

    def client_update(weights, data):
        initial = tuple(weights.trainable)
        non_trainable = tuple(weights.non_trainable)
        trainable = initial
        for step in range(local_steps):
            trainable = per_fedavg_step(
                model, trainable, non_trainable, data, step, inner_lr, outer_lr, variant
            )
        delta = tf.nest.map_structure(tf.subtract, initial, trainable)
        loss, _ = losses.part_loss_and_metric(
            model, (initial, non_trainable), inner_loop.concat_parts(data)
        )
        num_examples = tf.reduce_sum(data["support"]["mask"]) + tf.reduce_sum(data["query"]["mask"])
        return client_work.client_output(
            delta, num_examples, collections.OrderedDict(train_loss=loss)
        )

    return client_update


def _check(options: AlgorithmOptions) -> None:
    check_common(options)
    checks.check_positive_rate("outer_lr", options.outer_lr)


def _per_fedavg(variant: str) -> Algorithm:
    return Algorithm(
        name=f"per_fedavg_{variant}",
        paper="Personalized Federated Learning: A Meta-Learning Approach, arXiv 2002.07948",
        phases=lambda model, options: (
            ClientPhase(
                "",
                per_fedavg_client_fn(
                    model,
                    variant=variant,
                    inner_lr=options.inner_lr,
                    outer_lr=options.outer_lr,
                    local_steps=options.inner_steps,
                ),
            ),
        ),
        default_server_optimizer=("sgd", 1.0),
        check=_check,
    )


PER_FEDAVG_FO = _per_fedavg("fo")
PER_FEDAVG_HF = _per_fedavg("hf")


def build_per_fedavg(
    model_fn: Callable[[], tff.learning.models.FunctionalModel],
    client_data_type: tff.Type,
    *,
    variant: str = "fo",
    inner_lr: float = 0.01,
    outer_lr: float = 0.01,
    local_steps: int = 5,
    server_optimizer: Optional[tff.learning.optimizers.Optimizer] = None,
    model_aggregator: Optional[tff.aggregators.AggregationFactory] = None,
    cohort_size: Optional[int] = None,
    vectorize_cohorts: bool = False,
) -> tff.learning.templates.LearningProcess:
    """Builds Per-FedAvg (first-order 'fo' or Hessian-free 'hf').

    Args:
      model_fn: No-argument callable returning a `tff.learning.models.FunctionalModel`.
      client_data_type: TFF type of one packed client.
      variant: 'fo' or 'hf'.
      inner_lr: alpha, the personalization step size.
      outer_lr: beta, the local meta step size.
      local_steps: tau, local steps per round.
      server_optimizer: Applied to the mean delta; default SGD 1.0 (model averaging).
      model_aggregator: Aggregator of the deltas, weighted or unweighted; default mean.
      cohort_size: Stack this many clients per federated client (see `cohorts`); None: off.
      vectorize_cohorts: Run each cohort under `tf.vectorized_map`, not in a loop (see
        `cohorts`): faster rounds on small models, seconds more to build.

    Returns:
      A `tff.learning.templates.LearningProcess`.
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}.")
    checks.check_positive_int("local_steps", local_steps)
    options = AlgorithmOptions(
        inner_lr=inner_lr,
        outer_lr=outer_lr,
        inner_steps=local_steps,
        server_optimizer=server_optimizer,
        model_aggregator=model_aggregator,
        cohort_size=cohort_size,
        vectorize_cohorts=vectorize_cohorts,
    )
    record = PER_FEDAVG_FO if variant == "fo" else PER_FEDAVG_HF
    return composer.compose(record, model_fn, client_data_type, options)
