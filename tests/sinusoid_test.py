"""Tests of `mfl_tff.data.sinusoid`: few-shot sine-wave regression clients."""

from __future__ import annotations

import numpy as np
import pytest

from mfl_tff.data import sinusoid

SHOTS = 10


@pytest.fixture(scope="module")
def task():
    return sinusoid.build_sinusoid(shots=SHOTS, num_train_clients=1000, num_eval_clients=200)


def _clients(task, train=300, held_out=100):
    for data, count in ((task.train_data, train), (task.eval_data, held_out)):
        for cid in data.client_ids[:count]:
            yield cid, data.client_arrays(cid)


def test_every_target_is_the_clients_wave(task):
    for cid, arrays in _clients(task):
        amplitude, phase = sinusoid.wave(cid, seed=0)
        x = arrays["x"].astype(np.float64)
        assert arrays["x"].shape == arrays["y"].shape == (len(x), 1)
        np.testing.assert_allclose(arrays["y"], amplitude * np.sin(x - phase), atol=2e-5)


def test_amplitude_and_phase_are_recoverable_from_the_points(task):
    # A sin(x - p) = (A cos p) sin x - (A sin p) cos x: a linear least-squares fit recovers A and p.
    for cid, arrays in _clients(task, train=50, held_out=20):
        x, y = arrays["x"][:, 0].astype(np.float64), arrays["y"][:, 0].astype(np.float64)
        (a, b), *_ = np.linalg.lstsq(np.stack([np.sin(x), np.cos(x)], axis=1), y, rcond=None)
        amplitude, phase = sinusoid.wave(cid, seed=0)
        assert np.hypot(a, b) == pytest.approx(amplitude, abs=1e-4)
        assert np.arctan2(-b, a) % (2 * np.pi) == pytest.approx(phase, abs=1e-4)


def test_amplitude_phase_and_inputs_span_their_ranges(task):
    waves = np.array([sinusoid.wave(cid, 0) for cid, _ in _clients(task, 400, 100)])
    amplitude, phase = waves[:, 0], waves[:, 1]
    assert np.all((amplitude >= 0.1) & (amplitude <= 5.0))
    assert np.all((phase >= 0.0) & (phase <= np.pi))
    # Uniform draws over 500 clients reach near both ends of each range.
    assert amplitude.min() < 0.5 and amplitude.max() > 4.6
    assert phase.min() < 0.3 and phase.max() > np.pi - 0.3
    x = np.concatenate([arrays["x"][:, 0] for _, arrays in _clients(task, 400, 0)])
    assert x.min() >= -5.0 and x.max() <= 5.0
    assert x.min() < -4.9 and x.max() > 4.9


def test_held_out_query_is_100_evenly_spaced_points(task):
    for cid in task.eval_data.client_ids[:20]:
        x = task.eval_data.client_arrays(cid)["x"][:, 0]
        assert len(x) == SHOTS + 100
        query = x[SHOTS:].astype(np.float64)
        assert query[0] == -5.0 and query[-1] == 5.0
        np.testing.assert_allclose(np.diff(query), 10.0 / 99.0, atol=1e-5)
    # The same 100 points reach the packed query of a held-out client.
    (packed,) = task.eval_clients([task.eval_data.client_ids[0]])
    query = packed["query"]
    assert query["mask"].sum() == 100
    packed_x = np.sort(query["x"][query["mask"] > 0][:, 0])
    np.testing.assert_allclose(packed_x, -5.0 + 10.0 * np.arange(100) / 99.0, atol=1e-5)


@pytest.mark.parametrize("shots", [1, 5, 10])
def test_support_size_is_shots(shots):
    task = sinusoid.build_sinusoid(
        shots=shots, query_points=7, num_train_clients=10, num_eval_clients=5
    )
    for cid in task.train_data.client_ids[:5]:
        arrays = task.train_data.client_arrays(cid)
        assert len(arrays["x"]) == shots + 7
        (packed,) = task.train_clients([cid])
        support = packed["support"]
        assert support["mask"].sum() == shots
        assert packed["query"]["mask"].sum() == 7
        # The support is exactly the first `shots` generated points (no shuffling across the cut).
        np.testing.assert_array_equal(
            np.sort(support["x"][support["mask"] > 0][:, 0]), np.sort(arrays["x"][:shots, 0])
        )
    (held_out,) = task.eval_clients(task.eval_data.client_ids[:1])
    assert held_out["support"]["mask"].sum() == shots
    assert held_out["query"]["mask"].sum() == 100


def test_training_query_points_are_random_not_a_grid(task):
    x = task.train_data.client_arrays(task.train_data.client_ids[0])["x"][SHOTS:, 0]
    assert len(x) == 10
    assert np.std(np.diff(np.sort(x))) > 1e-3


def test_clients_are_reproducible_and_seed_dependent(task):
    cid = "train/0000123"
    again = sinusoid.build_sinusoid(num_train_clients=1000)
    np.testing.assert_array_equal(
        task.train_data.client_arrays(cid)["y"], again.train_data.client_arrays(cid)["y"]
    )
    assert sinusoid.wave(cid, 0) == sinusoid.wave(cid, 0)
    assert sinusoid.wave(cid, 0) != sinusoid.wave(cid, 1)
    assert sinusoid.wave(cid, 0) != sinusoid.wave("train/0000124", 0)


def test_task_is_regression():
    task = sinusoid.build_sinusoid(num_train_clients=3, num_eval_clients=2)
    assert task.problem == "regression" and task.metric == "mse"


@pytest.mark.parametrize(
    "options",
    [
        dict(shots=0),
        dict(query_points=0),
        dict(eval_query_points=0),
        dict(num_train_clients=0),
        dict(num_eval_clients=0),
    ],
)
def test_bad_counts_raise(options):
    with pytest.raises(ValueError):
        sinusoid.build_sinusoid(**options)
