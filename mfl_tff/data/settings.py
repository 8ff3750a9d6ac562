"""`TaskSettings`: the hyperparameters a task's protocol trains with, carried by the task.

Every built-in task sets the values its protocol uses (for example sinusoid trains as in MAML and
Meta-SGD: 10 shots, one inner step at rate 0.01, per-coordinate rates). The binaries fill each of
their hyperparameter flags that is left unset from `task.settings`, so any task trains sensibly
with no flags, and a flag given explicitly wins:

    settings = task.settings.with_overrides(inner_lr=0.05, inner_steps=None)  # None: the task's
    settings.inner_lr, settings.inner_steps   # 0.05, the task's inner_steps

The field names are the flag names they fill.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Collection
from typing import Any, Optional, Union

import numpy as np

# A task's shots: one count for every client, or a range (lo, hi) each client draws its own from.
Shots = Union[int, tuple[int, int]]
# Observation noise: one standard deviation, or a range (lo, hi) each client draws its own from.
Noise = Union[float, tuple[float, float]]


@dataclasses.dataclass(frozen=True)
class TaskSettings:
    """Recommended hyperparameters of a task. The defaults are those of tasks that set none.

    The defaults are what the training binary used for every task before tasks carried settings
    (the few-shot digits protocol), so a user's task trains as it did then.

    Attributes:
      inner_lr: The clients' step size: FedAvg's local SGD rate, the inner-loop rate of
        maml/fomaml/reptile/Per-FedAvg (Per-FedAvg's alpha), the initial learned rates of mfl and
        meta_sgd, and the rate of the fine-tuning held-out clients adapt with.
      inner_steps: K, inner-loop steps on the support set (local steps of reptile and Per-FedAvg).
      local_epochs: E, local epochs of fedavg and of mfl's `local` adaptive update.
      outer_lr: Per-FedAvg's beta, the step size of its second local step.
      meta_optimizer: Server optimizer of what is meta-learned: theta (and alpha) for
        maml/fomaml/meta_sgd, alpha only for mfl.
      meta_lr: Learning rate of `meta_optimizer`; 0 freezes what it steps (an ablation).
      alpha_granularity: Granularity of the learned rates: scalar, per_layer or per_coordinate.
      clients_per_round: Training clients sampled each round.
      eval_adaptation_steps: Adaptation steps on each held-out client's support set; None: the
        same as `inner_steps` (adapt as in training).
      shots: Support examples per client (per class for N-way tasks) the task was built with: a
        count, or a range (lo, hi) from which each client draws its own (see `check_shots`); None
        for tasks without a shot count (those split each client's examples in half).
    """

    inner_lr: float = 0.4
    inner_steps: int = 5
    local_epochs: int = 1
    outer_lr: float = 0.01
    meta_optimizer: str = "adam"
    meta_lr: float = 1e-3
    alpha_granularity: str = "per_layer"
    clients_per_round: int = 25
    eval_adaptation_steps: Optional[int] = None
    shots: Optional[Shots] = None

    def __post_init__(self):
        for name in ("inner_lr", "outer_lr"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}.")
        if not (
            isinstance(self.meta_lr, (int, float))
            and math.isfinite(self.meta_lr)
            and self.meta_lr >= 0
        ):
            raise ValueError(f"meta_lr must be a finite number >= 0, got {self.meta_lr!r}.")
        for name in ("inner_steps", "local_epochs", "clients_per_round"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}.")
        value = self.eval_adaptation_steps
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(
                f"eval_adaptation_steps must be None or an integer >= 1, got {value!r}."
            )
        if self.shots is not None:
            try:
                shots = check_shots(self.shots)
            except ValueError:
                shots = None
            if shots != self.shots:
                raise ValueError(
                    "shots must be None, an integer >= 1 or a range (lo, hi) of integers with "
                    f"1 <= lo < hi, got {self.shots!r}."
                )
        for name in ("meta_optimizer", "alpha_granularity"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise ValueError(f"{name} must be a non-empty string, got {value!r}.")

    @property
    def adaptation_steps(self) -> int:
        """Adaptation steps of held-out clients: `eval_adaptation_steps`, else `inner_steps`."""
        return self.eval_adaptation_steps or self.inner_steps

    def with_overrides(self, **values: Any) -> TaskSettings:
        """These settings with every value that is not None replaced (unset flags pass None).

        Raises:
          TypeError: If a name is not a field of `TaskSettings`.
          ValueError: If a value is out of range.
        """
        unknown = sorted(set(values) - set(names()))
        if unknown:
            raise TypeError(f"TaskSettings has no field(s) {unknown}; it has {names()}.")
        return dataclasses.replace(self, **{k: v for k, v in values.items() if v is not None})

    def as_dict(self) -> dict[str, Any]:
        """The settings by field name in definition order, as a run uses them.

        `eval_adaptation_steps` is resolved to `adaptation_steps`, so the dict holds no None but
        `shots` of a task without a shot count.
        """
        values = {name: getattr(self, name) for name in names()}
        values["eval_adaptation_steps"] = self.adaptation_steps
        return values

    def describe(self, explicit: Collection[str] = ()) -> str:
        """`name=value` pairs of `as_dict()`, those named in `explicit` marked with '*'."""
        parts = []
        for name, value in self.as_dict().items():
            if value is None:
                continue
            parts.append(f"{name}={format_range(value)}{'*' if name in explicit else ''}")
        return " ".join(parts)


def names() -> list[str]:
    """The field names of `TaskSettings`, in definition order (each names the flag it fills)."""
    return [field.name for field in dataclasses.fields(TaskSettings)]


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def check_shots(shots: Any, name: str = "shots") -> Shots:
    """`shots` as a task uses it: an integer >= 1, or a range (lo, hi) with 1 <= lo < hi.

    A range with lo == hi is that one count, so `(5, 5)` builds exactly the clients of `5`.

    Raises:
      ValueError: One line naming `name` and the fix.
    """
    if _is_int(shots):
        if shots < 1:
            raise ValueError(f"{name} must be >= 1, got {shots}.")
        return int(shots)
    if not (isinstance(shots, (tuple, list)) and len(shots) == 2 and all(map(_is_int, shots))):
        raise ValueError(
            f"{name} must be an integer >= 1 or a range (lo, hi) of integers, got {shots!r}."
        )
    lo, hi = (int(v) for v in shots)
    if min(lo, hi) < 1:
        raise ValueError(f"{name} range ({lo}, {hi}) must have lo >= 1; raise lo to 1 or more.")
    if lo > hi:
        raise ValueError(f"{name} range ({lo}, {hi}) has lo > hi; pass ({hi}, {lo}).")
    return lo if lo == hi else (lo, hi)


def max_shots(shots: Shots) -> int:
    """The largest count `shots` allows (what support batches are packed for)."""
    return shots[1] if isinstance(shots, tuple) else shots


def check_noise(noise: Any, name: str = "label_noise") -> Noise:
    """`noise` as a task uses it: a standard deviation >= 0, or a range (lo, hi), 0 <= lo < hi.

    A range with lo == hi is that one value.

    Raises:
      ValueError: One line naming `name` and the fix.
    """
    if _is_number(noise):
        if not (math.isfinite(noise) and noise >= 0):
            raise ValueError(f"{name} must be a finite number >= 0, got {noise!r}.")
        return float(noise)
    if not (isinstance(noise, (tuple, list)) and len(noise) == 2 and all(map(_is_number, noise))):
        raise ValueError(
            f"{name} must be a number >= 0 or a range (lo, hi) of them, got {noise!r}."
        )
    lo, hi = (float(v) for v in noise)
    if not (math.isfinite(lo) and math.isfinite(hi) and min(lo, hi) >= 0):
        raise ValueError(f"{name} range ({lo:g}, {hi:g}) must be finite with lo >= 0.")
    if lo > hi:
        raise ValueError(f"{name} range ({lo:g}, {hi:g}) has lo > hi; pass ({hi:g}, {lo:g}).")
    return lo if lo == hi else (lo, hi)


def parse_range(text: str, kind: type = int) -> Union[int, float, tuple]:
    """`N` or `LO:HI` (the command-line spelling of shots and noise ranges) as `kind` values.

    Raises:
      ValueError: If `text` is neither (the binaries put the flag's name in front).
    """
    parts = str(text).strip().split(":")
    if len(parts) > 2 or not all(p.strip() for p in parts):
        raise ValueError(f"{text!r} is not N or LO:HI")
    try:
        values = tuple(kind(p.strip()) for p in parts)
    except ValueError:
        raise ValueError(f"{text!r} is not N or LO:HI of {kind.__name__} values") from None
    return values[0] if len(values) == 1 else values


def parse_shots(text: str, flag: str = "--shots") -> Shots:
    """A shots flag, `N` or `LO:HI` with 1 <= LO <= HI, as `check_shots` returns it.

    Raises:
      ValueError: One line naming `flag` and the fix.
    """
    try:
        value = parse_range(text, int)
    except ValueError:
        raise ValueError(
            f"{flag}={text} must be N or LO:HI (integers), e.g. {flag}=5 or {flag}=2:20."
        ) from None
    lo, hi = value if isinstance(value, tuple) else (value, value)
    if min(lo, hi) < 1:
        raise ValueError(f"{flag}={text} must be >= 1 (each client needs a support example).")
    if lo > hi:
        raise ValueError(f"{flag}={text} has LO > HI; pass {flag}={hi}:{lo}.")
    return check_shots(value)


def parse_noise(text: str, flag: str = "--label_noise") -> Noise:
    """A noise flag, `S` or `LO:HI` with 0 <= LO <= HI, as `check_noise` returns it.

    Raises:
      ValueError: One line naming `flag` and the fix.
    """
    try:
        value = parse_range(text, float)
    except ValueError:
        raise ValueError(
            f"{flag}={text} must be S or LO:HI (numbers), e.g. {flag}=0.3 or {flag}=0:1."
        ) from None
    lo, hi = value if isinstance(value, tuple) else (value, value)
    if not (math.isfinite(lo) and math.isfinite(hi) and min(lo, hi) >= 0):
        raise ValueError(f"{flag}={text} must be finite and >= 0 (a standard deviation).")
    if lo > hi:
        raise ValueError(
            f"{flag}={text} has LO > HI; pass {flag}={format_range(hi)}:{format_range(lo)}."
        )
    return check_noise(value)


def format_range(value: Any) -> str:
    """A value as the binaries spell it: `LO:HI` for a range, `%g` for a float, else `str`."""
    if isinstance(value, tuple):
        return ":".join(format_range(v) for v in value)
    return f"{value:g}" if isinstance(value, float) else str(value)
