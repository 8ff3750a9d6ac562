"""Personalization evaluation of a trained state on a task's held-out clients."""

from __future__ import annotations

from typing import Optional

import numpy as np

from mfl_tff.algorithms import builders, composer
from mfl_tff.evaluation import personalization, summaries


def _eval_computation(task, alpha, max_steps: int, fine_tune_lr: float, guard_after: int, loop):
    """Builds (once per task, alpha shape and settings) the evaluation computation.

    The cache lives on the task object, so it goes away with the task and cannot be confused
    with another task's.
    """
    cache = task.__dict__.setdefault("_personalization_computations", {})
    alpha_type = composer.meta_type_of(alpha)
    key = (str(alpha_type), max_steps, fine_tune_lr, guard_after, loop)
    if key not in cache:
        cache[key] = personalization.build_personalization_eval(
            task.model_fn,
            task.client_data_type("eval"),
            alpha_type,
            max_steps=max_steps,
            fine_tune_lr=fine_tune_lr,
            guard_after=guard_after,
            loop=loop,
            example_source=getattr(task, "example_source", None),
        )
    return cache[key]


def evaluate(
    process,
    state,
    spec: builders.AlgorithmSpec,
    task,
    *,
    fine_tune_lr: float,
    max_steps: int,
    rounds: int,
    num_clients: Optional[int] = None,
    fine_tune_steps: Optional[int] = None,
    return_per_client: bool = False,
):
    """Adapts held-out clients with the algorithm's rule and the shared fine-tuning baseline.

    Args:
      process: The trained `LearningProcess`.
      state: Its state.
      spec: The algorithm's spec (`mfl_tff.algorithms.builders.build_algorithm`).
      task: The `FederatedTask`.
      fine_tune_lr: Rate of the fine-tuning baseline (and the own rule of non-alpha algorithms).
      max_steps: Length of the adaptation curves.
      rounds: Rounds trained (recorded in the report).
      num_clients: Held-out clients to use (default: all of them).
      fine_tune_steps: Step at which "after adaptation" is read for fine-tuning (default max_steps).

    Returns:
      The `personalization.json` document (see `mfl_tff.evaluation.summaries`); with
      `return_per_client`, a pair of it and the per-client curves the computation returned.
    """
    alpha = builders.evaluation_alpha(process, state, spec, fine_tune_lr)
    own_steps = min(spec.eval_steps, max_steps)
    computation = _eval_computation(
        task, alpha, max_steps, fine_tune_lr, own_steps, spec.inner_loop
    )
    ids = task.eval_data.client_ids[: num_clients or len(task.eval_data.client_ids)]
    weights = process.get_model_weights(state)
    per_client = computation(weights, alpha, task.eval_clients(ids))
    report = summaries.personalization_report(
        per_client,
        task=task.name,
        algorithm=spec.name,
        metric=task.metric,
        rounds=rounds,
        own_steps=own_steps,
        fine_tune_steps=fine_tune_steps or max_steps,
        # From the state, not `task.model_fn()`: building the Keras model again cost ~0.2 s per
        # evaluation (a quarter of the driver's time at the default evaluation interval).
        tensor_shapes=[tuple(np.shape(w)) for w in weights.trainable]
        if spec.learns_alpha
        else None,
    )
    return (report, per_client) if return_per_client else report
