"""The hyperparameter flags that `compare.py` and `quality.py` share, filled from the task.

Each flag is named like the `mfl_tff.data.TaskSettings` field it fills; left empty, it takes the
task's own setting (`settings(task)`). `check()` gives the one-line errors the binaries print.
"""

from __future__ import annotations

from typing import Optional

from absl import flags

from mfl_tff.data.settings import TaskSettings

CLIENTS_PER_ROUND = flags.DEFINE_integer(
    "clients_per_round", None, "Clients per round; empty: the task's setting."
)
INNER_STEPS = flags.DEFINE_integer(
    "inner_steps", None, "Inner (local) steps K, also the adaptation steps; empty: the task's."
)
INNER_LR = flags.DEFINE_float(
    "inner_lr",
    None,
    "Client step size: fedavg's local rate, the fixed inner-loop rate (Per-FedAvg's alpha), the "
    "INITIAL learned rates of mfl/meta_sgd, and the held-out fine-tuning rate; empty: the task's "
    "setting.",
)
OUTER_LR = flags.DEFINE_float(
    "outer_lr", None, "Per-FedAvg's local meta step size (beta); empty: the task's setting."
)
LOCAL_EPOCHS = flags.DEFINE_integer(
    "local_epochs", None, "Local epochs (fedavg, mfl local); empty: the task's setting."
)
META_OPTIMIZER = flags.DEFINE_string(
    "meta_optimizer",
    None,
    "Meta-optimizer: steps theta for maml/fomaml/meta_sgd (and meta_sgd's alpha), only alpha for "
    "mfl (whose theta goes with the server optimizer); empty: the task's setting.",
)
META_LR = flags.DEFINE_float(
    "meta_lr",
    None,
    "Meta-optimizer learning rate, >= 0 (0 freezes what it steps); empty: the task's setting.",
)
ALPHA_GRANULARITY = flags.DEFINE_string(
    "alpha_granularity",
    None,
    "mfl's learned rates: scalar, per_layer or per_coordinate; empty: the task's setting.",
)
EVAL_ADAPTATION_STEPS = flags.DEFINE_integer(
    "eval_adaptation_steps",
    None,
    "Adaptation steps at evaluation; empty: the task's setting (the effective --inner_steps).",
)

SETTINGS_FLAGS = (
    CLIENTS_PER_ROUND,
    INNER_STEPS,
    INNER_LR,
    OUTER_LR,
    LOCAL_EPOCHS,
    META_OPTIMIZER,
    META_LR,
    ALPHA_GRANULARITY,
    EVAL_ADAPTATION_STEPS,
)


def settings(task) -> TaskSettings:
    """The task's settings with the hyperparameter flags given explicitly."""
    return task.settings.with_overrides(**{flag.name: flag.value for flag in SETTINGS_FLAGS})


def explicit() -> set[str]:
    """Names of the hyperparameter flags given explicitly."""
    return {flag.name for flag in SETTINGS_FLAGS if flag.value is not None}


def check() -> Optional[str]:
    """The one-line problem with the hyperparameter flags, or None."""
    for flag in (CLIENTS_PER_ROUND, INNER_STEPS, LOCAL_EPOCHS, EVAL_ADAPTATION_STEPS):
        if flag.value is not None and flag.value < 1:
            return f"--{flag.name} must be >= 1, got {flag.value}."
    for flag in (INNER_LR, OUTER_LR):
        if flag.value is not None and not flag.value > 0:
            return f"--{flag.name} must be > 0, got {flag.value}."
    if META_LR.value is not None and not META_LR.value >= 0:
        return (
            f"--meta_lr must be >= 0 (0 freezes what --meta_optimizer steps), got {META_LR.value}."
        )
    return None
