"""Tests of sinusoid clients generated on the worker (`build_sinusoid(data_on_workers=True)`).

The driver sends codes and a zero-byte placeholder target; the worker draws the waves, points and
noise with stateless TensorFlow ops (`mfl_tff.data.sinusoid_on_workers`). The built clients are
checked against independent references: the sine wave in numpy for the wave the source reports,
a least-squares fit of that wave from the points, the uniform and Gaussian laws (tolerances from
the sample sizes), the default task's support sizes and masks, and the grid of `np.linspace`.
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_federated as tff

from mfl_tff.algorithms import cohorts
from mfl_tff.data import example_sources, packing, sinusoid
from tests import testing

SHOTS = 10
GRID = np.linspace(-5.0, 5.0, 100).astype(np.float32)
# `testing.digest(testing.packed_sample(task))` of the default tasks (data_on_workers=False),
# computed with the code from before data_on_workers existed: the default clients stay identical.
DEFAULT_DIGESTS = {
    "fixed": "418d0cfe482e5b7439d5dd67357710233586d780ea1baea589b1dcd9bebf30b6",
    "hetero": "6f8c6f7f87256de997c82543629ec42fecf97165f2a81600568993ab062efe95",
}
OPTIONS = {
    "fixed": dict(num_train_clients=50, num_eval_clients=5),
    "hetero": dict(shots=(2, 20), label_noise=(0.0, 1.0), num_train_clients=50, num_eval_clients=5),
}


@pytest.mark.parametrize("case", sorted(OPTIONS))
def test_the_default_tasks_are_unchanged(case):
    task = sinusoid.build_sinusoid(**OPTIONS[case])
    assert task.example_source is None
    assert testing.digest(testing.packed_sample(task)) == DEFAULT_DIGESTS[case]


_BUILDERS = {}


def _built(task, ids, which="train"):
    """The clients `ids`, packed on the driver and built (one call, in a graph), as numpy."""
    clients = task.train_clients(ids) if which == "train" else task.eval_clients(ids)
    stacked = packing.stack_clients(clients)
    key = (id(task.example_source), which)
    if key not in _BUILDERS:
        # One trace per task and population: any number of stacked clients.
        spec = tf.nest.map_structure(
            lambda a: tf.TensorSpec([None, *a.shape[1:]], a.dtype), stacked
        )
        source = task.example_source
        _BUILDERS[key] = tf.function(
            lambda data: example_sources.build_on_worker(data, source), input_signature=[spec]
        )
    return clients, tf.nest.map_structure(np.asarray, _BUILDERS[key](stacked))


def _real(part):
    """Real examples of stacked parts: (x [clients, n], y [clients, n]) for equal counts."""
    keep = part["mask"] > 0
    count = keep.reshape(len(keep), -1).sum(axis=1)
    assert len(set(count)) == 1
    rows = len(keep)
    return part["x"][keep].reshape(rows, -1), part["y"][keep].reshape(rows, -1)


@pytest.fixture(scope="module")
def noise_free():
    """10-shot clients built on the worker: 2,000 training clients and 50 held-out ones."""
    return sinusoid.build_sinusoid(
        num_train_clients=2000, num_eval_clients=50, data_on_workers=True
    )


def test_the_driver_sends_codes_and_zero_byte_targets(noise_free):
    default = sinusoid.build_sinusoid(num_train_clients=2000, num_eval_clients=50)
    ids = noise_free.train_data.client_ids[:3]
    for want, got in zip(default.train_clients(ids), noise_free.train_clients(ids)):
        for part in ("support", "query"):
            assert got[part]["x"].dtype == np.int32 and got[part]["x"].shape == (1, SHOTS)
            assert got[part]["y"].shape == (1, SHOTS, 0) and got[part]["y"].nbytes == 0
            np.testing.assert_array_equal(got[part]["mask"], want[part]["mask"])
        # 20 slots of (x, y, mask): 3 float32 by default, an int32 code and a mask on workers.
        assert sum(a.nbytes for a in tf.nest.flatten(want)) == 20 * 12 == 240
        assert sum(a.nbytes for a in tf.nest.flatten(got)) == 20 * 8 == 160
    # The built client has the default's types.
    _, built = _built(noise_free, ids[:1])
    for part in ("support", "query"):
        for key in ("x", "y", "mask"):
            want = default.train_clients(ids[:1])[0][part][key]
            assert built[part][key][0].shape == want.shape
            assert built[part][key].dtype == want.dtype


def test_every_target_is_the_reported_wave_and_recovers_it(noise_free):
    ids = noise_free.train_data.client_ids[:300]
    _, built = _built(noise_free, ids)
    waves = noise_free.example_source.waves(ids)
    assert np.all(waves[:, 2] == 0.0)  # no noise
    x = np.concatenate([_real(built[p])[0] for p in ("support", "query")], axis=1)
    y = np.concatenate([_real(built[p])[1] for p in ("support", "query")], axis=1)
    assert x.shape == (300, 2 * SHOTS)
    assert np.all((x >= -5.0) & (x <= 5.0)) and x.min() < -4.9 and x.max() > 4.9
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(y, waves[:, :1] * np.sin(x64 - waves[:, 1:2]), rtol=0, atol=1e-5)
    # A sin(x - p) = (A cos p) sin x - (A sin p) cos x: least squares on the points recovers A, p.
    for i in range(0, 300, 10):
        features = np.stack([np.sin(x64[i]), np.cos(x64[i])], axis=1)
        (a, b), *_ = np.linalg.lstsq(features, y[i].astype(np.float64), rcond=None)
        assert np.hypot(a, b) == pytest.approx(waves[i, 0], abs=1e-4)
        assert np.arctan2(-b, a) % (2 * np.pi) == pytest.approx(waves[i, 1], abs=1e-4)
    # Padding is zero (a 10-shot client has none; the hetero test below has).
    assert np.all(built["support"]["mask"] == 1.0)


def test_waves_and_inputs_follow_their_uniform_laws(noise_free):
    ids = noise_free.train_data.client_ids
    waves = noise_free.example_source.waves(ids)
    n = len(ids)
    for values, (lo, hi) in ((waves[:, 0], (0.1, 5.0)), (waves[:, 1], (0.0, np.pi))):
        assert np.all((values >= lo) & (values <= hi))
        # The mean of n uniform draws is within 4 standard errors of (lo + hi) / 2.
        standard_error = (hi - lo) / np.sqrt(12 * n)
        assert abs(values.mean() - (lo + hi) / 2) < 4 * standard_error
        assert abs(values.std() - (hi - lo) / np.sqrt(12)) < 0.1 * (hi - lo)
    # Every client draws its own wave.
    assert len(np.unique(waves[:, 0])) == n
    _, built = _built(noise_free, ids[:500])
    x = np.concatenate([_real(built[p])[0].ravel() for p in ("support", "query")])
    assert abs(x.mean()) < 4 * 10 / np.sqrt(12 * len(x))


def test_held_out_query_is_the_grid_and_noise_free():
    task = sinusoid.build_sinusoid(
        label_noise=0.5, num_train_clients=10, num_eval_clients=40, data_on_workers=True
    )
    ids = task.eval_data.client_ids
    packed, built = _built(task, ids, "eval")
    waves = task.example_source.waves(ids)
    assert np.all(waves[:, 2] == 0.5)
    qx, qy = _real(built["query"])
    sx, sy = _real(built["support"])
    assert qx.shape == (40, 100) and sx.shape == (40, SHOTS)
    for i in range(len(ids)):
        np.testing.assert_array_equal(np.sort(qx[i]), GRID)
    qx64, sx64 = qx.astype(np.float64), sx.astype(np.float64)
    np.testing.assert_allclose(qy, waves[:, :1] * np.sin(qx64 - waves[:, 1:2]), rtol=0, atol=1e-5)
    # The support is observed with the noise: residuals of std 0.5, within 4 standard errors
    # of a sample std of 400 draws (0.5 / sqrt(2 * 400)).
    residual = sy - waves[:, :1] * np.sin(sx64 - waves[:, 1:2])
    assert abs(residual.std() - 0.5) < 4 * 0.5 / np.sqrt(2 * residual.size)
    # The driver packs the held-out clients as the default task does.
    default = sinusoid.build_sinusoid(label_noise=0.5, num_train_clients=10, num_eval_clients=40)
    for want, got in zip(default.eval_clients(ids), packed):
        for part in ("support", "query"):
            np.testing.assert_array_equal(got[part]["mask"], want[part]["mask"])


def test_per_client_support_sizes_and_noise_levels():
    shots, noise = (2, 20), (0.0, 1.0)
    options = dict(shots=shots, label_noise=noise, query_points=10, num_eval_clients=5)
    task = sinusoid.build_sinusoid(num_train_clients=600, data_on_workers=True, **options)
    default = sinusoid.build_sinusoid(num_train_clients=600, **options)
    ids = task.train_data.client_ids
    packed, built = _built(task, ids)
    waves = task.example_source.waves(ids)
    standardized = []
    for i, (cid, want) in enumerate(zip(ids, default.train_clients(ids))):
        size = sinusoid.support_size(cid, shots, 0)
        # 40 slots (a support batch of 20, a query batch of 20): 12 bytes each, 8 on workers.
        assert sum(a.nbytes for a in tf.nest.flatten(want)) == 40 * 12 == 480
        assert sum(a.nbytes for a in tf.nest.flatten(packed[i])) == 40 * 8 == 320
        for part in ("support", "query"):
            np.testing.assert_array_equal(packed[i][part]["mask"], want[part]["mask"])
            assert built[part]["mask"][i].sum() == (size if part == "support" else 10)
            keep = built[part]["mask"][i] > 0
            x, y = built[part]["x"][i], built[part]["y"][i]
            assert np.all(x[~keep] == 0.0) and np.all(y[~keep] == 0.0)  # padding zeroed
            clean = waves[i, 0] * np.sin(x[keep].astype(np.float64) - waves[i, 1])
            standardized.append((y[keep] - clean) / waves[i, 2])
    sigmas = waves[:, 2]
    assert np.all((sigmas >= 0.0) & (sigmas <= 1.0))
    assert abs(sigmas.mean() - 0.5) < 4 / np.sqrt(12 * len(sigmas))
    # Residual / sigma is N(0, 1) whatever the client's sigma.
    z = np.concatenate(standardized).ravel()
    assert abs(z.mean()) < 4 / np.sqrt(z.size)
    assert abs(z.std() - 1.0) < 4 / np.sqrt(2 * z.size)


def test_an_example_is_a_function_of_its_code_only(noise_free):
    # Built alone, in a cohort with other clients, or eagerly: the same values.
    ids = noise_free.train_data.client_ids[5:8]
    clients, together = _built(noise_free, ids)
    source = noise_free.example_source
    alone = example_sources.build_on_worker(clients[1], source)
    for part in ("support", "query"):
        for key in ("x", "y"):
            np.testing.assert_array_equal(alone[part][key].numpy(), together[part][key][1])
    # Another seed gives other waves.
    other = sinusoid.build_sinusoid(
        num_train_clients=20, num_eval_clients=2, data_on_workers=True, seed=1
    )
    assert other.example_source.wave(ids[0]) != source.wave(ids[0])
    assert other.example_source.wave(ids[0]) == other.example_source.wave(ids[0])


def test_built_in_a_tff_computation_exactly_as_eagerly(noise_free, tff_local_execution):
    source = noise_free.example_source
    clients = noise_free.train_clients(noise_free.train_data.client_ids[:3])
    (cohort,) = cohorts.make_cohorts(clients, 3)
    data_type = cohorts.stacked_type(noise_free.client_data_type(), 3)

    @tff.tensorflow.computation(data_type)
    def build(data):
        return example_sources.build_on_worker(data, source)

    got = build(cohort)
    want = example_sources.build_on_worker(cohort, source)
    for part in ("support", "query"):
        for key in ("x", "y", "mask"):
            np.testing.assert_array_equal(np.asarray(got[part][key]), np.asarray(want[part][key]))


def test_codes_fit_int32_at_the_default_sizes_and_too_many_are_refused():
    task = sinusoid.build_sinusoid(data_on_workers=True)  # 100,000 training clients
    source = task.example_source
    last = task.train_data.client_ids[-1]
    codes = task.train_data.client_arrays(last)["x"]
    assert codes.dtype == np.int32 and codes.max() == 100_000 * 20 - 1
    held_out = task.eval_data.client_arrays(task.eval_data.client_ids[-1])["x"]
    assert held_out.max() == 100_000 * 20 + 500 * 110 - 1
    kind, number, slot = (v.numpy() for v in source.decode(held_out))
    assert np.all(kind == 1) and np.all(number == 499)
    np.testing.assert_array_equal(slot, np.arange(110))
    with pytest.raises(ValueError, match="exceed 2\\^31") as error:
        sinusoid.build_sinusoid(num_train_clients=200_000_000, data_on_workers=True)
    assert "\n" not in str(error.value)
