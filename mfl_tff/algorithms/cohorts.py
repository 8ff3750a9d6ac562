"""Client cohorts: several clients stacked into one federated client and trained in one TF call.

TFF's per-client cost in simulation is overhead (serialising each client's values to the worker
and back), not arithmetic; see the README's performance section. A cohort of C packed clients
stacked along a new leading axis runs the unchanged per-client function on each of them inside
one `tff.tensorflow.computation` and returns the cohort's weighted mean update with the cohort's
total weight, so a weighted-mean aggregator over cohorts gives exactly the weighted mean over
clients. Non-finite clients are still rejected one by one (weight 0) before the cohort reduces.

Two ways to run the clients of a cohort, with the same results:
* a loop (`tf.map_fn` over the client function traced once): quick to build;
* `tf.vectorized_map` (`vectorize=True`): one batched op where the clients had C small ones,
  faster per round (3x on the sinusoid MLP, 1.6x for mfl on digits_fewshot), but on larger
  models its conversion of the traced graph takes seconds, most of the build of a second-order
  meta-learner (6-7 s per phase of mfl on digits). Long runs vectorize; see
  `mfl_tff.training.program.VECTORIZE_MIN_ROUNDS`.

Cohorts change what a "client" is for the aggregator, so they must stay off with per-client
aggregators (differential privacy clipping, robust aggregation).
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Sequence

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from mfl_tff.meta import inner_loop


def stacked_type(client_data_type: tff.Type, cohort_size: int) -> tff.Type:
    """The TFF type of `cohort_size` packed clients stacked along a new leading axis."""
    specs = tff.types.type_to_tf_tensor_specs(client_data_type)
    return tff.types.tensorflow_to_type(
        tf.nest.map_structure(
            lambda s: tf.TensorSpec([cohort_size] + s.shape.as_list(), s.dtype), specs
        )
    )


def reduce_cohort(outputs) -> collections.OrderedDict:
    """Per-client `client_output`s stacked on axis 0 -> one output for the cohort."""
    weights = outputs["update_weight"]
    total = tf.reduce_sum(weights)

    def weighted_mean(values):
        w = tf.reshape(weights, [-1] + [1] * (values.shape.rank - 1))
        return tf.math.divide_no_nan(tf.reduce_sum(w * values, axis=0), total)

    return collections.OrderedDict(
        update=tf.nest.map_structure(weighted_mean, outputs["update"]),
        update_weight=total,
        metrics=collections.OrderedDict(
            (k, weighted_mean(v)) for k, v in outputs["metrics"].items()
        ),
        num_examples=tf.reduce_sum(outputs["num_examples"]),
        rejected=tf.reduce_sum(outputs["rejected"]),
        num_clients=tf.reduce_sum(outputs["num_clients"]),
    )


# Clients of a looped cohort whose steps may run at once: their ops are small, and interleaving
# them keeps both cores busy (one client at a time was 1.6x slower per round on digits' mfl).
_LOOP_PARALLEL_CLIENTS = 10


def map_cohort(
    client_fn: Callable, server_args: Sequence, cohort, *, vectorize: bool = False
) -> collections.OrderedDict:
    """Runs `client_fn(*server_args, client)` for every client of the cohort and reduces.

    Args:
      client_fn: The per-client function.
      server_args: Its server arguments (the same for every client).
      cohort: Packed clients stacked along a new leading axis.
      vectorize: Run the clients under `tf.vectorized_map` instead of a loop (see the module's
        docstring).
    """
    if vectorize:
        with inner_loop.vectorized_clients():
            outputs = tf.vectorized_map(
                lambda client: client_fn(*server_args, client),
                cohort,
                fallback_to_while_loop=True,
            )
        return reduce_cohort(outputs)
    # Traced once as a function: tf.map_fn would otherwise trace the client (a second-order
    # graph for the meta-learners) again to learn its output types.
    per_client = tf.function(lambda client: client_fn(*server_args, client))
    element = tf.nest.map_structure(lambda t: tf.TensorSpec(t.shape[1:], t.dtype), cohort)
    traced = per_client.get_concrete_function(element).structured_outputs
    signature = tf.nest.map_structure(lambda t: tf.TensorSpec(t.shape, t.dtype), traced)
    outputs = tf.map_fn(
        per_client,
        cohort,
        fn_output_signature=signature,
        parallel_iterations=_LOOP_PARALLEL_CLIENTS,
    )
    return reduce_cohort(outputs)


def make_cohorts(clients: Sequence, cohort_size: int) -> list:
    """Stacks packed clients into cohorts of `cohort_size`, padding the last with empty clients
    (all-zero masks, so weight 0 and not counted as clients)."""
    if cohort_size < 1:
        raise ValueError(f"cohort_size must be >= 1, got {cohort_size}.")
    clients = list(clients)
    empty = tf.nest.map_structure(np.zeros_like, clients[0])
    while len(clients) % cohort_size:
        clients.append(empty)
    return [
        tf.nest.map_structure(lambda *a: np.stack(a), *clients[i : i + cohort_size])
        for i in range(0, len(clients), cohort_size)
    ]
