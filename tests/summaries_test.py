"""Tests of `mfl_tff.evaluation.summaries`: the `personalization.json` document.

Its contract is in docs/architecture.md, "File contracts".

Pure numpy: no TFF computation runs here.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from mfl_tff.evaluation import summaries
from tests import testing

DESIGN_KEYS = testing.PERSONALIZATION_KEYS
DISTRIBUTION_KEYS = testing.DISTRIBUTION_KEYS


def test_distribution_matches_numpy_percentiles():
    values = np.random.default_rng(0).gamma(2.0, size=37)
    got = summaries.distribution(list(values))
    assert got["mean"] == pytest.approx(values.mean())
    # numpy's default (linear interpolation) percentiles, as float64
    assert got["p10"] == pytest.approx(np.percentile(values, 10))
    assert got["median"] == pytest.approx(np.percentile(values, 50))
    assert got["p90"] == pytest.approx(np.percentile(values, 90))
    assert got["num_non_finite"] == 0
    assert got["p10"] < got["median"] < got["p90"]
    assert all(isinstance(got[k], float) for k in DISTRIBUTION_KEYS)


def test_distribution_of_small_known_sample():
    got = summaries.distribution([4.0, 1.0, 3.0, 2.0])
    assert got == pytest.approx(
        {"mean": 2.5, "p10": 1.3, "median": 2.5, "p90": 3.7, "num_non_finite": 0}
    )


def test_distribution_excludes_and_counts_non_finite_values():
    got = summaries.distribution([1.0, np.nan, 3.0, np.inf, -np.inf, 2.0])
    assert got["num_non_finite"] == 3
    assert got["mean"] == pytest.approx(2.0)
    assert got["median"] == pytest.approx(2.0)
    assert got["p10"] == pytest.approx(np.percentile([1.0, 2.0, 3.0], 10))


def test_distribution_of_only_non_finite_values_is_nan_not_an_error():
    got = summaries.distribution([np.nan, np.inf])
    assert got["num_non_finite"] == 2
    assert all(np.isnan(got[k]) for k in DISTRIBUTION_KEYS)


def per_client(curves: np.ndarray) -> list[dict]:
    """Shaped like the evaluation computation's per-client output."""
    return [
        {
            "own_loss": c * 10,
            "own_metric": c,
            "fine_tune_loss": c * 20,
            "fine_tune_metric": c / 2,
        }
        for c in curves
    ]


def test_stack_clients_stacks_one_curve_per_client():
    curves = np.arange(12, dtype=np.float32).reshape(3, 4)
    stacked = summaries.stack_clients(per_client(curves), "own_metric")
    assert stacked.shape == (3, 4) and stacked.dtype == np.float64
    np.testing.assert_array_equal(stacked, curves)


def test_rule_report_reads_before_at_zero_and_after_at_steps():
    curves = np.array([[0.5, 0.6, 0.7, 0.9], [0.4, 0.5, np.nan, 0.6], [0.3, 0.35, 0.4, 0.8]])
    report = summaries.rule_report(curves, steps=2)
    assert report["adaptation_steps"] == 2
    assert report["before_adaptation"]["mean"] == pytest.approx(0.4)
    assert report["after_adaptation"]["num_non_finite"] == 1
    assert report["after_adaptation"]["mean"] == pytest.approx(0.55)
    np.testing.assert_allclose(report["steps_curve"], [0.4, 1.45 / 3, 0.55, 2.3 / 3])


def test_personalization_report_has_the_design_keys_and_is_json():
    rng = np.random.default_rng(1)
    curves = rng.uniform(0.2, 1.0, size=(5, 4))
    report = summaries.personalization_report(
        per_client(curves),
        task="digits",
        algorithm="mfl",
        metric="accuracy",
        rounds=7,
        own_steps=1,
        fine_tune_steps=3,
    )
    assert DESIGN_KEYS <= set(report)
    assert (report["task"], report["algorithm"], report["metric"]) == ("digits", "mfl", "accuracy")
    assert report["num_clients"] == 5 and report["rounds"] == 7
    for key in ("before_adaptation", "after_adaptation"):
        assert DISTRIBUTION_KEYS <= set(report[key])
    own = curves  # own_metric
    assert report["before_adaptation"]["median"] == pytest.approx(np.median(own[:, 0]))
    assert report["after_adaptation"]["p90"] == pytest.approx(np.percentile(own[:, 1], 90))
    np.testing.assert_allclose(report["steps_curve"], own.mean(axis=0))
    assert len(report["steps_curve"]) == 4
    fine_tune = report["fine_tune"]
    assert fine_tune["after_adaptation"]["mean"] == pytest.approx((curves[:, 3] / 2).mean())
    assert report["loss"]["own"]["after_adaptation"]["mean"] == pytest.approx(
        (curves[:, 1] * 10).mean()
    )
    assert report["loss"]["fine_tune"]["before_adaptation"]["p10"] == pytest.approx(
        np.percentile(curves[:, 0] * 20, 10)
    )
    # It is written as personalization.json: plain JSON types only.
    assert json.loads(json.dumps(report)) == report
