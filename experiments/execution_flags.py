"""Where experiments/train.py runs its computations: --execution, --worker, --worker_timeout.

Local execution starts a TFF worker_binary and stops it on exit; remote execution uses running
worker_binary processes, one or several (`mfl_tff.training.multi_worker` shares each round's
clients among them).
"""

from __future__ import annotations

from absl import flags

from experiments.aggregator_flags import UsageError, require
from mfl_tff.training import multi_worker, worker

EXECUTIONS = ("local", "remote")

EXECUTION = flags.DEFINE_string(
    "execution",
    "local",
    "Where computations run: local (a TFF worker_binary started and stopped here) or remote (a "
    "worker_binary already running at --worker, e.g. on another machine).",
)
WORKER = flags.DEFINE_string(
    "worker",
    None,
    "--execution=remote: HOST:PORT of a running TFF worker_binary --port=PORT, or several "
    "comma-separated (HOST:PORT,HOST:PORT,...) that share each round's clients.",
)
WORKER_TIMEOUT = flags.DEFINE_float(
    "worker_timeout",
    30.0,
    "--execution=remote: seconds to wait for each worker to answer, at the start and whenever "
    "the connection drops, before giving up with an error.",
)


def check_execution_flags() -> None:
    """Checks --execution, --worker and --worker_timeout; raises `UsageError` naming the fix."""
    require(
        EXECUTION.value in EXECUTIONS,
        f"--execution={EXECUTION.value!r} is not supported; choose one of: "
        f"{', '.join(EXECUTIONS)}.",
    )
    if EXECUTION.value != "remote":
        require(
            not flags.FLAGS["worker"].present,
            "--worker is only used with --execution=remote; add --execution=remote or drop "
            "--worker.",
        )
        return
    require(
        bool(WORKER.value),
        "--execution=remote needs --worker=HOST:PORT, the address of a running TFF worker_binary.",
    )
    targets = WORKER.value.split(",")
    if len(targets) == 1:
        try:
            worker.check_target(WORKER.value)
        except ValueError:
            raise UsageError(
                f"--worker={WORKER.value!r} must be HOST:PORT, e.g. --worker=10.0.0.7:8000."
            ) from None
    else:
        for target in targets:
            try:
                worker.check_target(target.strip())
            except ValueError:
                raise UsageError(
                    f"--worker={WORKER.value}: {target.strip()!r} must be HOST:PORT, e.g. "
                    "--worker=10.0.0.7:8000,10.0.0.8:8000."
                ) from None
        try:
            multi_worker.parse_targets(WORKER.value)
        except ValueError as e:
            raise UsageError(f"--worker={WORKER.value}: {e}") from None
    require(
        WORKER_TIMEOUT.value > 0,
        f"--worker_timeout must be > 0 seconds, got {WORKER_TIMEOUT.value}.",
    )


def workers() -> list[str]:
    """The --worker targets with --execution=remote (checked flags); empty for local."""
    if EXECUTION.value != "remote":
        return []
    if "," not in WORKER.value:
        return [WORKER.value]  # One worker: used exactly as given, as before lists existed.
    return multi_worker.parse_targets(WORKER.value)
