"""Algorithms by name, built for a task from one set of common options.

Binaries, the quality benchmark and users pick algorithms by name:

    process, spec = builders.build_algorithm("mfl", task, AlgorithmOptions(inner_steps=5))

`spec.learns_alpha` says whether `process.get_hparams(state)["alpha"]` holds learned rates (used by
personalization evaluation), `spec.eval_steps` the step count the algorithm was trained for.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np
import tensorflow_federated as tff

from mfl_tff.algorithms import cohorts, fedavg, fedmeta, meta_sgd, mfl, per_fedavg

ALGORITHMS = (
    "fedavg",
    "maml",
    "fomaml",
    "meta_sgd",
    "reptile",
    "per_fedavg_fo",
    "per_fedavg_hf",
    "mfl",
)
OPTIMIZERS = ("sgd", "sgdm", "adam", "adagrad", "yogi")
# The algorithms that learn rates alpha next to the model (and aggregate alpha meta-gradients).
LEARNS_ALPHA = ("meta_sgd", "mfl")


def build_optimizer(name: str, learning_rate: float) -> tff.learning.optimizers.Optimizer:
    """A `tff.learning.optimizers.Optimizer` by name: sgd, sgdm (momentum 0.9), adam, adagrad,
    yogi."""
    if name == "sgd":
        return tff.learning.optimizers.build_sgdm(learning_rate=learning_rate)
    if name == "sgdm":
        return tff.learning.optimizers.build_sgdm(learning_rate=learning_rate, momentum=0.9)
    if name == "adam":
        return tff.learning.optimizers.build_adam(learning_rate=learning_rate)
    if name == "adagrad":
        return tff.learning.optimizers.build_adagrad(learning_rate=learning_rate)
    if name == "yogi":
        return tff.learning.optimizers.build_yogi(learning_rate=learning_rate)
    raise ValueError(f"Unknown optimizer {name!r}; choose one of: {', '.join(OPTIMIZERS)}.")


@dataclasses.dataclass(frozen=True)
class AlgorithmOptions:
    """Options shared by every algorithm (each uses the ones that apply to it).

    Attributes:
      inner_lr: The clients' step size everywhere: FedAvg's local SGD, the inner loop, the initial
        alpha of mfl and meta_sgd, Per-FedAvg's alpha, and the fine-tuning baseline.
      inner_steps: K, inner steps (local steps for reptile and Per-FedAvg).
      local_epochs: E, epochs of FedAvg and of mfl's `local` adaptive update.
      meta_optimizer, meta_lr: Optimizer of what is meta-learned at the server: theta for
        maml/fomaml/meta_sgd (and alpha for meta_sgd), alpha for mfl.
      server_optimizer, server_lr: Optimizer applying model updates: fedavg, reptile (its lr is
        Reptile's epsilon), Per-FedAvg, and mfl's theta. None: the algorithm's default.
      outer_lr: Per-FedAvg's beta.
      alpha_granularity, adaptive_update, adaptive_data, first_order: mfl's options.
      model_aggregator, meta_aggregator: `tff.aggregators` factories, weighted or unweighted,
        for the model updates and the alpha meta-gradients (None: weighted mean);
        `mfl_tff.algorithms.aggregation.build_aggregators` makes the DP and robust ones.
      cohort_size: Clients stacked per federated client (`mfl_tff.algorithms.cohorts`); feed
        the process `cohorts.make_cohorts(clients, cohort_size)`. None: one client each. Only
        with mean aggregation: any other aggregator would see cohorts, not clients.
    """

    inner_lr: float = 0.01
    inner_steps: int = 1
    local_epochs: int = 1
    meta_optimizer: str = "adam"
    meta_lr: float = 1e-3
    server_optimizer: Optional[str] = None
    server_lr: Optional[float] = None
    outer_lr: float = 0.01
    alpha_granularity: str = "per_layer"
    adaptive_update: str = "meta"
    adaptive_data: str = "support"
    first_order: bool = False
    model_aggregator: Optional[tff.aggregators.AggregationFactory] = None
    meta_aggregator: Optional[tff.aggregators.AggregationFactory] = None
    cohort_size: Optional[int] = None


@dataclasses.dataclass(frozen=True)
class AlgorithmSpec:
    """What evaluation needs to know about a built algorithm."""

    name: str
    learns_alpha: bool
    eval_steps: int
    cohort_size: Optional[int] = None

    def client_values(self, clients: list) -> list:
        """What `process.next` takes for these packed clients (cohorts when enabled)."""
        if self.cohort_size is None:
            return clients
        return cohorts.make_cohorts(clients, self.cohort_size)


def _server_optimizer(options: AlgorithmOptions, default_name: str, default_lr: float):
    return build_optimizer(
        options.server_optimizer or default_name,
        options.server_lr if options.server_lr is not None else default_lr,
    )


def _check_cohorts(options: AlgorithmOptions) -> None:
    """Cohorts reduce their clients to one weighted mean before aggregation, which only a plain
    weighted mean of the cohorts undoes; clipping, zeroing or noise would apply to cohorts."""
    if options.cohort_size is None:
        return
    for name in ("model_aggregator", "meta_aggregator"):
        factory = getattr(options, name)
        if factory is not None and type(factory) is not tff.aggregators.MeanFactory:
            raise ValueError(
                f"cohort_size={options.cohort_size} stacks clients into one federated client, so "
                f"{name} ({type(factory).__name__}) would clip, zero or weigh cohorts instead of "
                "clients; use cohort_size=None with per-client (DP, robust) aggregators."
            )


def build_algorithm(
    name: str, task, options: Optional[AlgorithmOptions] = None
) -> tuple[tff.learning.templates.LearningProcess, AlgorithmSpec]:
    """Builds algorithm `name` for `task` (a `mfl_tff.data.FederatedTask`).

    Raises:
      ValueError: For an unknown algorithm (the message lists the choices) or a bad option.
    """
    if name not in ALGORITHMS:
        raise ValueError(f"Unknown algorithm {name!r}; choose one of: {', '.join(ALGORITHMS)}.")
    options = options or AlgorithmOptions()
    _check_cohorts(options)
    common = dict(problem=task.problem, cohort_size=options.cohort_size)
    args = (task.model_fn, task.client_data_type())
    meta_opt = build_optimizer(options.meta_optimizer, options.meta_lr)
    steps = options.inner_steps
    if name == "fedavg":
        process = fedavg.build_fedavg(
            *args,
            **common,
            client_learning_rate=options.inner_lr,
            local_epochs=options.local_epochs,
            server_optimizer=_server_optimizer(options, "sgd", 1.0),
            model_aggregator=options.model_aggregator,
        )
    elif name in ("maml", "fomaml"):
        builder = fedmeta.build_maml if name == "maml" else fedmeta.build_fomaml
        process = builder(
            *args,
            **common,
            inner_lr=options.inner_lr,
            inner_steps=steps,
            meta_optimizer=meta_opt,
            model_aggregator=options.model_aggregator,
        )
    elif name == "reptile":
        process = fedmeta.build_reptile(
            *args,
            **common,
            inner_lr=options.inner_lr,
            inner_steps=steps,
            outer_step_size=options.server_lr if options.server_lr is not None else 1.0,
            model_aggregator=options.model_aggregator,
        )
    elif name.startswith("per_fedavg"):
        process = per_fedavg.build_per_fedavg(
            *args,
            **common,
            variant=name.rsplit("_", 1)[1],
            inner_lr=options.inner_lr,
            outer_lr=options.outer_lr,
            local_steps=steps,
            server_optimizer=_server_optimizer(options, "sgd", 1.0),
            model_aggregator=options.model_aggregator,
        )
    elif name == "meta_sgd":
        process = meta_sgd.build_meta_sgd(
            *args,
            **common,
            initial_alpha=options.inner_lr,
            inner_steps=steps,
            meta_optimizer=meta_opt,
            model_aggregator=options.model_aggregator,
            meta_aggregator=options.meta_aggregator,
        )
    else:
        default = ("adam", 1e-3) if options.adaptive_update == "meta" else ("sgd", 1.0)
        process = mfl.build_mfl(
            *args,
            **common,
            alpha_granularity=options.alpha_granularity,
            initial_alpha=options.inner_lr,
            inner_steps=steps,
            adaptive_update=options.adaptive_update,
            local_epochs=options.local_epochs,
            adaptive_data=options.adaptive_data,
            first_order=options.first_order,
            meta_optimizer=meta_opt,
            server_optimizer=_server_optimizer(options, *default),
            model_aggregator=options.model_aggregator,
            meta_aggregator=options.meta_aggregator,
        )
    spec = AlgorithmSpec(
        name=name,
        learns_alpha=name in LEARNS_ALPHA,
        eval_steps=steps,
        cohort_size=options.cohort_size,
    )
    return process, spec


def evaluation_alpha(process, state, spec: AlgorithmSpec, inner_lr: float) -> tuple:
    """The rates of the algorithm's own adaptation rule: learned alpha, or the fixed `inner_lr`."""
    if spec.learns_alpha:
        return tuple(np.asarray(a, np.float32) for a in process.get_hparams(state)["alpha"])
    return (np.float32(inner_lr),)
