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

from mfl_tff.algorithms import checks, client_work, composer
from mfl_tff.algorithms.algorithm import Algorithm, AlgorithmOptions, ClientPhase, check_common
from mfl_tff.meta import inner_loop, losses


def local_sgd_client_fn(
    model, *, learning_rate: float, local_epochs: int, proximal_strength: float = 0.0
) -> Callable:
    """`client_fn(weights, data)`: `local_epochs` of SGD over all of a client's batches (support,
    then query); returns the model delta `initial - trained`, weighted by the example count.
    `proximal_strength` > 0 adds FedProx's proximal term (`inner_loop.local_sgd`)."""

    def client_update(weights, data):
        batches = inner_loop.concat_parts(data)
        trainable = inner_loop.local_sgd(
            model,
            (weights.trainable, weights.non_trainable),
            batches,
            tf.constant(learning_rate, tf.float32),
            local_epochs,
            proximal_strength=proximal_strength,
        )
        delta = tf.nest.map_structure(tf.subtract, weights.trainable, trainable)
        flat = losses.flatten_batches(batches)
        loss = losses.model_loss(
            model, (weights.trainable, weights.non_trainable), flat["x"], flat["y"], flat["mask"]
        )
        return client_work.client_output(
            delta, tf.reduce_sum(batches["mask"]), collections.OrderedDict(train_loss=loss)
        )

    return client_update


FEDAVG = Algorithm(
    name="fedavg",
    paper=(
        "Communication-Efficient Learning of Deep Networks from Decentralized Data, "
        "arXiv 1602.05629"
    ),
    phases=lambda model, options: (
        ClientPhase(
            "",
            local_sgd_client_fn(
                model, learning_rate=options.inner_lr, local_epochs=options.local_epochs
            ),
        ),
    ),
    default_server_optimizer=("sgd", 1.0),
    check=check_common,
)


def build_fedavg(
    model_fn: Callable[[], tff.learning.models.FunctionalModel],
    client_data_type: tff.Type,
    *,
    client_learning_rate: float = 0.1,
    local_epochs: int = 1,
    server_optimizer: Optional[tff.learning.optimizers.Optimizer] = None,
    model_aggregator: Optional[tff.aggregators.AggregationFactory] = None,
    cohort_size: Optional[int] = None,
    vectorize_cohorts: bool = False,
) -> tff.learning.templates.LearningProcess:
    """Builds FedAvg over packed client data.

    Args:
      model_fn: No-argument callable returning a `tff.learning.models.FunctionalModel`; clients
        train its own loss.
      client_data_type: TFF type of one packed client (`FederatedTask.client_data_type()`).
      client_learning_rate: Step size of the clients' local SGD.
      local_epochs: Passes over each client's batches per round.
      server_optimizer: A `tff.learning.optimizers.Optimizer`; default SGD with rate 1.0 (FedAvg).
      model_aggregator: A `tff.aggregators` factory, weighted or unweighted; default mean.
      cohort_size: Stack this many clients per federated client (see `cohorts`); None: off.
      vectorize_cohorts: Run each cohort under `tf.vectorized_map`, not in a loop (see
        `cohorts`): faster rounds on small models, seconds more to build.

    Returns:
      A `tff.learning.templates.LearningProcess`.

    Raises:
      TypeError: If an optimizer or aggregator is of the wrong kind.
      ValueError: If a rate or count is out of range.
    """
    checks.check_positive_rate("client_learning_rate", client_learning_rate)
    options = AlgorithmOptions(
        inner_lr=client_learning_rate,
        local_epochs=local_epochs,
        server_optimizer=server_optimizer,
        model_aggregator=model_aggregator,
        cohort_size=cohort_size,
        vectorize_cohorts=vectorize_cohorts,
    )
    return composer.compose(FEDAVG, model_fn, client_data_type, options)
