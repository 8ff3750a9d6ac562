"""The round loop: which clients train in round R, their packed values, and `process.next`.

Every program of the project trains through this module (the training binary, the comparison
and quality binaries, the benchmark and the tutorials), so a round means the same everywhere:

    ids = task.sample_train_ids(clients_per_round, R)        # a function of (seed, R) only
    clients = task.train_clients(ids, R)                     # packed, split drawn for round R
    values = spec.client_values(clients)                     # stacked into cohorts if enabled
    output = process.next(state, values)

Because each step is a function of (seed, R), `(R, state)` is all a run needs to resume exactly.

A round of several phases (mfl's: alpha's meta-update, then theta's adaptive update with the new
alpha) is one computation whose second aggregation consumes the first's result, which TFF cannot
split across workers. Under a multi-worker context (`mfl_tff.training.multi_worker`), or with
`by_phase=True`, it runs as its phase computations (`AlgorithmSpec.phase_computations`), one call
each on the same clients; the state and metrics are those of the one-call round.

Several rounds per TFF call: `MultiRound(process, rounds_per_call)` is ONE federated computation
that runs R rounds back to back (R copies of `process.next`, each on its own round's clients), so
the driver pays TFF's fixed per-call cost (argument serialization, the call itself) once per R
rounds. Slot i of its CLIENTS argument holds the i-th client value of each of the R rounds,
stacked along a new leading axis. Its result equals R separate calls (`tests/rounds_test.py`).
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Optional

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from mfl_tff.training import fused_rounds, multi_worker


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


def splits_clients() -> bool:
    """Whether the current TFF execution context shares each call's clients among workers."""
    return isinstance(tff.framework.get_context_stack().current, multi_worker.MultiWorkerContext)


def split_computations(process, spec) -> tuple:
    """The computations a round runs as under several workers: its phases, or `process.next`."""
    return tuple(spec.phase_computations) or (process.next,)


def check_splittable(process, spec) -> None:
    """Raises `multi_worker.NotMergeableError` if several workers cannot share this round."""
    for computation in split_computations(process, spec):
        multi_worker.check_mergeable(computation)


def next_round(
    process,
    spec,
    state: Any,
    values: list,
    *,
    by_phase: Optional[bool] = None,
    fused: Optional[fused_rounds.FusedRound] = None,
) -> tuple[Any, Any]:
    """One round on client `values`: `(state, metrics)`, as `process.next` or phase by phase.

    Args:
      by_phase: Run a several-phase round as its phase computations (module docstring). None:
        when the execution context splits clients among workers.
      fused: The round compiled to MapReduceForm (`mfl_tff.training.fused_rounds.fuse`): run it
        in place of `process.next` (same result), unless the round is split among workers.
    """
    if by_phase is None:
        by_phase = splits_clients()
    if fused is not None and not by_phase:
        return fused(state, values)
    if not (by_phase and spec.phase_computations):
        output = process.next(state, values)
        return output.state, output.metrics
    metrics = collections.OrderedDict()
    for phase in spec.phase_computations:
        state, phase_metrics = phase(state, values)
        metrics.update(phase_metrics)
    return state, metrics


def run_round(
    process: tff.learning.templates.LearningProcess,
    spec,
    task,
    state: Any,
    round_num: int,
    clients_per_round: int,
    *,
    by_phase: Optional[bool] = None,
    fused: Optional[fused_rounds.FusedRound] = None,
) -> RoundResult:
    """Trains round `round_num` from `state`.

    Args:
      process: The `LearningProcess` (`mfl_tff.algorithms.builders.build_algorithm`).
      spec: Its `AlgorithmSpec` (how clients become the process's client values).
      task: The `mfl_tff.data.FederatedTask`.
      state: The state after round `round_num - 1`.
      round_num: The round to train, from 1.
      clients_per_round: Training clients sampled for the round.
      by_phase, fused: As in `next_round`.

    Returns:
      A `RoundResult`.
    """
    ids = round_client_ids(task, clients_per_round, round_num)
    values = round_values(task, spec, ids, round_num)
    state, metrics = next_round(process, spec, state, values, by_phase=by_phase, fused=fused)
    return RoundResult(round_num, state, metrics, ids)


class MultiRound:
    """`rounds_per_call` rounds of `process` as one federated computation.

    Attributes:
      rounds_per_call: R, the rounds one call runs.
      computation: `(state@SERVER, stacked@CLIENTS) -> (state@SERVER, (metrics_1, ..., metrics_R))`.
      fused: The `FusedRound` each of the R rounds runs in place of `process.next`, or None.
    """

    def __init__(
        self,
        process: tff.learning.templates.LearningProcess,
        rounds_per_call: int,
        *,
        fused: Optional[fused_rounds.FusedRound] = None,
    ):
        if not isinstance(rounds_per_call, int) or rounds_per_call < 1:
            raise ValueError(f"rounds_per_call must be an int >= 1, got {rounds_per_call!r}.")
        self.rounds_per_call = rounds_per_call
        self.fused = fused
        state_type, data_type = process.next.type_signature.parameter
        member = data_type.member
        specs = tff.types.type_to_tf_tensor_specs(member)
        stacked = tff.types.tensorflow_to_type(
            tf.nest.map_structure(
                lambda s: tf.TensorSpec([rounds_per_call] + s.shape.as_list(), s.dtype), specs
            )
        )

        def take(r):
            @tff.tensorflow.computation(stacked)
            def round_slice(values):
                return tf.nest.map_structure(lambda t: t[r], values)

            return round_slice

        slices = [take(r) for r in range(rounds_per_call)]

        @tff.federated_computation(state_type, tff.FederatedType(stacked, tff.CLIENTS))
        def next_rounds(state, values):
            metrics = []
            for round_slice in slices:
                round_values = tff.federated_map(round_slice, values)
                if fused is None:
                    output = process.next(state, round_values)
                    state, round_metrics = output.state, output.metrics
                else:
                    output = fused.computation(state, round_values)
                    state, round_metrics = output[0], output[1]
                metrics.append(round_metrics)
            return state, tuple(metrics)

        self.computation = next_rounds

    def __call__(self, state: Any, round_values: Sequence[list]) -> tuple[Any, list]:
        """Runs the rounds whose `process.next` values are `round_values` (R lists, equal length).

        Returns:
          The state after the last round and the list of the R rounds' metrics.
        """
        if len(round_values) != self.rounds_per_call:
            raise ValueError(f"Expected {self.rounds_per_call} rounds, got {len(round_values)}.")
        slots = [
            tf.nest.map_structure(lambda *a: np.stack(a), *per_round)
            for per_round in zip(*round_values)
        ]
        state, metrics = self.computation(state, slots)
        if self.fused is None:
            return state, list(metrics)
        return self.fused.state(state), [self.fused.metrics(m) for m in metrics]


def _chunks(rounds: Sequence[int], size: int, boundary: Optional[Callable[[int], bool]]):
    """Consecutive runs of at most `size` rounds, each ending at or before every `boundary`."""
    chunk: list[int] = []
    for round_num in rounds:
        chunk.append(round_num)
        if len(chunk) == size or (boundary is not None and boundary(round_num)):
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def run_rounds(
    process: tff.learning.templates.LearningProcess,
    spec,
    task,
    *,
    clients_per_round: int,
    rounds: Iterable[int],
    state: Optional[Any] = None,
    after_round: Optional[Callable[[RoundResult], None]] = None,
    multi_round: Optional[MultiRound] = None,
    state_needed: Optional[Callable[[int], bool]] = None,
    fused: Optional[fused_rounds.FusedRound] = None,
) -> Any:
    """Trains `rounds` (ascending round numbers) from `state` and returns the final state.

    Args:
      process, spec, task, clients_per_round: As in `run_round`.
      rounds: The rounds to train, e.g. `range(start + 1, total + 1)`.
      state: The state before the first of `rounds` (None: `process.initialize()`).
      after_round: Called with each round's `RoundResult` (progress, metrics, evaluation). With
        `multi_round`, the state of a round inside a call is not materialised: its `RoundResult`
        has `state=None`, except for the last round of each call.
      multi_round: Run `multi_round.rounds_per_call` rounds per TFF call; a shorter remainder
        (or a chunk cut by `state_needed`) runs one round per call.
      state_needed: `state_needed(round_num)` is True for rounds whose state the caller needs
        (checkpoints, evaluations): a call always ends there.
      fused: As in `next_round`, for the rounds run one per call (`multi_round` has its own).

    Returns:
      The state after the last round.
    """
    if state is None:
        state = process.initialize()
    size = multi_round.rounds_per_call if multi_round is not None else 1
    chunks = list(_chunks(list(rounds), size, state_needed))

    def pack(chunk: list[int]) -> tuple[list, list]:
        ids = [round_client_ids(task, clients_per_round, r) for r in chunk]
        return ids, [round_values(task, spec, i, r) for i, r in zip(ids, chunk)]

    # The next call's clients are packed while the worker runs this call: packing is the
    # driver's largest cost per round after TFF's own, and the worker does not wait for it.
    # Values are a function of (seed, round), so the rounds are the same.
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="mfl-pack") as packer:
        upcoming = packer.submit(pack, chunks[0]) if chunks else None
        for index, chunk in enumerate(chunks):
            ids, values = upcoming.result()
            if index + 1 < len(chunks):
                upcoming = packer.submit(pack, chunks[index + 1])
            if len(chunk) == size and size > 1:
                state, metrics = multi_round(state, values)
                results = [
                    RoundResult(r, state if r == chunk[-1] else None, m, i)
                    for r, m, i in zip(chunk, metrics, ids)
                ]
            else:
                results = []
                for round_num, round_ids, round_vals in zip(chunk, ids, values):
                    state, metrics = next_round(process, spec, state, round_vals, fused=fused)
                    results.append(RoundResult(round_num, state, metrics, round_ids))
            if after_round is not None:
                for result in results:
                    after_round(result)
    return state
