"""The round loop: which clients train in round R, their packed values, and `process.next`.

Every program of the project trains through this module (the training binary, the comparison
and quality binaries, the benchmark and the tutorials), so a round means the same everywhere:

    ids = task.sample_train_ids(clients_per_round, R)        # a function of (seed, R) only
    clients = task.train_clients(ids, R)                     # packed, split drawn for round R
    values = spec.client_values(clients)                     # stacked into cohorts if enabled
    output = process.next(state, values)

Because each step is a function of (seed, R), `(R, state)` is all a run needs to resume exactly.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any, Optional

import tensorflow_federated as tff


@dataclasses.dataclass(frozen=True)
class RoundResult:
    """What one round returns.

    Attributes:
      round_num: The round (1-based).
      state: The process state after the round.
      metrics: The round's metrics, as `process.next` returned them.
      client_ids: The training clients sampled for the round.
    """

    round_num: int
    state: Any
    metrics: Any
    client_ids: list[str]


def round_client_ids(task, clients_per_round: int, round_num: int) -> list[str]:
    """The training clients of round `round_num`: a function of (task seed, round) only."""
    return task.sample_train_ids(clients_per_round, round_num)


def round_values(task, spec, client_ids: list[str], round_num: int) -> list:
    """What `process.next` takes for these clients in this round (packed, cohort-stacked)."""
    return spec.client_values(task.train_clients(client_ids, round_num))


def run_round(
    process: tff.learning.templates.LearningProcess,
    spec,
    task,
    state: Any,
    round_num: int,
    clients_per_round: int,
) -> RoundResult:
    """Trains round `round_num` from `state`.

    Args:
      process: The `LearningProcess` (`mfl_tff.algorithms.builders.build_algorithm`).
      spec: Its `AlgorithmSpec` (how clients become the process's client values).
      task: The `mfl_tff.data.FederatedTask`.
      state: The state after round `round_num - 1`.
      round_num: The round to train, from 1.
      clients_per_round: Training clients sampled for the round.

    Returns:
      A `RoundResult`.
    """
    ids = round_client_ids(task, clients_per_round, round_num)
    output = process.next(state, round_values(task, spec, ids, round_num))
    return RoundResult(round_num, output.state, output.metrics, ids)


def run_rounds(
    process: tff.learning.templates.LearningProcess,
    spec,
    task,
    *,
    clients_per_round: int,
    rounds: Iterable[int],
    state: Optional[Any] = None,
    after_round: Optional[Callable[[RoundResult], None]] = None,
) -> Any:
    """Trains `rounds` (ascending round numbers) from `state` and returns the final state.

    Args:
      process, spec, task, clients_per_round: As in `run_round`.
      rounds: The rounds to train, e.g. `range(start + 1, total + 1)`.
      state: The state before the first of `rounds` (None: `process.initialize()`).
      after_round: Called with each round's `RoundResult` (progress, metrics, evaluation).

    Returns:
      The state after the last round.
    """
    if state is None:
        state = process.initialize()
    for round_num in rounds:
        result = run_round(process, spec, task, state, round_num, clients_per_round)
        state = result.state
        if after_round is not None:
            after_round(result)
    return state
