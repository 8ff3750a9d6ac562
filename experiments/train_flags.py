"""The flags of experiments/train.py and their validation, kept apart from what the binary does.

Flag names are a contract (scripts and users depend on them); defaults give a run of MFL on
`digits_fewshot` in about a minute.

The hyperparameter flags, named like the fields of `mfl_tff.data.settings.TaskSettings`, default to
None: a flag left unset takes the value the task's protocol uses (`task.settings`), and a flag
given explicitly wins. `effective_settings` resolves them once the task is built.
"""

from __future__ import annotations

import math
import os

from absl import flags

from experiments import aggregator_flags, cache_flags, execution_flags
from experiments.aggregator_flags import (  # noqa: F401  (re-exported: train.py reads them here)
    AGGREGATOR,
    CLIP_NORM,
    DP_DELTA,
    DP_FLAGS,
    NOISE_MULTIPLIER,
    QUANTIZATION_BITS,
    QUANTIZATION_THRESHOLD,
    UsageError,
    require,
)
from experiments.cache_flags import DATA_CACHE_DIR, WORKER_DATA_CACHE_DIR  # noqa: F401
from experiments.execution_flags import (  # noqa: F401
    EXECUTION,
    EXECUTIONS,
    WORKER,
    WORKER_TIMEOUT,
    workers,
)
from mfl_tff.algorithms import builders, mfl
from mfl_tff.data import settings as settings_lib
from mfl_tff.data.task import FederatedTask
from mfl_tff.meta import hparams as meta_hparams
from mfl_tff.meta import meta_model as meta_model_lib
from mfl_tff.training import program

# Held-out clients evaluated when --num_eval_clients is not given: enough for a stable mean and
# p10, and a 100-client evaluation costs about a second (digits_fewshot's 500 take several).
DEFAULT_EVAL_CLIENTS = 100

# ---- What is trained ----
TASK = flags.DEFINE_string(
    "task", "digits_fewshot", "Task name: digits, digits_fewshot, sinusoid, synthetic, emnist."
)
ALGORITHM = flags.DEFINE_string(
    "algorithm",
    "mfl",
    f"Algorithm: {', '.join(builders.ALGORITHMS)}.",
)
TOTAL_ROUNDS = flags.DEFINE_integer(
    "total_rounds", 100, "Training rounds in total (a resumed run trains the remaining ones)."
)
CLIENTS_PER_ROUND = flags.DEFINE_integer(
    "clients_per_round",
    None,
    "Training clients sampled each round (a function of seed and round); empty: the task's "
    "setting.",
)
INNER_STEPS = flags.DEFINE_integer(
    "inner_steps",
    None,
    "K: inner-loop steps on the support set (local steps of reptile and Per-FedAvg); empty: the "
    "task's setting.",
)
LOCAL_EPOCHS = flags.DEFINE_integer(
    "local_epochs",
    None,
    "E: local epochs of fedavg and of mfl's 'local' adaptive update; empty: the task's setting.",
)
ALPHA_GRANULARITY = flags.DEFINE_string(
    "alpha_granularity",
    None,
    "Granularity of mfl's learned rates: scalar, per_layer or per_coordinate (meta_sgd always "
    "learns one per coordinate); empty: the task's setting.",
)
ADAPTIVE_UPDATE = flags.DEFINE_string(
    "adaptive_update",
    "meta",
    "mfl's update of theta: 'meta' (query-loss gradient after K steps, MAML-like) or 'local' "
    "(E epochs with the learned rates, FedAvg-like).",
)
ADAPTIVE_DATA = flags.DEFINE_string(
    "adaptive_data", "support", "Data of mfl's 'local' update: support (default) or all."
)
FIRST_ORDER = flags.DEFINE_bool(
    "first_order", False, "mfl: first-order meta-gradients (no second derivatives)."
)
META_MODEL = flags.DEFINE_enum(
    "meta_model",
    None,
    meta_model_lib.META_MODELS,
    "mfl/meta_sgd: how a client's inner-loop step sizes are made: rates (the learned alpha), "
    "per_step or conditioned; empty: the algorithm's default (conditioned for mfl with "
    "--adaptive_update=meta, else rates). See the README's Meta-models.",
)
CLIENT_OPTIMIZER = flags.DEFINE_enum(
    "client_optimizer",
    "sgd",
    meta_model_lib.CLIENT_OPTIMIZERS,
    "mfl/meta_sgd: the inner loop's optimizer, sgd or momentum (a learned heavy-ball beta); see "
    "the README's Meta-models.",
)
INNER_CLIP_NORM = flags.DEFINE_float(
    "inner_clip_norm",
    None,
    "Global-norm clip of each inner-loop support gradient, >= 0; 0: off; empty: automatic (50 "
    "when --inner_steps > 1, else off). See the README's Meta-models.",
)
META_CLIP_NORM = flags.DEFINE_float(
    "meta_clip_norm",
    None,
    "Global-norm clip of the aggregated meta-gradients at the server, >= 0; 0: off; empty: "
    "automatic (10 when --inner_steps > 1, else off). See the README's Meta-models.",
)
INNER_LR = flags.DEFINE_float(
    "inner_lr",
    None,
    "The clients' step size, > 0; empty: the task's setting. One value serves four roles: "
    "(1) fedavg's and fedprox's local SGD rate; (2) the fixed inner-loop rate of maml, fomaml, "
    "reptile and Per-FedAvg (Per-FedAvg's alpha); (3) for mfl and meta_sgd, only the INITIAL "
    "value of the rates alpha they learn (adaptation then uses the learned alpha); (4) the rate "
    "at which held-out clients fine-tune in evaluation: the baseline of every algorithm, and the "
    "adaptation rule of the algorithms that learn no rates.",
)
OUTER_LR = flags.DEFINE_float(
    "outer_lr",
    None,
    "Per-FedAvg's beta, the step size of its second local step; empty: the task's setting.",
)
META_OPTIMIZER = flags.DEFINE_string(
    "meta_optimizer",
    None,
    "Server optimizer of the meta-objective: sgd, sgdm, adam, adagrad, yogi; empty: the task's "
    "setting. What it steps depends on --algorithm: theta for maml and fomaml; theta and alpha "
    "for meta_sgd; ONLY alpha for mfl, whose theta is stepped by --server_optimizer. fedavg, "
    "fedprox, reptile and Per-FedAvg do not use it.",
)
META_LR = flags.DEFINE_float(
    "meta_lr",
    None,
    "Learning rate of --meta_optimizer, >= 0; empty: the task's setting. 0 freezes what it steps "
    "(with mfl: alpha stays at --inner_lr, an ablation).",
)
SERVER_OPTIMIZER = flags.DEFINE_string(
    "server_optimizer",
    None,
    "Server optimizer applying model updates: fedavg's, reptile's, Per-FedAvg's and mfl's theta "
    "(mfl's alpha goes with --meta_optimizer); empty: the algorithm's default (sgd for fedavg and "
    "mfl 'local', adam for mfl 'meta').",
)
SERVER_LR = flags.DEFINE_float(
    "server_lr",
    None,
    "Learning rate of --server_optimizer (reptile's epsilon); empty: the algorithm's default "
    "(1.0 for sgd, 1e-3 for mfl's adam).",
)
COHORT_SIZE = flags.DEFINE_integer(
    "cohort_size",
    25,
    "Clients stacked into one federated client and trained in one TF call (same results, much "
    "faster); capped at --clients_per_round; 0 turns cohorts off.",
)
SEED = flags.DEFINE_integer(
    "seed", 0, "Seed of the data, the initial model and each round's clients."
)

# The --aggregator flags (aggregator_flags.py) are this binary's own: listed by --helpshort and
# recorded in hparams.csv.
flags.adopt_module_key_flags(aggregator_flags)

# ---- Data ----
NUM_TRAIN_CLIENTS = flags.DEFINE_integer(
    "num_train_clients", None, "Training clients of the task; empty: the task's default."
)
NUM_EVAL_CLIENTS = flags.DEFINE_integer(
    "num_eval_clients",
    None,
    "Held-out clients (never trained on) to evaluate; the task then holds out this many. Empty: "
    f"the task's own held-out clients, at most {DEFAULT_EVAL_CLIENTS} of them evaluated.",
)
SHOTS = flags.DEFINE_string(
    "shots",
    None,
    "Support examples per client (per class for digits_fewshot): N, or LO:HI (sinusoid, "
    "digits_fewshot) for each client to draw its own from LO..HI; empty: the task's setting "
    "(sinusoid 10, digits_fewshot 5; the others split each client in half).",
)
LABEL_NOISE = flags.DEFINE_string(
    "label_noise",
    None,
    "sinusoid: standard deviation of Gaussian noise on the targets clients observe (support, "
    "and training clients' query; held-out query targets stay noise-free): S, or LO:HI for each "
    "client to draw its own from U[LO, HI]; empty: 0 (no noise).",
)
DATA_ON_WORKERS = flags.DEFINE_bool(
    "data_on_workers",
    False,
    "Send each round's clients as int32 codes and build the examples on the worker(s), fewer "
    "bytes per round: digits and digits_fewshot gather rows of their image pool, which travels "
    "once inside the computation, and emnist reads its cache file, which must exist at the same "
    "path on each worker (the same clients and results); sinusoid and synthetic generate them "
    "there (the same distribution, another random stream). See the README's 'Several workers'.",
)
DIRICHLET = flags.DEFINE_float(
    "dirichlet_concentration", None, "digits: label skew, smaller is more skewed; empty: 0.5."
)
MODEL = flags.DEFINE_string(
    "model", None, "Model of digits/digits_fewshot/emnist: mlp or cnn; empty: the task's default."
)
# The cache flags (cache_flags.py) are this binary's own: listed by --helpshort and recorded in
# hparams.csv.
flags.adopt_module_key_flags(cache_flags)

# ---- Evaluation, checkpoints, output ----
EVAL_ADAPTATION_STEPS = flags.DEFINE_integer(
    "eval_adaptation_steps",
    None,
    "Adaptation steps on each held-out client's support set; empty: the task's setting, which "
    "is the effective --inner_steps for every built-in task.",
)
ROUNDS_PER_EVAL = flags.DEFINE_integer(
    "rounds_per_eval", 25, "Evaluate held-out clients every N rounds; 0: only after the last."
)
ROUNDS_PER_CHECKPOINT = flags.DEFINE_integer(
    "rounds_per_checkpoint", 10, "Save the program state every N rounds (and after the last)."
)
CHECKPOINTS_TO_KEEP = flags.DEFINE_integer(
    "checkpoints_to_keep", 3, "Most recent checkpoints kept; 0 keeps all."
)
ROUNDS_PER_LOG = flags.DEFINE_integer(
    "rounds_per_log",
    1,
    "Print a progress line and write the buffered metrics rows every N rounds (and on "
    "evaluation, checkpoint and last rounds).",
)
ROUNDS_PER_CALL = flags.DEFINE_integer(
    "rounds_per_call",
    0,
    "Rounds run by one TFF call (one federated computation of N rounds); a call always ends on "
    "evaluation and checkpoint rounds. Results equal one round per call. 0 (default): when the "
    f"run has at least {program.LONG_RUN_ROUNDS:,} rounds left to train on one worker (the "
    f"longer compilation pays off), the largest R up to {program.LONG_RUN_ROUNDS_PER_CALL} "
    "dividing --rounds_per_checkpoint and --rounds_per_eval, else 1.",
)
FUSE_ROUNDS = flags.DEFINE_bool(
    "fuse_rounds",
    None,
    "Run each round compiled to TFF's MapReduceForm (one client map, one aggregate, one server "
    "update: mfl_tff.training.fused_rounds): the same results in fewer steps of TFF's executor, "
    "for 1-4 s more compilation before the first round. Unset (default): fused when the run has "
    f"at least {program.FUSE_MIN_ROUNDS} rounds left to train on one worker. Ignored on several "
    "workers.",
)
VECTORIZE_COHORTS = flags.DEFINE_bool(
    "vectorize_cohorts",
    None,
    "Run each cohort's clients under tf.vectorized_map instead of a loop (mfl_tff.algorithms."
    "cohorts): the same results, faster rounds (3x on sinusoid, 1.6x on digits_fewshot mfl), "
    "and on larger models seconds more to build (about 6 s per second-order phase on digits). "
    "Unset (default): vectorized "
    f"when the run has at least {program.VECTORIZE_MIN_ROUNDS} rounds left to train.",
)
ROOT_OUTPUT_DIR = flags.DEFINE_string(
    "root_output_dir", "/tmp/mfl_tff", "Root of results/, checkpoints/ and logdir/."
)
EXPERIMENT_NAME = flags.DEFINE_string(
    "experiment_name",
    None,
    "Name of this run's subdirectories; empty: TASK_ALGORITHM. Rerunning with the same name "
    "resumes.",
)
# The execution flags (execution_flags.py) are this binary's own: listed by --helpshort and
# recorded in hparams.csv.
flags.adopt_module_key_flags(execution_flags)
VERBOSE = flags.DEFINE_bool(
    "verbose", False, "Show TensorFlow's and TFF's own log output (hidden by default)."
)

# Flags that do not change what is trained: a resumed run may change them.
MAY_DIFFER_ON_RESUME = frozenset(
    {
        "total_rounds",
        "eval_adaptation_steps",
        "rounds_per_eval",
        "rounds_per_checkpoint",
        "checkpoints_to_keep",
        "rounds_per_log",
        "rounds_per_call",
        "fuse_rounds",
        "vectorize_cohorts",
        "root_output_dir",
        "experiment_name",
        "data_cache_dir",
        "worker_data_cache_dir",
        "execution",
        "worker",
        "worker_timeout",
        "cohort_size",
        # Where the examples are built, not which, for the tasks whose workers gather or read
        # them (digits, emnist); where they generate them (sinusoid, synthetic) the clients
        # differ, and train.py refuses the switch.
        "data_on_workers",
        "verbose",
    }
)
AGGREGATORS = aggregator_flags.KINDS


# ---- Validation: every check runs before anything is written ----


def check_flags() -> None:
    """Checks the flags that need no library (counts, ranges, fixed choices)."""
    at_least_one = {
        "total_rounds": TOTAL_ROUNDS,
        "clients_per_round": CLIENTS_PER_ROUND,
        "inner_steps": INNER_STEPS,
        "local_epochs": LOCAL_EPOCHS,
        "rounds_per_checkpoint": ROUNDS_PER_CHECKPOINT,
        "rounds_per_log": ROUNDS_PER_LOG,
        "num_train_clients": NUM_TRAIN_CLIENTS,
        "num_eval_clients": NUM_EVAL_CLIENTS,
        "eval_adaptation_steps": EVAL_ADAPTATION_STEPS,
    }
    for name, holder in at_least_one.items():
        value = holder.value
        require(value is None or value >= 1, f"--{name} must be >= 1, got {value}.")
    shots()
    label_noise()
    for holder in (INNER_CLIP_NORM, META_CLIP_NORM):
        value = holder.value
        require(
            value is None or (math.isfinite(value) and value >= 0),
            f"--{holder.name} must be a number >= 0 (0 turns clipping off), got {value}.",
        )
    for name, holder in {
        "rounds_per_eval": ROUNDS_PER_EVAL,
        "checkpoints_to_keep": CHECKPOINTS_TO_KEEP,
        "cohort_size": COHORT_SIZE,
    }.items():
        require(holder.value >= 0, f"--{name} must be >= 0 (0 turns it off), got {holder.value}.")
    require(
        ROUNDS_PER_CALL.value >= 0,
        "--rounds_per_call must be >= 0 (0 chooses by the run's length), got "
        f"{ROUNDS_PER_CALL.value}.",
    )
    for name, holder in {
        "inner_lr": INNER_LR,
        "outer_lr": OUTER_LR,
        "server_lr": SERVER_LR,
        "dirichlet_concentration": DIRICHLET,
    }.items():
        value = holder.value
        require(
            value is None or (math.isfinite(value) and value > 0),
            f"--{name} must be a number > 0, got {value}.",
        )
    # 0 is allowed: it freezes what the meta-optimizer steps (mfl's alpha), an ablation.
    meta_lr = META_LR.value
    require(
        meta_lr is None or (math.isfinite(meta_lr) and meta_lr >= 0),
        f"--meta_lr must be a number >= 0 (0 freezes what --meta_optimizer steps), got {meta_lr}.",
    )
    if NUM_TRAIN_CLIENTS.value is not None and CLIENTS_PER_ROUND.value is not None:
        require(
            CLIENTS_PER_ROUND.value <= NUM_TRAIN_CLIENTS.value,
            f"--clients_per_round={CLIENTS_PER_ROUND.value} exceeds "
            f"--num_train_clients={NUM_TRAIN_CLIENTS.value}; lower --clients_per_round or "
            "raise --num_train_clients.",
        )
    aggregator_flags.check_kind()
    execution_flags.check_execution_flags()
    # Several rounds in one call chain their aggregations, which TFF cannot split across workers.
    require(
        len(workers()) <= 1 or ROUNDS_PER_CALL.value <= 1,
        f"--rounds_per_call={ROUNDS_PER_CALL.value} chains rounds in one TFF call, which cannot "
        "run on several workers; drop --rounds_per_call, or pass one --worker.",
    )
    require(SEED.value >= 0, f"--seed must be >= 0, got {SEED.value}.")
    require(bool(ROOT_OUTPUT_DIR.value), "--root_output_dir must not be empty.")
    name = experiment_name()
    require(
        name not in ("", ".", "..") and os.sep not in name,
        f"--experiment_name={name!r} must be a plain directory name (no '{os.sep}').",
    )


def check_choices() -> None:
    """Checks the flags whose choices the library defines (before any algorithm is built)."""
    choices = (
        (META_OPTIMIZER, builders.OPTIMIZERS),
        (SERVER_OPTIMIZER, builders.OPTIMIZERS),
        (ALPHA_GRANULARITY, meta_hparams.GRANULARITIES),
        (ADAPTIVE_UPDATE, mfl.ADAPTIVE_UPDATES),
        (ADAPTIVE_DATA, mfl.ADAPTIVE_DATA),
    )
    for holder, allowed in choices:
        value = holder.value
        # Unset: the task's setting (META_OPTIMIZER, ALPHA_GRANULARITY) or the algorithm's default
        # (SERVER_OPTIMIZER, also when empty); `effective_settings` checks the task's values.
        require(
            value is None or value in allowed or (holder is SERVER_OPTIMIZER and not value),
            f"--{holder.name}={value!r} is unknown; choose one of: {', '.join(allowed)}.",
        )


def shots() -> settings_lib.Shots | None:
    """--shots as a task takes it: a count, a range (lo, hi), or None when unset.

    Raises:
      UsageError: If the flag is not N or LO:HI with 1 <= LO <= HI.
    """
    if SHOTS.value is None:
        return None
    try:
        return settings_lib.parse_shots(SHOTS.value)
    except ValueError as e:
        raise UsageError(str(e)) from None


def label_noise() -> settings_lib.Noise | None:
    """--label_noise as a task takes it: a standard deviation, a range (lo, hi), or None (unset).

    Raises:
      UsageError: If the flag is not S or LO:HI with 0 <= LO <= HI.
    """
    if LABEL_NOISE.value is None:
        return None
    try:
        return settings_lib.parse_noise(LABEL_NOISE.value)
    except ValueError as e:
        raise UsageError(str(e)) from None


def algorithm_flags() -> dict:
    """The `AlgorithmOptions` fields set by the meta-model flags."""
    return {
        "meta_model": META_MODEL.value,
        "client_optimizer": CLIENT_OPTIMIZER.value,
        "inner_clip_norm": INNER_CLIP_NORM.value,
        "meta_clip_norm": META_CLIP_NORM.value,
    }


def meta_model() -> str:
    """The run's meta-model: --meta_model, or the algorithm's default when it is unset (call
    `check()` first, for a known --algorithm)."""
    options = builders.AlgorithmOptions(
        adaptive_update=ADAPTIVE_UPDATE.value, meta_model=META_MODEL.value
    )
    return builders.resolved_options(ALGORITHM.value, options).meta_model


def explicit_settings() -> set[str]:
    """The hyperparameter flags given on the command line (the others take the task's values)."""
    return {name for name in settings_lib.names() if flags.FLAGS[name].value is not None}


def effective_settings(task: FederatedTask) -> settings_lib.TaskSettings:
    """The run's hyperparameters: each flag given explicitly, else the task's setting.

    --shots is not overridden here: it is a data option, so the task was built with it and its
    settings already record the shots it has.

    Raises:
      UsageError: If a value the task sets is not a valid choice (a user's task may set any).
    """
    overrides = {name: flags.FLAGS[name].value for name in settings_lib.names() if name != "shots"}
    try:
        settings = task.settings.with_overrides(**overrides)
    except ValueError as e:
        raise UsageError(f"--task={task.name}: {e}") from None
    for name, allowed in (
        ("meta_optimizer", builders.OPTIMIZERS),
        ("alpha_granularity", meta_hparams.GRANULARITIES),
    ):
        value = getattr(settings, name)
        require(
            value in allowed,
            f"--task={task.name} sets {name}={value!r}, which is unknown; pass --{name} with one "
            f"of: {', '.join(allowed)}.",
        )
    return settings


def describe_settings(task: FederatedTask, settings: settings_lib.TaskSettings) -> str:
    """One line: every effective hyperparameter, those set by a flag marked with '*'."""
    return f"Settings ({task.name}'s, * = set by a flag): {settings.describe(explicit_settings())}"


def describe_meta_model() -> str:
    """One line: the meta-model and client optimizer in effect, and where the meta-model came
    from."""
    source = (
        " (set by a flag)" if META_MODEL.value is not None else f" ({ALGORITHM.value}'s default)"
    )
    return f"Meta-model: {meta_model()}{source}, client optimizer {CLIENT_OPTIMIZER.value}"


def check_aggregator_flags() -> None:
    """Checks --aggregator's own flags (`aggregator_flags.check_aggregator_flags`) against
    cohorts and --worker (call `check_flags` first)."""
    aggregator_flags.check_aggregator_flags(num_workers=len(workers()), accounts_privacy=True)


def experiment_name() -> str:
    if EXPERIMENT_NAME.value is not None:
        return EXPERIMENT_NAME.value
    return f"{TASK.value}_{ALGORITHM.value}"
