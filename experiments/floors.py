"""The floors the benchmark compares our rounds with: the same math without TFF.

* `TFFloor`: the algorithm's own client functions for all clients at once in one
  plain-TensorFlow graph (`tf.vectorized_map` over the stacked clients, weighted mean, the same
  optimizers), with no TFF runtime, executed by a `tf.compat.v1.Session`, fed packed clients:
  the cost of the arithmetic itself.
* `XLAFloor`: the same round on sinusoid as ONE XLA-compiled function with its clients generated
  inside: the floor of the training program end to end.
"""

from __future__ import annotations

import collections
from collections.abc import Mapping, Sequence

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from mfl_tff.algorithms import builders, catalog
from mfl_tff.data import packing
from mfl_tff.meta import meta_model

# Every registered algorithm has a floor: it composes the algorithm's own client functions.
FLOOR_ALGORITHMS = catalog.names()


# ---------------------------------------------------------------------------------------------
# The plain-TensorFlow floor.
# ---------------------------------------------------------------------------------------------


def _tuple_or_mapping(values):
    """A mapping as it is (a meta-model's meta-parameters), any other sequence as a tuple."""
    return values if isinstance(values, Mapping) else tuple(values)


def _weighted_mean(values, weights):
    total = tf.reduce_sum(weights)
    return tf.nest.map_structure(
        lambda v: tf.math.divide_no_nan(tf.tensordot(weights, v, axes=1), total), values
    )


class _FloorRound:
    """An algorithm's round in plain TensorFlow: its record's client functions and optimizers.

    Holds theta (and the meta-parameters) and the optimizer states in variables of the current
    graph. `assigns(data)` builds one round on stacked clients: each phase's client function under
    `tf.vectorized_map`, the weighted mean of its updates, the record's optimizer step per stream
    (alpha projected as the algorithm projects it), later phases seeing the new meta-parameters.
    """

    def __init__(self, name: str, model, options: builders.AlgorithmOptions):
        record = catalog.get(name)
        options = record.resolve(options)
        self._phases = record.phases(model, options)
        self._non_trainable = tuple(tf.constant(np.asarray(w)) for w in model.initial_weights[1])
        self.variables = collections.OrderedDict(
            model=[tf.Variable(np.asarray(w)) for w in model.initial_weights[0]]
        )
        self._optimizers = collections.OrderedDict(model=record.optimizer("model", options))
        self._min_meta = None
        if record.learns_meta:
            # alpha's tuple, or with a meta-model OrderedDict(alpha=..., meta_model=...), as the
            # composer keeps it (`composer.compose_with_parts`).
            initial = record.initial_meta(model, options)
            if not isinstance(initial, Mapping):
                initial = tuple(initial)
            self.variables["meta"] = tf.nest.map_structure(
                lambda a: tf.Variable(np.asarray(a, np.float32)), initial
            )
            self._optimizers["meta"] = record.optimizer("meta", options)
            self._min_meta = record.min_meta(options) if record.min_meta else None
        self._opt_states = collections.OrderedDict()
        for key, optimizer in self._optimizers.items():
            specs = tf.nest.map_structure(
                lambda v: tf.TensorSpec(v.shape, v.dtype), _tuple_or_mapping(self.variables[key])
            )
            initial_state = tf.nest.map_structure(tf.convert_to_tensor, optimizer.initialize(specs))
            self._opt_states[key] = tf.nest.map_structure(tf.Variable, initial_state)

    def assigns(self, data, **map_options) -> list:
        """The ops of one round on `data` (clients stacked on axis 0)."""

        def read(structure):
            return tf.nest.map_structure(lambda v: v.read_value(), structure)

        values = {key: _tuple_or_mapping(read(vs)) for key, vs in self.variables.items()}
        states = {key: read(state) for key, state in self._opt_states.items()}
        for phase in self._phases:
            weights = tff.learning.models.ModelWeights(values["model"], self._non_trainable)
            args = (weights, values["meta"]) if phase.takes_meta else (weights,)
            out = tf.vectorized_map(
                lambda client, args=args, phase=phase: phase.client_fn(*args, client),
                data,
                **map_options,
            )
            for stream in phase.streams:
                update = out["update"]
                if len(phase.streams) > 1:
                    update = update[stream]
                mean = _weighted_mean(_tuple_or_mapping(update), out["update_weight"])
                states[stream], stepped = self._optimizers[stream].next(
                    states[stream], values[stream], mean
                )
                if stream == "meta" and self._min_meta is not None:
                    stepped = meta_model.project(stepped, self._min_meta)
                values[stream] = _tuple_or_mapping(stepped)
        ops = []
        for key, vs in self.variables.items():
            ops += [v.assign(n) for v, n in zip(tf.nest.flatten(vs), tf.nest.flatten(values[key]))]
            ops += [
                v.assign(n)
                for v, n in zip(
                    tf.nest.flatten(self._opt_states[key]), tf.nest.flatten(states[key])
                )
            ]
        return ops


class TFFloor:
    """One round of an algorithm for all clients at once, in one plain-TensorFlow graph.

    It composes the algorithm's own record (`mfl_tff.algorithms.catalog`, see `_FloorRound`):
    the math is the TFF process's math; what is absent is TFF's runtime. A
    `tf.compat.v1.Session` runs the graph (TFF's Keras FunctionalModel only runs in a graph
    context).
    """

    def __init__(
        self,
        name: str,
        task,
        options: builders.AlgorithmOptions,
        example_round,
        *,
        intra_op_threads: int = 0,
    ):
        """The floor of `name` on `task`, its graph shaped by `example_round`'s packed clients;
        `intra_op_threads` is the session's threads per op (0: TensorFlow's default)."""
        self.name = name
        stacked = packing.stack_clients(example_round)
        # Built outside the graph: TFF's Keras conversion reads weights eagerly.
        model = task.model_fn()
        self._graph = tf.Graph()
        with self._graph.as_default():
            floor = _FloorRound(name, model, options)
            self._data = tf.nest.map_structure(
                lambda a: tf.compat.v1.placeholder(tf.as_dtype(a.dtype), (None,) + a.shape[1:]),
                stacked,
            )

            def run(data):
                with tf.control_dependencies(floor.assigns(data, fallback_to_while_loop=True)):
                    return tf.constant(0)

            self._round = tf.function(run)(self._data)
            self._variables = floor.variables
            init = tf.compat.v1.global_variables_initializer()
        self._graph.finalize()
        config = tf.compat.v1.ConfigProto(intra_op_parallelism_threads=intra_op_threads)
        self._session = tf.compat.v1.Session(graph=self._graph, config=config)
        self._session.run(init)

    def feed(self, clients: Sequence) -> dict:
        """Feed dict of one round's packed clients (stacked; data conversion is not timed)."""
        stacked = packing.stack_clients(clients)
        return dict(zip(tf.nest.flatten(self._data), tf.nest.flatten(stacked)))

    def run_round(self, feed: dict) -> None:
        """One round: every client's update, their weighted mean, the server step."""
        self._session.run(self._round, feed)

    def weights(self) -> list[np.ndarray]:
        """Current trainable weights (theta)."""
        return self._session.run(self._variables["model"])

    def close(self) -> None:
        self._session.close()


# ---------------------------------------------------------------------------------------------
# The end-to-end floor: a whole round as one XLA-compiled function, data generated inside.
# ---------------------------------------------------------------------------------------------


def _sinusoid_round_data(client_type, num_clients: int, seed):
    """`num_clients` sinusoid clients in the packed layout of `client_type`, generated in TF.

    Same distribution as `mfl_tff.data.sinusoid` (amplitude U[0.1, 5], phase U[0, pi], x
    U[-5, 5], every point real), drawn with stateless random ops from `seed`.
    """
    specs = tff.types.type_to_tf_tensor_specs(client_type)
    seeds = tf.random.experimental.stateless_split(seed, 2 + 2 * len(specs))
    amplitude = tf.random.stateless_uniform([num_clients, 1, 1], seeds[0], 0.1, 5.0)
    phase = tf.random.stateless_uniform([num_clients, 1, 1], seeds[1], 0.0, np.pi)
    client = collections.OrderedDict()
    for i, part in enumerate(("support", "query")):
        shape = [num_clients] + specs[part]["x"].shape.as_list()
        x = tf.random.stateless_uniform(shape, seeds[2 + i], -5.0, 5.0)
        y = amplitude[..., None] * tf.sin(x - phase[..., None])
        client[part] = collections.OrderedDict(
            x=x,
            y=tf.reshape(y, [num_clients] + specs[part]["y"].shape.as_list()),
            mask=tf.ones([num_clients] + specs[part]["mask"].shape.as_list()),
        )
    return client


class XLAFloor:
    """Rounds of an algorithm on the sinusoid task as ONE XLA-compiled function, no TFF.

    Each call generates the round's clients inside the function (`_sinusoid_round_data`) and
    runs `_FloorRound`: the same math as a training round, with no data feeding, no runtime and
    no per-op dispatch. It is the end-to-end floor the training program is compared with.
    """

    def __init__(self, name: str, task, options: builders.AlgorithmOptions, clients: int):
        if task.name != "sinusoid":
            raise ValueError("The XLA floor generates sinusoid clients; use --task=sinusoid.")
        client_type = task.client_data_type()
        model = task.model_fn()
        self._graph = tf.Graph()
        with self._graph.as_default():
            floor = _FloorRound(name, model, options)
            counter = tf.Variable(0, dtype=tf.int64)

            @tf.function(jit_compile=True)
            def round_fn():
                step = counter.read_value() + 1
                seed = tf.stack([tf.constant(0, tf.int64), step])
                data = _sinusoid_round_data(client_type, clients, seed)
                with tf.control_dependencies(floor.assigns(data) + [counter.assign(step)]):
                    return tf.identity(step)

            self._round = round_fn()
            self._variables = floor.variables
            init = tf.compat.v1.global_variables_initializer()
        self._graph.finalize()
        self._session = tf.compat.v1.Session(graph=self._graph)
        self._session.run(init)

    def weights(self) -> list[np.ndarray]:
        """Current trainable weights (theta)."""
        return self._session.run(self._variables["model"])

    def run_round(self) -> None:
        self._session.run(self._round)

    def close(self) -> None:
        self._session.close()
