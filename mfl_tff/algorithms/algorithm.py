"""What an algorithm is: a small record of client phases and defaults, and the options it reads.

An algorithm module (fedavg, fedmeta, per_fedavg, meta_sgd, mfl, fedprox) exports its client
functions and one `Algorithm` record per variant; `mfl_tff.algorithms.catalog` (the algorithm
registry) maps names to records and `mfl_tff.algorithms.composer.compose` turns any record into a
`tff.learning.templates.LearningProcess`. A round is the record's phases in order:

    phase = ClientPhase(name, client_fn, streams)
    client_fn(model_weights, [meta_parameters,] packed_client) -> client_work.client_output(...)

Each phase's clients return updates for one or both of the server's streams: `model` (aggregated,
then applied to theta by the model optimizer, TFF's `build_apply_optimizer_finalizer`) and `meta`
(aggregated, then applied to the meta-parameters alpha by the meta optimizer, in a finalizer whose
state holds alpha). A later phase sees the meta-parameters that earlier phases stepped: that is
the two-phase MFL round.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Optional, Union

import numpy as np
import tensorflow_federated as tff

from mfl_tff.algorithms import checks
from mfl_tff.meta import meta_model as meta_model_lib

STREAMS = ("model", "meta")
OPTIMIZERS = ("sgd", "sgdm", "adam", "adagrad", "yogi")
# Clipping applied by default when inner_steps > 1 (`AlgorithmOptions.clip_norms`).
AUTO_INNER_CLIP_NORM = 50.0
AUTO_META_CLIP_NORM = 10.0
OptimizerChoice = Union[str, tff.learning.optimizers.Optimizer]


def build_optimizer(name: str, learning_rate: float) -> tff.learning.optimizers.Optimizer:
    """A `tff.learning.optimizers.Optimizer` by name: sgd, sgdm (momentum 0.9), adam, adagrad,
    yogi. A learning rate of 0 freezes what it steps (an ablation)."""
    rate = float(learning_rate)
    if not np.isfinite(rate) or rate < 0:
        raise ValueError(f"learning rate must be a finite number >= 0, got {learning_rate!r}.")
    builders = {
        "sgd": lambda: tff.learning.optimizers.build_sgdm(learning_rate=rate),
        "sgdm": lambda: tff.learning.optimizers.build_sgdm(learning_rate=rate, momentum=0.9),
        "adam": lambda: tff.learning.optimizers.build_adam(learning_rate=rate),
        "adagrad": lambda: tff.learning.optimizers.build_adagrad(learning_rate=rate),
        "yogi": lambda: tff.learning.optimizers.build_yogi(learning_rate=rate),
    }
    if name not in builders:
        raise ValueError(f"Unknown optimizer {name!r}; choose one of: {', '.join(OPTIMIZERS)}.")
    return builders[name]()


@dataclasses.dataclass(frozen=True)
class AlgorithmOptions:
    """Options shared by every algorithm (each reads the ones that apply to it).

    Attributes:
      inner_lr: The clients' base step size. It is FedAvg's (and FedProx's) local SGD rate,
        MAML's/FOMAML's/Reptile's fixed inner-loop rate, the INITIAL value of the learned rates
        alpha of mfl and meta_sgd, and Per-FedAvg's alpha. Held-out fine-tuning takes its rate
        from the training program, by default this one.
      inner_steps: K, inner steps (local steps for reptile and Per-FedAvg).
      local_epochs: E, epochs of FedAvg, FedProx and mfl's `local` adaptive update.
      meta_optimizer, meta_lr: The optimizer of the META-OBJECTIVE at the server, by name or as a
        `tff.learning.optimizers.Optimizer`. It steps theta for maml, fomaml and meta_sgd (whose
        theta update is a meta-gradient), and the rates alpha for meta_sgd and mfl.
      server_optimizer, server_lr: The optimizer applying model updates for the algorithms whose
        clients return a model delta or (mfl) an adaptive update: fedavg, fedprox, reptile (its
        rate is Reptile's epsilon), Per-FedAvg, and mfl's theta. None: the algorithm's default.
      outer_lr: Per-FedAvg's beta.
      alpha_granularity, adaptive_update, adaptive_data, first_order, min_alpha: mfl's options.
      proximal_strength: FedProx's mu.
      meta_model: How mfl and meta_sgd turn a client's data into its inner-loop step sizes
        (`mfl_tff.meta.meta_model`): 'rates' (the learned alpha alone), 'per_step' (alpha times
        learned per-step, per-tensor multipliers) or 'conditioned' (alpha times multipliers that
        a small network computes from the client's own support loss and gradient norms). None:
        the algorithm's default (`Algorithm.default_meta_model`): 'conditioned' for mfl with
        its `meta` adaptive update, 'rates' for everything else.
      client_optimizer: The inner loop's optimizer for mfl and meta_sgd: 'sgd' or 'momentum'
        (heavy ball with a learned per-tensor beta).
      inner_clip_norm, meta_clip_norm: Global-norm clipping of each inner-loop support gradient
        (per client, per step) and of the aggregated meta-gradients (at the server, per stream,
        before the meta optimizer steps). None: automatic, 50 and 10 when inner_steps > 1 and
        off for one step; 0: off.
      model_aggregator, meta_aggregator: `tff.aggregators` factories, weighted or unweighted,
        for the model updates and the alpha meta-gradients (None: weighted mean);
        `mfl_tff.algorithms.aggregation.build_aggregators` makes the DP and robust ones.
      cohort_size: Clients stacked per federated client (`mfl_tff.algorithms.cohorts`); feed
        the process `cohorts.make_cohorts(clients, cohort_size)`. None: one client each. Only
        with mean aggregation: any other aggregator would see cohorts, not clients.
      vectorize_cohorts: Run a cohort's clients under `tf.vectorized_map` rather than in a loop:
        the same results, faster rounds on small models, seconds more to build (the training
        program vectorizes long runs: `mfl_tff.training.program.default_vectorize_cohorts`).
    """

    inner_lr: float = 0.01
    inner_steps: int = 1
    local_epochs: int = 1
    meta_optimizer: OptimizerChoice = "adam"
    meta_lr: float = 1e-3
    server_optimizer: Optional[OptimizerChoice] = None
    server_lr: Optional[float] = None
    outer_lr: float = 0.01
    alpha_granularity: str = "per_layer"
    adaptive_update: str = "meta"
    adaptive_data: str = "support"
    first_order: bool = False
    min_alpha: float = 1e-6
    proximal_strength: float = 0.01
    meta_model: Optional[str] = None
    client_optimizer: str = "sgd"
    inner_clip_norm: Optional[float] = None
    meta_clip_norm: Optional[float] = None
    model_aggregator: Optional[tff.aggregators.AggregationFactory] = None
    meta_aggregator: Optional[tff.aggregators.AggregationFactory] = None
    cohort_size: Optional[int] = None
    vectorize_cohorts: bool = False

    # The fields a task's recommended settings (`mfl_tff.data.TaskSettings`) fill.
    SETTINGS_FIELDS = (
        "inner_lr",
        "inner_steps",
        "local_epochs",
        "outer_lr",
        "meta_optimizer",
        "meta_lr",
        "alpha_granularity",
    )

    def clip_norms(self) -> tuple[Optional[float], Optional[float]]:
        """The (inner, meta) clipping norms in effect: None means no clipping.

        Several unrolled steps multiply the support Hessian into the meta-gradient; on clients
        with large targets and few points that product spikes (meta-gradients near 1e15 were
        seen at K=5) and sends the meta-optimizer's state to inf. One step does not need it,
        and is left exactly as it was.
        """

        def effective(value, auto):
            if value is None:
                return auto if self.inner_steps > 1 else None
            return float(value) or None

        return (
            effective(self.inner_clip_norm, AUTO_INNER_CLIP_NORM),
            effective(self.meta_clip_norm, AUTO_META_CLIP_NORM),
        )

    def inner_loop(self) -> meta_model_lib.InnerLoop:
        """The inner loop of mfl and meta_sgd under these options.

        Raises:
          ValueError: If `meta_model` is None: only the algorithm knows its default, so the
            options must first go through `Algorithm.resolve` (builders and the composer do).
        """
        if self.meta_model is None:
            raise ValueError(
                "meta_model is None (the algorithm's default); resolve the options with the "
                "algorithm first: `catalog.get(name).resolve(options)`."
            )
        inner_clip_norm, _ = self.clip_norms()
        return meta_model_lib.InnerLoop(
            meta_model=self.meta_model,
            client_optimizer=self.client_optimizer,
            num_steps=self.inner_steps,
            clip_norm=inner_clip_norm,
            first_order=self.first_order,
        )

    @classmethod
    def from_settings(cls, settings, **options) -> AlgorithmOptions:
        """Options from a task's settings (`task.settings`), plus `options` for the other fields.

        Training with a task's own protocol is then `AlgorithmOptions.from_settings(
        task.settings)`; `options` set what settings do not hold (aggregators, cohorts, ...).
        """
        values = {name: getattr(settings, name) for name in cls.SETTINGS_FIELDS}
        return cls(**{**values, **options})


@dataclasses.dataclass(frozen=True)
class ClientPhase:
    """One pass over the round's clients.

    Attributes:
      name: '' for a one-phase algorithm (its metrics are `client_work`), else a prefix
        (`meta` -> `meta_client_work`).
      client_fn: `client_fn(model_weights, data)`, or `client_fn(model_weights, meta, data)`
        when `takes_meta`; plain TensorFlow returning `client_work.client_output(...)`.
      streams: What the update feeds: ('model',), ('meta',) or ('model', 'meta'); with both, the
        update is `OrderedDict(model=..., meta=...)`.
      takes_meta: Whether the clients receive the current meta-parameters.
    """

    name: str
    client_fn: Callable
    streams: tuple[str, ...] = ("model",)
    takes_meta: bool = False

    def __post_init__(self):
        if not self.streams or any(s not in STREAMS for s in self.streams):
            raise ValueError(
                f"streams must be a non-empty subset of {STREAMS}, got {self.streams}."
            )


@dataclasses.dataclass(frozen=True)
class Algorithm:
    """An algorithm as the composer builds it.

    Attributes:
      name: Registry name.
      paper: Title and arXiv id, for documentation.
      phases: `phases(model, options) -> tuple[ClientPhase, ...]`, the round's client passes.
      model_optimizer: Which options step theta: 'server' (`server_optimizer`/`server_lr`) or
        'meta' (`meta_optimizer`/`meta_lr`, for algorithms whose theta update is a
        meta-gradient).
      default_server_optimizer: `(name, learning_rate)` when `options.server_optimizer` is None,
        or a function of the options returning it.
      initial_meta: `initial_meta(model, options) -> tuple of arrays`: the learned
        meta-parameters' starting value (None: the algorithm learns only theta).
      min_meta: `min_meta(options)`: the bound alpha is projected onto after each meta step
        (None: unconstrained).
      check: `check(options)` raises ValueError naming a bad option (before anything is built).
      gradient_streams: `gradient_streams(options)`: the streams whose updates are
        meta-gradients, clipped on the aggregate when `options.clip_norms()` says so.
      default_meta_model: The meta-model when `options.meta_model` is None, or a function of
        the options returning it.
    """

    name: str
    paper: str
    phases: Callable[[Any, AlgorithmOptions], tuple[ClientPhase, ...]]
    model_optimizer: str = "server"
    default_server_optimizer: Union[tuple[str, float], Callable[[AlgorithmOptions], tuple]] = (
        "sgd",
        1.0,
    )
    initial_meta: Optional[Callable[[Any, AlgorithmOptions], tuple]] = None
    min_meta: Optional[Callable[[AlgorithmOptions], Optional[float]]] = None
    check: Callable[[AlgorithmOptions], None] = lambda options: None
    gradient_streams: Callable[[AlgorithmOptions], tuple[str, ...]] = lambda options: ()
    default_meta_model: Union[str, Callable[[AlgorithmOptions], str]] = "rates"

    def resolve(self, options: AlgorithmOptions) -> AlgorithmOptions:
        """`options` with the algorithm's defaults in place of None where it has one: the
        meta-model. Everything built from options (phases, initial meta-parameters, the
        evaluation's inner loop) reads the resolved ones."""
        if options.meta_model is not None:
            return options
        default = self.default_meta_model
        if callable(default):
            default = default(options)
        return dataclasses.replace(options, meta_model=default)

    @property
    def learns_meta(self) -> bool:
        """Whether the algorithm learns meta-parameters (alpha) next to theta."""
        return self.initial_meta is not None

    def optimizer(
        self, stream: str, options: AlgorithmOptions
    ) -> tff.learning.optimizers.Optimizer:
        """The optimizer of `stream` ('model' or 'meta') under `options`."""
        if stream == "meta" or self.model_optimizer == "meta":
            option, choice, rate = "meta_optimizer", options.meta_optimizer, options.meta_lr
        else:
            option = "server_optimizer"
            default = self.default_server_optimizer
            if callable(default):
                default = default(options)
            choice = options.server_optimizer or default[0]
            rate = options.server_lr if options.server_lr is not None else default[1]
        if isinstance(choice, str):
            return build_optimizer(choice, rate)
        checks.check_optimizer(option, choice)
        return choice


def check_common(options: AlgorithmOptions) -> None:
    """The checks every algorithm shares: step counts, rates, cohorts."""
    checks.check_positive_int("inner_steps", options.inner_steps)
    checks.check_positive_int("local_epochs", options.local_epochs)
    checks.check_positive_rate("inner_lr", options.inner_lr)
    meta_model_lib.check(options.meta_model, options.client_optimizer, allow_default=True)
    for name in ("inner_clip_norm", "meta_clip_norm"):
        value = getattr(options, name)
        if value is not None and (not np.isfinite(value) or value < 0):
            raise ValueError(
                f"{name} must be a finite number >= 0 (0: off) or None (automatic), got {value!r}."
            )
    if options.cohort_size is not None:
        checks.check_positive_int("cohort_size", options.cohort_size)
    if not isinstance(options.vectorize_cohorts, bool):
        raise TypeError(
            f"vectorize_cohorts must be True or False, got {options.vectorize_cohorts!r}."
        )
    for name in ("model_aggregator", "meta_aggregator"):
        factory = getattr(options, name)
        if factory is not None:
            checks.check_aggregator(name, factory)
        # Cohorts reduce their clients to one weighted mean before aggregation, which only a
        # plain weighted mean of the cohorts undoes; clipping, zeroing or noise would apply to
        # cohorts.
        if options.cohort_size is not None and factory is not None:
            if type(factory) is not tff.aggregators.MeanFactory:
                raise ValueError(
                    f"cohort_size={options.cohort_size} stacks clients into one federated client, "
                    f"so {name} ({type(factory).__name__}) would clip, zero or weigh cohorts "
                    "instead of clients; use cohort_size=None with per-client (DP, robust) "
                    "aggregators."
                )
