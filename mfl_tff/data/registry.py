"""Task registry: binaries and users pick tasks by name; users add their own without editing us.

from mfl_tff.data import registry

def build_my_task(*, seed=0, **options) -> FederatedTask:
    ...  # wrap your ClientData and Keras model, see `registry.task_from_keras`

registry.register_task("my_task", build_my_task)
task = registry.get_task("my_task", seed=1)
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any, Optional

import tensorflow as tf
import tensorflow_federated as tff

from mfl_tff.data import packing
from mfl_tff.data.task import FederatedTask
from mfl_tff.models import functional

TaskBuilder = Callable[..., FederatedTask]
_BUILDERS: dict[str, TaskBuilder] = {}


def register_task(name: str, builder: TaskBuilder, *, overwrite: bool = False) -> None:
    """Registers `builder(**options) -> FederatedTask` under `name`.

    Raises:
      ValueError: If `name` is taken and `overwrite` is False.
    """
    if not name or not isinstance(name, str):
        raise ValueError(f"Task name must be a non-empty string, got {name!r}.")
    # Load the built-ins first, so a user's task can neither take a built-in name unnoticed nor
    # be replaced by the built-in when the built-ins load later.
    _ensure_builtins()
    if name in _BUILDERS and not overwrite:
        raise ValueError(f"Task {name!r} is already registered; pass overwrite=True to replace it.")
    _BUILDERS[name] = builder


def task_names() -> list[str]:
    """Names of all registered tasks, sorted."""
    _ensure_builtins()
    return sorted(_BUILDERS)


def task_options(name: str) -> list[str]:
    """Keyword options the task's builder accepts."""
    return list(inspect.signature(_builder(name)).parameters)


def get_task(name: str, *, ignore_unknown_options: bool = False, **options: Any) -> FederatedTask:
    """Builds the task `name` with `options`.

    Args:
      name: A registered task name.
      ignore_unknown_options: Drop options the builder does not take (binaries pass their common
        flags, such as shots or the number of clients, to every task) instead of raising.
      **options: Keyword options of the task's builder.

    Raises:
      ValueError: If the task is unknown.
      TypeError: If an option is unknown and `ignore_unknown_options` is False.
    """
    builder = _builder(name)
    params = inspect.signature(builder).parameters
    takes_any = any(p.kind == p.VAR_KEYWORD for p in params.values())
    unknown = sorted(k for k in options if not takes_any and k not in params)
    if unknown and not ignore_unknown_options:
        raise TypeError(f"Task {name!r} takes no option(s) {unknown}; it takes {sorted(params)}.")
    return builder(**{k: v for k, v in options.items() if k not in unknown})


def _builder(name: str) -> TaskBuilder:
    _ensure_builtins()
    if name not in _BUILDERS:
        raise ValueError(f"Unknown task {name!r}; choose one of: {', '.join(sorted(_BUILDERS))}.")
    return _BUILDERS[name]


def _ensure_builtins() -> None:
    """Adds the built-in tasks to the registry, leaving any name a user registered first as is.

    Imported lazily, so that importing the registry does not import every task's module and its
    data libraries (scikit-learn for digits). Merging on every call, rather than once, keeps the
    registry complete even when `_BUILDERS` is replaced (the tests start from an empty one).
    """
    from mfl_tff.data import builtin_tasks

    for name, builder in builtin_tasks.BUILTIN_TASKS.items():
        _BUILDERS.setdefault(name, builder)


def task_from_keras(
    name: str,
    *,
    train_data: tff.simulation.datasets.ClientData,
    eval_data: tff.simulation.datasets.ClientData,
    keras_model_fn: Callable[[], tf.keras.Model],
    problem: str,
    loss: Optional[functional.LossLike] = None,
    metric: Optional[str] = None,
    batch_size: int = 10,
    support_batches: int = 4,
    query_batches: int = 4,
    support_size: Optional[int] = None,
    support_fraction: float = 0.5,
    seed: int = 0,
) -> FederatedTask:
    """A task from your own `ClientData` (elements with 'x' and 'y') and Keras model builder.

    Args:
      name: Name of the task.
      train_data: Training clients.
      eval_data: Held-out clients (ids disjoint from `train_data`'s).
      keras_model_fn: Builds a Keras model mapping a batch of x to logits/values. If it is
        compiled, its loss is the training loss (every algorithm meta-trains with it).
      problem: 'classification' (integer labels; default loss cross-entropy on logits, metric
        accuracy) or 'regression' (float targets; default loss and metric mean squared error).
      loss: The training loss, overriding the compiled one: a `tf.keras.losses.Loss`, its name
        or a function `(y_true, y_pred)`; averaged over real examples, padding excluded.
      metric: 'accuracy' or 'mse' (None: the problem's).
      batch_size: Examples per packed batch.
      support_batches: Cap on support batches (local steps) per client.
      query_batches: Cap on query batches per client.
      support_size: Support examples per client (None: `support_fraction` of them).
      support_fraction: Fraction of each client's examples used as support.
      seed: Seed for splitting, packing and the model's initial weights.
    """
    x_shape: Sequence[int] = tuple(train_data.element_type_structure["x"].shape)
    return FederatedTask(
        name=name,
        train_data=train_data,
        eval_data=eval_data,
        model_fn=lambda: functional.functional_model(
            keras_model_fn, x_shape=x_shape, problem=problem, loss=loss, metric=metric, seed=seed
        ),
        problem=problem,
        train_split=packing.SplitSpec(support_size=support_size, support_fraction=support_fraction),
        train_pack=packing.PackSpec(batch_size, support_batches, query_batches),
        seed=seed,
    )
