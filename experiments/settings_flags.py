"""The hyperparameter flags that `compare.py` and `quality.py` share, filled from the task.

Each flag is named like the `mfl_tff.data.TaskSettings` field it fills; left empty, it takes the
task's own setting (`settings(task)`). The data flags --shots, --label_noise and --data_on_workers
are task options (`task_options()`), and the meta-model flags fill `AlgorithmOptions`
(`algorithm_flags()`).
`check()` and `check_task()` give the one-line errors the binaries print, and `parse_flags` turns
absl's own parse errors into one line too; each ends the binary with exit status 2.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from typing import Any, Optional

from absl import flags

from experiments import cache_flags
from experiments.cache_flags import DATA_CACHE_DIR, WORKER_DATA_CACHE_DIR
from mfl_tff.algorithms import builders
from mfl_tff.data import registry
from mfl_tff.data import settings as settings_lib
from mfl_tff.data.settings import TaskSettings
from mfl_tff.meta import meta_model as meta_model_lib

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

SHOTS = flags.DEFINE_string(
    "shots",
    None,
    "Support shots per client (per class for digits_fewshot), a task option: N, or LO:HI "
    "(sinusoid, digits_fewshot) for each client to draw its own; empty: the task's setting.",
)
LABEL_NOISE = flags.DEFINE_string(
    "label_noise",
    None,
    "sinusoid: standard deviation of Gaussian noise on the targets clients observe (held-out "
    "query targets stay noise-free): S, or LO:HI for each client to draw its own from U[LO, HI]; "
    "empty: 0.",
)
DATA_ON_WORKERS = flags.DEFINE_bool(
    "data_on_workers",
    False,
    "Send clients as int32 codes and build the examples on the worker(s): digits, "
    "digits_fewshot and emnist (its cache file at the same path on each worker) the same "
    "clients; sinusoid and synthetic generated there (same distribution, another random "
    "stream). See the README's 'Several workers'.",
)
# The cache flags are these binaries' own too (listed by --helpshort, recorded with the settings).
flags.adopt_module_key_flags(cache_flags)
META_MODEL = flags.DEFINE_enum(
    "meta_model",
    None,
    meta_model_lib.META_MODELS,
    "mfl/meta_sgd: how a client's inner-loop step sizes are made; empty: each algorithm's "
    "default (conditioned for mfl, rates for meta_sgd). See the README's Meta-models.",
)
CLIENT_OPTIMIZER = flags.DEFINE_enum(
    "client_optimizer",
    "sgd",
    meta_model_lib.CLIENT_OPTIMIZERS,
    "mfl/meta_sgd: the inner loop's optimizer; see the README's Meta-models.",
)
INNER_CLIP_NORM = flags.DEFINE_float(
    "inner_clip_norm",
    None,
    "Clip of each inner-loop support gradient, >= 0; 0: off; empty: automatic. See the README's "
    "Meta-models.",
)
META_CLIP_NORM = flags.DEFINE_float(
    "meta_clip_norm",
    None,
    "Clip of the aggregated meta-gradients, >= 0; 0: off; empty: automatic. See the README's "
    "Meta-models.",
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
    """Names of the hyperparameter flags given explicitly (--shots among them)."""
    names = {flag.name for flag in SETTINGS_FLAGS if flag.value is not None}
    return names | ({"shots"} if SHOTS.value is not None else set())


def task_options() -> dict[str, Any]:
    """The data flags as task options, those given only (call `check()` first)."""
    options = {}
    if SHOTS.value is not None:
        options["shots"] = settings_lib.parse_shots(SHOTS.value)
    if LABEL_NOISE.value is not None:
        options["label_noise"] = settings_lib.parse_noise(LABEL_NOISE.value)
    if DATA_ON_WORKERS.value:
        options["data_on_workers"] = True
    for flag in (DATA_CACHE_DIR, WORKER_DATA_CACHE_DIR):
        if flag.value is not None:
            options[flag.name] = flag.value
    return options


def algorithm_flags() -> dict[str, Any]:
    """The `AlgorithmOptions` fields set by the meta-model flags."""
    return {
        "meta_model": META_MODEL.value,
        "client_optimizer": CLIENT_OPTIMIZER.value,
        "inner_clip_norm": INNER_CLIP_NORM.value,
        "meta_clip_norm": META_CLIP_NORM.value,
    }


def meta_model(algorithm: str, adaptive_update: str = "meta") -> str:
    """The meta-model `algorithm` trains with: --meta_model, or its default when unset."""
    options = builders.AlgorithmOptions(
        adaptive_update=adaptive_update, meta_model=META_MODEL.value
    )
    return builders.resolved_options(algorithm, options).meta_model


def describe_algorithm(algorithms: Sequence[str] = (), adaptive_update: str = "meta") -> str:
    """The meta-model flags as `name=value` pairs (the clip norms only when given).

    An unset --meta_model is spelled as the default of each of `algorithms` that learns
    meta-parameters: `conditioned` for one, `mfl:conditioned,meta_sgd:rates` for several.
    """
    values = algorithm_flags()
    if values["meta_model"] is None:
        learners = [name for name in algorithms if name in builders.LEARNS_ALPHA]
        defaults = [(name, meta_model(name, adaptive_update)) for name in learners]
        if len(defaults) == 1:
            values["meta_model"] = defaults[0][1]
        elif defaults:
            values["meta_model"] = ",".join(f"{name}:{model}" for name, model in defaults)
    return " ".join(
        f"{name}={value:g}" if isinstance(value, float) else f"{name}={value}"
        for name, value in values.items()
        if value is not None
    )


def describe_data() -> str:
    """'label_noise=...' when --label_noise is given and 'data_on_workers' when set, else ''
    (shots are in the settings)."""
    noise = task_options().get("label_noise")
    words = [] if noise is None else [f"label_noise={settings_lib.format_range(noise)}"]
    return " ".join(words + (["data_on_workers"] if DATA_ON_WORKERS.value else []))


def _takers(option: str) -> str:
    return ", ".join(n for n in registry.task_names() if option in registry.task_options(n))


def check_task(task_name: str) -> Optional[str]:
    """The one-line problem with the data flags for `task_name`, or None.

    --label_noise on a task without label noise is an error, not a note: dropping it silently
    would train on clean data. So is --data_on_workers on a task that cannot build its examples
    on the workers: dropping it would silently send every client's features.
    """
    if task_name not in registry.task_names():
        return None
    options = registry.task_options(task_name)
    if LABEL_NOISE.value is not None and "label_noise" not in options:
        return (
            f"--label_noise does not apply to --task={task_name} (only to "
            f"{_takers('label_noise')}); drop --label_noise."
        )
    if DATA_ON_WORKERS.value and "data_on_workers" not in options:
        return (
            f"--data_on_workers does not apply to --task={task_name}, whose builder has no "
            f"data_on_workers option (only to {_takers('data_on_workers')}); drop "
            "--data_on_workers."
        )
    return None


def parse_flags(argv: Sequence[str]) -> list[str]:
    """absl's parser, its errors (an unknown flag, a bad enum) one line with exit status 2."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        sys.stderr.write(f"error: {' '.join(str(e).split())}; see --helpshort.\n")
        sys.exit(2)


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
    for flag in (INNER_CLIP_NORM, META_CLIP_NORM):
        if flag.value is not None and not (math.isfinite(flag.value) and flag.value >= 0):
            return f"--{flag.name} must be a number >= 0 (0 turns clipping off), got {flag.value}."
    try:
        task_options()
    except ValueError as e:
        return str(e)
    return None
