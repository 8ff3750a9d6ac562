"""Tests of `mfl_tff.data.sinusoid`: few-shot sine-wave regression clients."""

from __future__ import annotations

import numpy as np
import pytest

from mfl_tff.data import packing, sinusoid

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


# ---- Heterogeneous clients: a support size and a noise level of their own ----


def _old_client(cid, shots, query_points, evenly_spaced, seed=0):
    """A client exactly as generated before shot ranges and label noise (the x stream, then the
    closed form A sin(x - phase))."""
    amplitude, phase = sinusoid.wave(cid, seed)
    rng = np.random.default_rng(packing.client_seed(seed, f"sinusoid/x/{cid}"))
    support_x = rng.uniform(-5.0, 5.0, size=shots)
    if evenly_spaced:
        query_x = np.linspace(-5.0, 5.0, num=query_points)
    else:
        query_x = rng.uniform(-5.0, 5.0, size=query_points)
    x = np.concatenate([support_x, query_x]).astype(np.float32)[:, None]
    return x, (amplitude * np.sin(x - phase)).astype(np.float32)


@pytest.mark.parametrize("options", [{}, {"label_noise": 0.0}, {"label_noise": (0.0, 0.0)}])
def test_default_clients_are_bit_identical_to_before(options):
    task = sinusoid.build_sinusoid(num_train_clients=50, num_eval_clients=10, **options)
    for data, query, grid in ((task.train_data, 10, False), (task.eval_data, 100, True)):
        for cid in data.client_ids[:10]:
            arrays = data.client_arrays(cid)
            x, y = _old_client(cid, SHOTS, query, grid)
            np.testing.assert_array_equal(arrays["x"], x)
            np.testing.assert_array_equal(arrays["y"], y)
    assert task.train_split == packing.SplitSpec(support_size=SHOTS, shuffle=False)
    assert task.train_pack == packing.PackSpec(SHOTS, 1, 1)
    assert task.eval_pack == packing.PackSpec(SHOTS, 1, 10)
    assert task.settings == sinusoid.SETTINGS


def test_a_shot_range_gives_each_client_its_own_reproducible_support_size():
    task = sinusoid.build_sinusoid(
        shots=(2, 20), query_points=7, num_train_clients=200, num_eval_clients=20
    )
    assert task.settings.shots == (2, 20)
    sizes = []
    for data, query in ((task.train_data, 7), (task.eval_data, 100)):
        for cid in data.client_ids[:20]:
            size = sinusoid.support_size(cid, (2, 20), seed=0)
            assert 2 <= size <= 20 and size == sinusoid.support_size(cid, (2, 20), seed=0)
            sizes.append(size)
            arrays = data.client_arrays(cid)
            assert len(arrays["x"]) == size + query
            (packed,) = (task.train_clients if query == 7 else task.eval_clients)([cid])
            support = packed["support"]
            # One support batch of hi points; the mask counts the client's own size.
            assert support["mask"].shape == (1, 20) and support["mask"].sum() == size
            assert packed["query"]["mask"].sum() == query
            np.testing.assert_array_equal(
                np.sort(support["x"][support["mask"] > 0][:, 0]), np.sort(arrays["x"][:size, 0])
            )
            # Padding is zero and masked out.
            assert np.all(support["x"][support["mask"] == 0] == 0.0)
    assert len(set(sizes)) > 5
    rebuilt = sinusoid.build_sinusoid(shots=(2, 20), query_points=7, num_train_clients=200)
    cid = task.train_data.client_ids[3]
    np.testing.assert_array_equal(
        task.train_data.client_arrays(cid)["x"], rebuilt.train_data.client_arrays(cid)["x"]
    )
    # The support size is a function of the seed as well.
    ids = task.train_data.client_ids[:20]
    assert [sinusoid.support_size(c, (2, 20), 0) for c in ids] != [
        sinusoid.support_size(c, (2, 20), 1) for c in ids
    ]


def test_a_range_of_one_count_is_that_count():
    one = sinusoid.build_sinusoid(shots=(5, 5), num_train_clients=5, num_eval_clients=2)
    five = sinusoid.build_sinusoid(shots=5, num_train_clients=5, num_eval_clients=2)
    assert one.settings == five.settings and one.train_pack == five.train_pack
    cid = one.train_data.client_ids[0]
    np.testing.assert_array_equal(
        one.train_clients([cid])[0]["support"]["x"], five.train_clients([cid])[0]["support"]["x"]
    )


def test_label_noise_perturbs_observed_targets_only():
    sigma, query = 0.3, 10
    task = sinusoid.build_sinusoid(
        label_noise=sigma, query_points=query, num_train_clients=400, num_eval_clients=100
    )
    residuals = {"support": [], "train query": []}
    for cid in task.train_data.client_ids:
        arrays = task.train_data.client_arrays(cid)
        amplitude, phase = sinusoid.wave(cid, 0)
        clean = amplitude * np.sin(arrays["x"].astype(np.float64) - phase)
        # The inputs are those of the noise-free client.
        np.testing.assert_array_equal(arrays["x"], _old_client(cid, SHOTS, query, False)[0])
        residual = (arrays["y"] - clean)[:, 0]
        residuals["support"].append(residual[:SHOTS])
        residuals["train query"].append(residual[SHOTS:])
    for name, values in residuals.items():
        values = np.concatenate(values)
        # 4,000 draws: the sample std of N(0, 0.3^2) is within 0.3 +- 0.012 (about 3.5 sigma).
        assert abs(values.std() - sigma) < 0.012, name
        assert abs(values.mean()) < 0.02, name
    for cid in task.eval_data.client_ids:
        arrays = task.eval_data.client_arrays(cid)
        x, y = _old_client(cid, SHOTS, 100, True)
        np.testing.assert_array_equal(arrays["x"], x)
        # Held-out query targets are the true wave, exactly; their support is observed (noisy).
        np.testing.assert_array_equal(arrays["y"][SHOTS:], y[SHOTS:])
        assert not np.array_equal(arrays["y"][:SHOTS], y[:SHOTS])
    assert sinusoid.noise_sigma(task.train_data.client_ids[0], sigma, 0) == sigma


def test_a_noise_range_gives_each_client_its_own_reproducible_sigma():
    task = sinusoid.build_sinusoid(
        shots=(2, 20), label_noise=(0.0, 1.0), num_train_clients=300, num_eval_clients=5
    )
    ids = task.train_data.client_ids
    sigmas = np.array([sinusoid.noise_sigma(cid, (0.0, 1.0), 0) for cid in ids])
    assert np.all((sigmas >= 0.0) & (sigmas <= 1.0))
    assert sigmas.min() < 0.05 and sigmas.max() > 0.95
    again = sinusoid.build_sinusoid(shots=(2, 20), label_noise=(0.0, 1.0), num_train_clients=300)
    for cid in ids[:5]:
        np.testing.assert_array_equal(
            task.train_data.client_arrays(cid)["y"], again.train_data.client_arrays(cid)["y"]
        )
    # Each client's residuals follow its own sigma: the noisiest tenth is much noisier.
    spread = []
    for cid in ids:
        arrays = task.train_data.client_arrays(cid)
        amplitude, phase = sinusoid.wave(cid, 0)
        residual = arrays["y"][:, 0] - amplitude * np.sin(
            arrays["x"][:, 0].astype(np.float64) - phase
        )
        spread.append(np.sqrt(np.mean(residual**2)))
    order = np.argsort(sigmas)
    assert np.mean(np.array(spread)[order[-30:]]) > 5 * np.mean(np.array(spread)[order[:30]])


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(shots=(0, 5)), "lo >= 1"),
        (dict(shots=(6, 5)), "lo > hi"),
        (dict(shots=(1, 2, 3)), "range"),
        (dict(shots=2.5), "integer"),
        (dict(label_noise=-0.1), ">= 0"),
        (dict(label_noise=(0.5, 0.1)), "lo > hi"),
        (dict(label_noise=(-1.0, 0.1)), "lo >= 0"),
        (dict(label_noise=float("nan")), ">= 0"),
    ],
)
def test_bad_ranges_and_noise_are_one_line_errors(options, message):
    with pytest.raises(ValueError, match=message) as error:
        sinusoid.build_sinusoid(num_train_clients=3, num_eval_clients=2, **options)
    assert "\n" not in str(error.value)
