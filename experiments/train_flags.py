"""The flags of experiments/train.py, kept apart so the binary holds only what it does.

Flag names are a contract (scripts and users depend on them, issue 4); defaults give a run of MFL
on `digits_fewshot` in about a minute.
"""

from __future__ import annotations

from absl import flags

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
    "Algorithm: fedavg, maml, fomaml, meta_sgd, reptile, per_fedavg_fo, per_fedavg_hf, mfl.",
)
TOTAL_ROUNDS = flags.DEFINE_integer(
    "total_rounds", 100, "Training rounds in total (a resumed run trains the remaining ones)."
)
CLIENTS_PER_ROUND = flags.DEFINE_integer(
    "clients_per_round", 25, "Training clients sampled each round (a function of seed and round)."
)
INNER_STEPS = flags.DEFINE_integer(
    "inner_steps", 5, "K: inner-loop steps on the support set (local steps of reptile/Per-FedAvg)."
)
LOCAL_EPOCHS = flags.DEFINE_integer(
    "local_epochs", 1, "E: local epochs of fedavg and of mfl's 'local' adaptive update."
)
ALPHA_GRANULARITY = flags.DEFINE_string(
    "alpha_granularity", "per_layer", "mfl's learned rates: scalar, per_layer or per_coordinate."
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
INNER_LR = flags.DEFINE_float(
    "inner_lr",
    0.4,
    "The clients' step size everywhere: fedavg's local SGD, the inner loop, the initial learned "
    "rates of mfl/meta_sgd, and held-out fine-tuning.",
)
OUTER_LR = flags.DEFINE_float("outer_lr", 0.01, "Per-FedAvg's beta (its second local step).")
META_OPTIMIZER = flags.DEFINE_string(
    "meta_optimizer",
    "adam",
    "Server optimizer of what is meta-learned (theta for maml/fomaml/meta_sgd, alpha for mfl): "
    "sgd, sgdm, adam, adagrad, yogi.",
)
META_LR = flags.DEFINE_float("meta_lr", 1e-3, "Learning rate of --meta_optimizer.")
SERVER_OPTIMIZER = flags.DEFINE_string(
    "server_optimizer",
    None,
    "Optimizer applying model updates (fedavg, reptile, Per-FedAvg, mfl's theta); empty: the "
    "algorithm's default (sgd for fedavg and mfl 'local', adam for mfl 'meta').",
)
SERVER_LR = flags.DEFINE_float(
    "server_lr",
    None,
    "Learning rate of --server_optimizer (reptile's epsilon); empty: the algorithm's default "
    "(1.0 for sgd, 1e-3 for mfl's adam).",
)
AGGREGATOR = flags.DEFINE_string(
    "aggregator",
    "mean",
    "How client updates (and alpha meta-gradients) are combined: mean (weighted by examples); "
    "dp (user-level differential privacy: each client clipped to --clip_norm, Gaussian noise "
    "--noise_multiplier, every client weighted the same; epsilon reported); robust (TFF's "
    "robust_aggregator: adaptive zeroing of outliers and clipping). dp and robust turn cohorts "
    "off.",
)
NOISE_MULTIPLIER = flags.DEFINE_float(
    "noise_multiplier",
    None,
    "--aggregator=dp (required): noise multiplier of a round, > 0: the noise standard deviation "
    "over the clip, as the privacy accountant counts it (mfl/meta_sgd noise each of their two "
    "streams with sqrt(2) times it).",
)
CLIP_NORM = flags.DEFINE_string(
    "clip_norm",
    None,
    "--aggregator=dp: L2 clip of each client's update and alpha meta-gradient, a number > 0, or "
    "'adaptive' (TFF's adaptive clipping to the median norm, inside the same budget); empty: "
    "adaptive.",
)
DP_DELTA = flags.DEFINE_float(
    "dp_delta",
    None,
    "--aggregator=dp: delta of the reported (epsilon, delta) guarantee, in (0, 1); empty: 1 / the "
    "number of training clients.",
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
SHOTS = flags.DEFINE_integer(
    "shots", None, "Support examples per client (per class for digits_fewshot); empty: default."
)
DIRICHLET = flags.DEFINE_float(
    "dirichlet_concentration", None, "digits: label skew, smaller is more skewed; empty: 0.5."
)
MODEL = flags.DEFINE_string(
    "model", None, "Model of digits/digits_fewshot/emnist: mlp or cnn; empty: the task's default."
)
DATA_CACHE_DIR = flags.DEFINE_string(
    "data_cache_dir", None, "emnist: directory holding emnist_all.sqlite; empty: ~/.tff."
)

# ---- Evaluation, checkpoints, output ----
EVAL_ADAPTATION_STEPS = flags.DEFINE_integer(
    "eval_adaptation_steps",
    None,
    "Adaptation steps on each held-out client's support set; empty: --inner_steps.",
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
    "rounds_per_log", 1, "Print a progress line every N rounds (and on evaluation rounds)."
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
EXECUTION = flags.DEFINE_string(
    "execution",
    "local",
    "Where computations run: local (a TFF worker_binary started and stopped here) or remote (a "
    "worker_binary already running at --worker, e.g. on another machine).",
)
WORKER = flags.DEFINE_string(
    "worker", None, "--execution=remote: HOST:PORT of a running TFF worker_binary --port=PORT."
)
WORKER_TIMEOUT = flags.DEFINE_float(
    "worker_timeout",
    30.0,
    "--execution=remote: seconds to wait for the worker to answer, at the start and whenever "
    "the connection drops, before giving up with an error.",
)
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
        "root_output_dir",
        "experiment_name",
        "data_cache_dir",
        "execution",
        "worker",
        "worker_timeout",
        "cohort_size",
        "verbose",
    }
)
AGGREGATORS = ("mean", "dp", "robust")
# The flags that only --aggregator=dp reads.
DP_FLAGS = ("noise_multiplier", "clip_norm", "dp_delta")
EXECUTIONS = ("local", "remote")
