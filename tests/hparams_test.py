"""Tests of `mfl_tff.meta.hparams`: alpha's shapes, validation, broadcasting and summaries."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from mfl_tff.meta import hparams

# A two-layer MLP's trainable shapes: kernel, bias, kernel, bias.
SHAPES = [(2, 5), (5,), (5, 3), (3,)]


def random_weights(seed=0):
    rng = np.random.default_rng(seed)
    return tuple(rng.normal(size=s).astype(np.float32) for s in SHAPES)


@pytest.mark.parametrize(
    "granularity, expected_shapes",
    [("scalar", [()]), ("per_layer", [()] * 4), ("per_coordinate", SHAPES)],
)
def test_initial_alpha_shapes_and_values(granularity, expected_shapes):
    alpha = hparams.initial_alpha(SHAPES, granularity, 0.25)
    assert isinstance(alpha, tuple)
    assert [np.shape(a) for a in alpha] == [tuple(s) for s in expected_shapes]
    for a in alpha:
        assert np.asarray(a).dtype == np.float32
        np.testing.assert_array_equal(a, np.float32(0.25))


def test_granularities_are_the_documented_three():
    assert hparams.GRANULARITIES == ("scalar", "per_layer", "per_coordinate")
    for granularity in hparams.GRANULARITIES:
        hparams.check_granularity(granularity)  # does not raise


@pytest.mark.parametrize("value", [0.0, -0.1, -1e-30, float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("granularity", ["scalar", "per_layer", "per_coordinate"])
def test_initial_alpha_rejects_non_positive_and_non_finite_values(granularity, value):
    with pytest.raises(ValueError, match="alpha"):
        hparams.initial_alpha(SHAPES, granularity, value)


@pytest.mark.parametrize("granularity", ["per_tensor", "Scalar", "", "coordinate"])
def test_bad_granularity_is_rejected_naming_the_choices(granularity):
    for call in (
        lambda: hparams.initial_alpha(SHAPES, granularity, 0.1),
        lambda: hparams.check_granularity(granularity),
    ):
        with pytest.raises(ValueError) as error:
            call()
        message = str(error.value)
        for choice in ("scalar", "per_layer", "per_coordinate"):
            assert choice in message
        assert repr(granularity) in message


@pytest.mark.parametrize("value", [1e39, 1e-46])
def test_initial_alpha_rejects_values_that_are_not_positive_finite_in_float32(value):
    with pytest.raises(ValueError):
        hparams.initial_alpha(SHAPES, "per_coordinate", value)


def test_expand_broadcasts_a_scalar_rate_to_every_tensor():
    weights = random_weights()
    alpha = hparams.initial_alpha(SHAPES, "scalar", 0.5)
    expanded = hparams.expand(alpha, weights)
    assert len(expanded) == len(weights)
    for rate, w in zip(expanded, weights):
        np.testing.assert_array_equal(np.asarray(rate) * w, 0.5 * w)


def test_expand_keeps_per_layer_and_per_coordinate_rates():
    weights = random_weights()
    rng = np.random.default_rng(1)
    per_layer = tuple(np.float32(r) for r in rng.uniform(0.1, 1.0, size=4))
    per_coordinate = tuple(rng.uniform(0.1, 1.0, size=s).astype(np.float32) for s in SHAPES)
    for alpha in (per_layer, per_coordinate):
        expanded = hparams.expand(alpha, weights)
        assert len(expanded) == 4
        for e, a in zip(expanded, alpha):
            np.testing.assert_array_equal(e, a)


def test_expand_of_a_single_tensor_model():
    weights = (np.ones((3,), np.float32),)
    for granularity in hparams.GRANULARITIES:
        alpha = hparams.initial_alpha([(3,)], granularity, 0.2)
        (rate,) = hparams.expand(alpha, weights)
        np.testing.assert_allclose(np.asarray(rate) * weights[0], [0.2] * 3)


def test_expand_rejects_a_rate_count_that_fits_no_granularity():
    with pytest.raises(ValueError, match="2 tensors"):
        hparams.expand((np.float32(0.1), np.float32(0.2)), random_weights())


def test_expand_is_differentiable_with_respect_to_a_scalar_alpha():
    """d/d alpha sum_i sum(expand(alpha)_i * w_i) = sum of all weights (the rates are shared)."""
    weights = random_weights(2)
    alpha = (tf.constant(0.3),)
    with tf.GradientTape() as tape:
        tape.watch(alpha)
        total = tf.add_n(
            [tf.reduce_sum(a * w) for a, w in zip(hparams.expand(alpha, weights), weights)]
        )
    (grad,) = tape.gradient(total, alpha)
    expected = sum(float(np.sum(w, dtype=np.float64)) for w in weights)
    assert float(grad) == pytest.approx(expected, rel=1e-5, abs=1e-5)


def test_project_positive_clamps_below_the_minimum_only():
    alpha = (
        np.array([-1.0, 0.0, 1e-6, 0.5], np.float32),
        np.float32(-3.0),
        np.float32(2.0),
    )
    projected = hparams.project_positive(alpha, 1e-4)
    assert isinstance(projected, tuple) and len(projected) == 3
    np.testing.assert_allclose(projected[0], [1e-4, 1e-4, 1e-4, 0.5])
    assert float(projected[1]) == pytest.approx(1e-4)
    assert float(projected[2]) == 2.0


@pytest.mark.parametrize("granularity", ["scalar", "per_coordinate"])
def test_summary_matches_numpy(granularity):
    rng = np.random.default_rng(3)
    base = hparams.initial_alpha(SHAPES, granularity, 1.0)
    alpha = tuple(
        (np.asarray(a) * rng.uniform(0.1, 2.0, size=np.shape(a))).astype(np.float32) for a in base
    )
    flat = np.concatenate([np.reshape(a, -1) for a in alpha]).astype(np.float64)
    summary = hparams.summary(alpha)
    assert set(summary) == {"alpha_mean", "alpha_min", "alpha_max"}
    assert float(summary["alpha_mean"]) == pytest.approx(flat.mean(), rel=1e-6)
    assert float(summary["alpha_min"]) == pytest.approx(flat.min(), rel=1e-7)
    assert float(summary["alpha_max"]) == pytest.approx(flat.max(), rel=1e-7)


def test_summary_min_and_max_of_per_layer_rates():
    alpha = (np.float32(0.3), np.float32(0.05), np.float32(0.9), np.float32(0.4))
    summary = hparams.summary(alpha)
    assert float(summary["alpha_min"]) == pytest.approx(0.05)
    assert float(summary["alpha_max"]) == pytest.approx(0.9)
