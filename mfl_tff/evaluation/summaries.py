"""Summaries of per-client personalization results: the `personalization.json` contract."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Optional

import numpy as np


def distribution(values: Sequence[float]) -> dict[str, float]:
    """Mean, p10, median and p90 of per-client values (non-finite values excluded and counted)."""
    values = np.asarray(values, dtype=np.float64)
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        nan = float("nan")
        return {"mean": nan, "p10": nan, "median": nan, "p90": nan, "num_non_finite": len(values)}
    return {
        "mean": float(np.mean(finite)),
        "p10": float(np.percentile(finite, 10)),
        "median": float(np.median(finite)),
        "p90": float(np.percentile(finite, 90)),
        "num_non_finite": int(values.size - finite.size),
    }


def stack_clients(per_client: Sequence[Mapping[str, np.ndarray]], key: str) -> np.ndarray:
    """[num_clients, max_steps + 1] array of one curve from the computation's per-client output."""
    return np.stack([np.asarray(c[key], dtype=np.float64) for c in per_client])


def rule_report(curves: np.ndarray, steps: int) -> dict:
    """Before (step 0) and after (`steps`) distributions and the mean curve over steps."""
    return {
        "adaptation_steps": int(steps),
        "before_adaptation": distribution(curves[:, 0]),
        "after_adaptation": distribution(curves[:, steps]),
        "steps_curve": [float(v) for v in np.nanmean(curves, axis=0)],
    }


def step_size_report(
    per_client: Sequence[Mapping[str, np.ndarray]], tensor_shapes: Sequence[Sequence[int]]
) -> list[dict]:
    """Per weight tensor and inner step, the distribution over clients of the step size the own
    rule used (`own_step_sizes`: alpha times the meta-model's multiplier, mean over the tensor)."""
    rates = np.stack([np.asarray(c["own_step_sizes"], np.float64) for c in per_client])
    report = []
    for tensor, shape in enumerate(tensor_shapes):
        steps = []
        for step in range(rates.shape[1]):
            values = rates[:, step, tensor]
            steps.append(
                {
                    "step": step,
                    "mean": float(np.mean(values)),
                    "p10": float(np.percentile(values, 10)),
                    "p90": float(np.percentile(values, 90)),
                }
            )
        report.append({"tensor": tensor, "shape": [int(d) for d in shape], "steps": steps})
    return report


def personalization_report(
    per_client: Sequence[Mapping[str, np.ndarray]],
    *,
    task: str,
    algorithm: str,
    metric: str,
    rounds: int,
    own_steps: int,
    fine_tune_steps: int,
    tensor_shapes: Optional[Sequence[Sequence[int]]] = None,
) -> dict:
    """The `personalization.json` document (docs/architecture.md), plus the fine-tuning baseline.

    Top-level `before_adaptation`, `after_adaptation` and `steps_curve` are the algorithm's own rule
    (learned rates at their trained step count, or fine-tuning); `fine_tune` holds the shared
    fixed-rate baseline; `loss` holds the same for the query loss. With `tensor_shapes` (the
    algorithms with learned rates), `step_sizes` holds `step_size_report`.
    """
    own = rule_report(stack_clients(per_client, "own_metric"), own_steps)
    extra = {}
    if tensor_shapes is not None and per_client and "own_step_sizes" in per_client[0]:
        extra["step_sizes"] = step_size_report(per_client, tensor_shapes)
    return {
        "task": task,
        "algorithm": algorithm,
        "metric": metric,
        "num_clients": len(per_client),
        "rounds": int(rounds),
        **own,
        "fine_tune": rule_report(stack_clients(per_client, "fine_tune_metric"), fine_tune_steps),
        "loss": {
            "own": rule_report(stack_clients(per_client, "own_loss"), own_steps),
            "fine_tune": rule_report(stack_clients(per_client, "fine_tune_loss"), fine_tune_steps),
        },
        **extra,
    }
