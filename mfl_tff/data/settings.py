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
from typing import Any, Optional


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
      shots: Support examples per client (per class for N-way tasks) the task was built with; None
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
    shots: Optional[int] = None

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
        for name in ("eval_adaptation_steps", "shots"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be None or an integer >= 1, got {value!r}.")
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
            text = f"{value:g}" if isinstance(value, float) else str(value)
            parts.append(f"{name}={text}{'*' if name in explicit else ''}")
        return " ".join(parts)


def names() -> list[str]:
    """The field names of `TaskSettings`, in definition order (each names the flag it fills)."""
    return [field.name for field in dataclasses.fields(TaskSettings)]
