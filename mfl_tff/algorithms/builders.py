"""Algorithms by name, built for a task from one set of common options.

Binaries, the quality benchmark and users pick algorithms by name:

    process, spec = builders.build_algorithm("mfl", task, AlgorithmOptions(inner_steps=5))

`spec.learns_alpha` says whether `process.get_hparams(state)["alpha"]` holds learned rates (used by
personalization evaluation), `spec.eval_steps` the step count the algorithm was trained for,
and `communication.measure(process, spec.stream_aggregators)` its bytes per client per round.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Optional

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from mfl_tff.algorithms import catalog, cohorts, composer
from mfl_tff.algorithms.algorithm import OPTIMIZERS, AlgorithmOptions, build_optimizer
from mfl_tff.meta import meta_model

__all__ = [
    "ALGORITHMS",
    "LEARNS_ALPHA",
    "OPTIMIZERS",
    "AlgorithmOptions",
    "AlgorithmSpec",
    "build_algorithm",
    "build_optimizer",
    "evaluation_alpha",
    "resolved_options",
]

ALGORITHMS = catalog.names()
# The algorithms that learn rates alpha next to the model (and aggregate alpha meta-gradients).
LEARNS_ALPHA = tuple(name for name in ALGORITHMS if catalog.get(name).learns_meta)


@dataclasses.dataclass(frozen=True)
class AlgorithmSpec:
    """What the round loop and evaluation need to know about a built algorithm."""

    name: str
    learns_alpha: bool
    eval_steps: int
    cohort_size: Optional[int] = None
    inner_loop: Optional[meta_model.InnerLoop] = None
    # {stream: (aggregation process, times per round)}: what `communication.measure` counts.
    stream_aggregators: Mapping[str, Any] = dataclasses.field(default_factory=dict, compare=False)
    # A round of several phases as one computation per phase (`composer.RoundParts`).
    phase_computations: tuple = dataclasses.field(default=(), compare=False)

    def client_values(self, clients: list) -> list:
        """What `process.next` takes for these packed clients (cohorts when enabled)."""
        if self.cohort_size is None:
            return clients
        return cohorts.make_cohorts(clients, self.cohort_size)


def build_algorithm(
    name: str, task, options: Optional[AlgorithmOptions] = None
) -> tuple[tff.learning.templates.LearningProcess, AlgorithmSpec]:
    """Builds algorithm `name` for `task` (a `mfl_tff.data.FederatedTask`).

    Raises:
      ValueError: For an unknown algorithm (the message lists the choices) or a bad option.
      TypeError: For an optimizer or aggregator of the wrong kind.
    """
    record = catalog.get(name)
    options = resolved_options(name, options)
    # A task in pool mode sends indices; the client work gathers its features on the worker.
    process, parts = composer.compose_with_parts(
        record,
        task.model_fn,
        task.client_data_type(),
        options,
        example_source=getattr(task, "example_source", None),
    )
    spec = AlgorithmSpec(
        name=name,
        learns_alpha=record.learns_meta,
        eval_steps=options.inner_steps,
        cohort_size=options.cohort_size,
        inner_loop=options.inner_loop() if record.learns_meta else None,
        stream_aggregators=parts.stream_aggregators,
        phase_computations=parts.phase_computations,
    )
    return process, spec


def resolved_options(name: str, options: Optional[AlgorithmOptions] = None) -> AlgorithmOptions:
    """`options` (None: the defaults) as algorithm `name` builds with them: its defaults in
    place of None (the meta-model: `Algorithm.resolve`)."""
    return catalog.get(name).resolve(options or AlgorithmOptions())


def evaluation_alpha(process, state, spec: AlgorithmSpec, inner_lr: float):
    """The meta-parameters of the algorithm's own adaptation rule: learned alpha (with the
    meta-model's parameters when it has one: `spec.inner_loop`), or the fixed `inner_lr`."""
    if not spec.learns_alpha:
        return (np.float32(inner_lr),)
    hparams = process.get_hparams(state)
    if spec.inner_loop is not None and spec.inner_loop.structured:
        tree = composer.python_meta(hparams)
    else:
        tree = tuple(hparams["alpha"])
    return tf.nest.map_structure(lambda a: np.asarray(a, np.float32), tree)
