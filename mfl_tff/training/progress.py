"""What the training program tells its user each round: progress lines, dropped clients,
divergence, and the flattened metrics they are read from (`mfl_tff.training.program`)."""

from __future__ import annotations

import collections
import math
import time
from collections.abc import Callable, Mapping
from typing import Any, Optional

import numpy as np

from mfl_tff.training import metrics_release

# A training loss this many times its first value (or not finite) is reported as diverging.
DIVERGENCE_FACTOR = 100.0


def flat_metrics(metrics: Any) -> collections.OrderedDict:
    """`{'a/b': value}` as the release managers name columns; empty entries (`()`) vanish."""
    return collections.OrderedDict(metrics_release.flatten_with_name(metrics))


def client_counts(metrics: Mapping[str, Any], sampled: int) -> collections.OrderedDict:
    """How many of a round's `sampled` clients were dropped, from its flattened metrics.

    `empty`: clients without examples (not counted by the client work); `rejected`: clients whose
    update or metrics were not finite (zeroed, weight 0; the most of any client pass); `zeroed`:
    clients whose update a robust aggregator zeroed as too large (the most of any aggregator);
    `dropped`: their sum.
    """

    def most(suffix):
        values = [int(v) for k, v in metrics.items() if k.split("/")[-1] == suffix]
        return max(values, default=0)

    counted = [int(v) for k, v in metrics.items() if k.split("/")[-1] == "num_clients"]
    empty = max(0, sampled - min(counted)) if counted else 0
    rejected, zeroed = most("num_clients_rejected"), most("zeroed_count")
    return collections.OrderedDict(
        sampled=sampled,
        dropped=empty + rejected + zeroed,
        empty=empty,
        rejected=rejected,
        zeroed=zeroed,
    )


def dropped_line(round_num: int, counts: Mapping[str, int], metrics: Mapping[str, Any]) -> str:
    """A log line for a round that dropped clients ('' if it dropped none)."""
    if not counts["dropped"]:
        return ""
    line = (
        f"note: round {round_num} dropped {counts['dropped']} of {counts['sampled']} clients "
        f"({counts['empty']} without examples, {counts['rejected']} non-finite, "
        f"{counts['zeroed']} zeroed as outliers)"
    )
    skipped = [
        "model" if name.startswith("finalizer") else name.split("/")[0]
        for name, value in metrics.items()
        if name.split("/")[-1] == "update_non_finite" and int(value)
    ]
    if skipped:
        line += f"; no finite aggregate, step skipped: {', '.join(skipped)}"
    return line


def headline_loss(metrics: Mapping[str, Any]) -> Optional[tuple[str, float]]:
    """`(label, value)` of a round's training loss in its flattened metrics (None: none).

    `train_loss` ("train loss") if there is one, else `post_adaptation_loss` ("query loss").
    """
    for suffix, label in (("train_loss", "train loss"), ("post_adaptation_loss", "query loss")):
        for name, value in metrics.items():
            if name.endswith(suffix) and np.ndim(value) == 0:
                return label, float(value)
    return None


def headline(metrics: Mapping[str, Any]) -> str:
    """The training loss of a round's flattened metrics, for a progress line."""
    loss = headline_loss(metrics)
    return f"{loss[0]} {loss[1]:.4f}" if loss else ""


def divergence_line(round_num: int, loss: float, first: Optional[float]) -> str:
    """A warning if the training `loss` of `round_num` is not finite or 100x `first` ('' if not).

    Args:
      round_num: The round.
      loss: Its headline training loss.
      first: The loss of the first round the run trained (None or <= 0: only non-finite losses
        are reported).
    """
    advice = "the run is diverging: lower --inner_lr / --meta_lr"
    if not math.isfinite(loss):
        return f"warning: round {round_num} training loss is {loss}; {advice}"
    if first is not None and first > 0 and loss >= DIVERGENCE_FACTOR * first:
        return (
            f"warning: round {round_num} training loss {loss:.4g} is "
            f"{loss / first:.0f}x its first value {first:.4g}; {advice}"
        )
    return ""


def evaluation_line(report: Mapping[str, Any]) -> str:
    """One-line summary of a personalization report."""
    before, after = report["before_adaptation"], report["after_adaptation"]
    return (
        f"held-out {report['metric']} {before['mean']:.4f} -> {after['mean']:.4f} after "
        f"{report.get('adaptation_steps', '?')} steps (p10 {after['p10']:.4f}; fine-tune "
        f"{report['fine_tune']['after_adaptation']['mean']:.4f}; {report['num_clients']} clients)"
    )


def format_duration(seconds: float) -> str:
    """`h:mm:ss` (or `m:ss` under an hour)."""
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class Progress:
    """The log lines of the round loop: progress, dropped clients, divergence."""

    def __init__(self, config, start_round: int, log: Callable[[str], None]):
        """`config` is the run's `program.ProgramConfig`."""
        self._config = config
        self._start_round = start_round
        self._log = log
        self._started = time.monotonic()
        self._first_round_done: Optional[float] = None
        # The reference of the divergence warning: the first round this process trains (after a
        # resume, the first round after the checkpoint).
        self._first_loss: Optional[float] = None
        self._warned = False

    def round_done(
        self,
        round_num: int,
        metrics: Mapping[str, Any],
        counts: Mapping[str, int],
        epsilon: Optional[float],
        report: Optional[Mapping[str, Any]],
    ) -> None:
        """Logs what round `round_num` (its flattened `metrics`) calls for."""
        dropped = dropped_line(round_num, counts, metrics)
        if dropped:
            self._log(dropped)
        loss = headline_loss(metrics)
        if loss is not None and not self._warned:
            warning = divergence_line(round_num, loss[1], self._first_loss)
            if warning:
                self._log(warning)
                self._warned = True
            if self._first_loss is None:
                self._first_loss = loss[1]
        now = time.monotonic()
        if self._first_round_done is None:
            self._first_round_done = now
        total = self._config.total_rounds
        if report is None and round_num != total and round_num % self._config.rounds_per_log:
            return
        # The first round of a process traces every computation (seconds to a minute), so the
        # rate comes from the rounds after it.
        later = round_num - self._start_round - 1
        eta = (now - self._first_round_done) / later * (total - round_num) if later else None
        line = (
            f"round {round_num:>{len(str(total))}}/{total}  elapsed "
            f"{format_duration(now - self._started)}  eta "
            f"{format_duration(eta) if eta is not None else '?'}  {headline(metrics)}"
        )
        if epsilon is not None:
            line += f"  epsilon {epsilon:.3g}"
        if report is not None:
            line += f"  | {evaluation_line(report)}"
        self._log(line.rstrip())
