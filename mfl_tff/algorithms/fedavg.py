"""FedAvg on packed client tensors: mfl_tff's fast path, equal to TFF's own FedAvg.

Federated Averaging (McMahan et al., "Communication-Efficient Learning of Deep Networks from
Decentralized Data", arXiv 1602.05629): clients run local SGD from the global model, the server
averages their model deltas weighted by example counts and applies them with a server optimizer.
The math is that of `tff.learning.algorithms.build_weighted_fed_avg` with client SGD; what differs
is that client data arrives as padded tensors, not `tf.data` datasets (about 10x faster rounds).
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from typing import Optional

import tensorflow as tf
import tensorflow_federated as tff

from mfl_tff.algorithms import client_utils, composers
from mfl_tff.meta import inner_loop, losses


def build_local_sgd_client_work(
    model_fn: Callable[[], tff.learning.models.FunctionalModel],
    client_data_type: tff.Type,
    *,
    problem: str,
    learning_rate: float,
    local_epochs: int = 1,
    cohort_size: Optional[int] = None,
) -> tff.templates.MeasuredProcess:
    """Client work: `local_epochs` of SGD over all of a client's batches (support, then query).

    Returns:
      A `tff.templates.MeasuredProcess` whose `next(state, weights@CLIENTS, data@CLIENTS)` returns a
      `ClientResult(update=initial - trained trainable weights, update_weight=num_examples)`, and
      measurements `OrderedDict(train_loss, num_examples, num_clients_rejected)` at SERVER. A client
      whose update is not finite is rejected: update zeroed, weight 0 (as TFF's FedAvg does).
    """
    model = model_fn()
    weights_type = client_utils.model_weights_type(model)

    def client_update(weights, data):
        batches = inner_loop.concat_parts(data)
        trainable = inner_loop.local_sgd(
            model,
            problem,
            (weights.trainable, weights.non_trainable),
            batches,
            tf.constant(learning_rate, tf.float32),
            local_epochs,
        )
        delta = tf.nest.map_structure(tf.subtract, weights.trainable, trainable)
        num_examples = tf.reduce_sum(batches["mask"])
        loss = losses.model_loss(
            model,
            problem,
            (weights.trainable, weights.non_trainable),
            *[losses.flatten_batches(batches)[k] for k in ("x", "y", "mask")],
        )
        return client_utils.client_output(
            delta, num_examples, collections.OrderedDict(train_loss=loss)
        )

    return client_utils.build_client_work(
        client_update, weights_type, client_data_type, cohort_size=cohort_size
    )


def build_fedavg(
    model_fn: Callable[[], tff.learning.models.FunctionalModel],
    client_data_type: tff.Type,
    *,
    problem: str,
    client_learning_rate: float = 0.1,
    local_epochs: int = 1,
    server_optimizer: Optional[tff.learning.optimizers.Optimizer] = None,
    model_aggregator: Optional[tff.aggregators.AggregationFactory] = None,
    cohort_size: Optional[int] = None,
) -> tff.learning.templates.LearningProcess:
    """Builds FedAvg over packed client data.

    Args:
      model_fn: No-argument callable returning a `tff.learning.models.FunctionalModel`.
      client_data_type: TFF type of one packed client (`FederatedTask.client_data_type()`).
      problem: 'classification' or 'regression'.
      client_learning_rate: Step size of the clients' local SGD.
      local_epochs: Passes over each client's batches per round.
      server_optimizer: A `tff.learning.optimizers.Optimizer`; default SGD with rate 1.0 (FedAvg).
      model_aggregator: A `tff.aggregators` factory, weighted or unweighted; default mean.
      cohort_size: Stack this many clients per federated client (see `cohorts`); None: off.

    Returns:
      A `tff.learning.templates.LearningProcess`.

    Raises:
      TypeError: If an optimizer or aggregator is of the wrong kind.
      ValueError: If a rate or count is out of range.
    """
    client_utils.check_positive_rate("client_learning_rate", client_learning_rate)
    client_utils.check_positive_int("local_epochs", local_epochs)
    server_optimizer = server_optimizer or tff.learning.optimizers.build_sgdm(learning_rate=1.0)
    model_aggregator = model_aggregator or tff.aggregators.MeanFactory()
    client_work = build_local_sgd_client_work(
        model_fn,
        client_data_type,
        problem=problem,
        learning_rate=client_learning_rate,
        local_epochs=local_epochs,
        cohort_size=cohort_size,
    )
    return composers.compose_model_update_process(
        model_fn(),
        client_work,
        server_optimizer=server_optimizer,
        model_aggregator=model_aggregator,
    )
