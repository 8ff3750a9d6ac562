"""Tests of `mfl_tff.algorithms.aggregation`: DP and robust factories inside real algorithms, and
the compressed factory against TFF's own `compression_aggregator` and the exact weighted mean
(the secure one is in secure_aggregation_test.py).

Task: few-shot digits with every client holding the same number of examples, so the weighted
mean equals the unweighted one (DP aggregation weighs every client the same). Server steps are
SGD with rate 1 (and mfl's meta step on alpha too), so a round moves the model and alpha by
exactly minus the aggregate, and each property below is a norm or a standard deviation of that
move, computed here in numpy.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_federated as tff

from mfl_tff.algorithms import aggregation, builders
from tests import testing

NUM_CLIENTS = testing.AGGREGATOR_TEST_CLIENTS
CLIP = 0.05

pytestmark = pytest.mark.usefixtures("tff_local_execution")


@pytest.fixture(scope="module")
def clients(fewshot_clients):
    counts = {
        float(np.sum(c["support"]["mask"]) + np.sum(c["query"]["mask"])) for c in fewshot_clients
    }
    assert len(counts) == 1, "the clients must hold equal example counts"
    return fewshot_clients


def _huge(client, scale=1e3):
    """A client whose update is finite but far larger than the others'."""
    client = testing.copy_client(client)
    for part in ("support", "query"):
        client[part]["x"] *= scale
    return client


def _empty(client):
    return tf.nest.map_structure(np.zeros_like, client)


def _process(task, algorithm, kind, **settings):
    return testing.with_aggregators(task, algorithm, kind, NUM_CLIENTS, **settings)


def _round(process, clients):
    """(theta move, meta-parameters' move or None, output) of one round from the initial state."""
    state = process.initialize()
    output = process.next(state, clients)
    theta, alpha = testing.model_and_meta(process, state)
    new_theta, new_alpha = testing.model_and_meta(process, output.state)
    return new_theta - theta, None if alpha is None else new_alpha - alpha, output


# ---------------------------------------------------------------------------------------------
# Factories by name.


def test_kinds_give_the_expected_factories():
    mean = aggregation.build_aggregators("mean", learns_alpha=True)
    assert isinstance(mean.model, tff.aggregators.MeanFactory) and not mean.per_client
    assert aggregation.build_aggregators("mean", learns_alpha=False).meta is None
    robust = aggregation.build_aggregators("robust", learns_alpha=True)
    assert robust.per_client
    assert isinstance(robust.model, tff.aggregators.WeightedAggregationFactory)
    dp = aggregation.build_aggregators(
        "dp", learns_alpha=True, noise_multiplier=1.0, clip_norm="adaptive", clients_per_round=10
    )
    assert dp.per_client
    assert isinstance(dp.model, tff.aggregators.DifferentiallyPrivateFactory)
    assert isinstance(dp.meta, tff.aggregators.DifferentiallyPrivateFactory)
    # Two noised streams a round, by default each at sqrt(2) times the round's multiplier.
    assert dp.model_noise_multiplier == pytest.approx(math.sqrt(2))
    assert dp.meta_noise_multiplier == pytest.approx(math.sqrt(2))
    uneven = aggregation.build_aggregators(
        "dp",
        learns_alpha=True,
        noise_multiplier=1.0,
        clip_norm=0.5,
        clients_per_round=10,
        meta_noise_share=0.2,
    )
    z_model, z_meta = uneven.model_noise_multiplier, uneven.meta_noise_multiplier
    assert z_meta == pytest.approx(math.sqrt(5)) and z_model == pytest.approx(math.sqrt(1.25))
    # Together they are one Gaussian mechanism at the round's multiplier.
    assert (z_model**-2 + z_meta**-2) ** -0.5 == pytest.approx(1.0)
    one = aggregation.build_aggregators(
        "dp", learns_alpha=False, noise_multiplier=1.0, clip_norm=0.5, clients_per_round=10
    )
    assert one.meta is None and one.model_noise_multiplier == pytest.approx(1.0)
    compressed = aggregation.build_aggregators("compressed", learns_alpha=True)
    assert compressed.per_client and not compressed.uses_secure_sums
    assert (compressed.quantization_bits, compressed.quantization_threshold) == (8, 4)
    assert isinstance(compressed.meta, tff.aggregators.WeightedAggregationFactory)
    secure = aggregation.build_aggregators("secure", learns_alpha=False)
    assert secure.per_client and secure.uses_secure_sums and secure.meta is None
    assert set(aggregation.PER_CLIENT_KINDS) == set(aggregation.KINDS) - {"mean"}


@pytest.mark.parametrize(
    "kind, settings, message",
    [
        ("median", {}, "mean, dp, robust, compressed, secure"),
        ("dp", dict(clip_norm=1.0, clients_per_round=5), "needs noise_multiplier"),
        ("dp", dict(noise_multiplier=1.0, clients_per_round=5), "needs clip_norm"),
        ("dp", dict(noise_multiplier=-1.0, clip_norm=1.0, clients_per_round=5), ">= 0"),
        ("dp", dict(noise_multiplier=1.0, clip_norm=0.0, clients_per_round=5), "clip_norm"),
        ("dp", dict(noise_multiplier=1.0, clip_norm="auto", clients_per_round=5), "adaptive"),
        ("dp", dict(noise_multiplier=1.0, clip_norm=1.0, clients_per_round=0), "clients_per"),
        ("robust", dict(noise_multiplier=1.0), "only to the 'dp' aggregator"),
        ("mean", dict(clip_norm=1.0), "only to the 'dp' aggregator"),
        ("compressed", dict(noise_multiplier=1.0), "only to the 'dp' aggregator"),
        ("secure", dict(quantization_bits=8), "only to the 'compressed' aggregator"),
        ("dp", dict(quantization_threshold=0), "only to the 'compressed' aggregator"),
        ("compressed", dict(quantization_bits=0), "an int in 1..16"),
        ("compressed", dict(quantization_bits=17), "an int in 1..16"),
        ("compressed", dict(quantization_bits=4.0), "an int in 1..16"),
        ("compressed", dict(quantization_threshold=-1), "quantization_threshold"),
        (
            "dp",
            dict(noise_multiplier=1.0, clip_norm=1.0, clients_per_round=5, meta_noise_share=1.0),
            "meta_noise_share",
        ),
    ],
)
def test_bad_settings_are_value_errors(kind, settings, message):
    with pytest.raises(ValueError, match=message):
        aggregation.build_aggregators(kind, learns_alpha=True, **settings)


def test_parse_clip_norm():
    assert aggregation.parse_clip_norm("adaptive") == "adaptive"
    assert aggregation.parse_clip_norm(" Adaptive ") == "adaptive"
    assert aggregation.parse_clip_norm("0.25") == 0.25
    assert aggregation.parse_clip_norm(2) == 2.0
    for bad in ("-1", "nan", "inf", "", True, None):
        with pytest.raises(ValueError, match="clip_norm"):
            aggregation.parse_clip_norm(bad)


def test_cohorts_are_refused_with_per_client_aggregators(fewshot_task):
    dp = aggregation.build_aggregators(
        "dp", learns_alpha=False, noise_multiplier=1.0, clip_norm=1.0, clients_per_round=4
    )
    options = builders.AlgorithmOptions(model_aggregator=dp.model, cohort_size=4)
    with pytest.raises(ValueError, match="cohort_size=None"):
        builders.build_algorithm("fedavg", fewshot_task, options)
    for kind in ("robust", "compressed", "secure"):
        per_client = aggregation.build_aggregators(kind, learns_alpha=True)
        options = builders.AlgorithmOptions(meta_aggregator=per_client.meta, cohort_size=4)
        with pytest.raises(ValueError, match="meta_aggregator"):
            builders.build_algorithm("mfl", fewshot_task, options)


# ---------------------------------------------------------------------------------------------
# DP inside the algorithms.


@pytest.mark.parametrize("algorithm", ["fedavg", "mfl"])
def test_dp_without_noise_and_with_a_large_clip_equals_the_mean(fewshot_task, clients, algorithm):
    mean_theta, mean_alpha, _ = _round(_process(fewshot_task, algorithm, "mean"), clients)
    dp = _process(fewshot_task, algorithm, "dp", noise_multiplier=0.0, clip_norm=1e6)
    dp_theta, dp_alpha, output = _round(dp, clients)
    assert np.max(np.abs(mean_theta)) > 1e-3  # the round did move the model
    np.testing.assert_allclose(dp_theta, mean_theta, rtol=0, atol=1e-6)
    if algorithm == "mfl":
        assert np.max(np.abs(mean_alpha)) > 1e-5
        np.testing.assert_allclose(dp_alpha, mean_alpha, rtol=0, atol=1e-6)
    rejected = [v for k, v in _leaves(output.metrics) if k.endswith("num_clients_rejected")]
    assert rejected and all(r == 0 for r in rejected)


def _leaves(metrics, prefix=""):
    for key, value in metrics.items():
        if hasattr(value, "items"):
            yield from _leaves(value, f"{prefix}{key}/")
        else:
            yield f"{prefix}{key}", value


@pytest.mark.parametrize("algorithm", ["fedavg", "mfl"])
def test_clipping_bounds_what_one_huge_client_can_move(fewshot_task, clients, algorithm):
    """A client sending a huge update moves the model by at most clip / clients_per_round, while
    the same client under the mean moves it by orders of magnitude more."""
    # Large enough to need clipping, small enough that mfl's second-order meta-gradients stay
    # finite (an update whose norm overflows is rejected outright: tests/faults_test.py).
    with_huge = [_huge(clients[0], scale=1e3 if algorithm == "fedavg" else 10.0)] + clients[1:]
    without = [_empty(clients[0])] + clients[1:]
    dp = _process(fewshot_task, algorithm, "dp", noise_multiplier=0.0, clip_norm=CLIP)
    theta_huge, alpha_huge, _ = _round(dp, with_huge)
    theta_without, alpha_without, _ = _round(dp, without)
    bound = CLIP / NUM_CLIENTS
    MEASURED[f"{algorithm} theta move, whole round"] = (float(np.linalg.norm(theta_huge)), CLIP)
    # Every client is clipped to CLIP, so a whole round moves theta by at most CLIP.
    assert np.linalg.norm(theta_huge) <= CLIP * (1 + 1e-5)
    if algorithm == "fedavg":
        share = np.linalg.norm(theta_huge - theta_without)
    else:
        # mfl's second phase already uses the new alpha, so theta's other clients differ too:
        # the huge client's share is read on the meta-parameters (alpha and the meta-model's
        # network), aggregated and clipped as one stream in the first phase.
        share = np.linalg.norm(alpha_huge - alpha_without)
    MEASURED[f"{algorithm} huge client's share"] = (float(share), bound)
    # Clipped, not zeroed: its share is the whole clip over the expected clients.
    assert bound * 0.99 <= share <= bound * (1 + 1e-4)
    mean_huge, _, _ = _round(_process(fewshot_task, algorithm, "mean"), with_huge)
    mean_without, _, _ = _round(_process(fewshot_task, algorithm, "mean"), without)
    if algorithm == "fedavg":
        unclipped = np.linalg.norm(mean_huge - mean_without)
        MEASURED["fedavg huge client's share under the mean"] = (float(unclipped), bound)
        assert unclipped > 100 * bound


@pytest.mark.parametrize(
    "algorithm, clip_norm",
    [("fedavg", CLIP), ("mfl", CLIP), ("fedavg", "adaptive")],
)
def test_dp_noise_has_the_stated_standard_deviation(fewshot_task, clients, algorithm, clip_norm):
    """Empty clients send zero updates, so the round's move is the noise alone: per coordinate,
    standard deviation noise * clip / clients_per_round, with the noise of each stream."""
    z = 1.0
    process = _process(fewshot_task, algorithm, "dp", noise_multiplier=z, clip_norm=clip_norm)
    theta, _, output = _round(process, [_empty(c) for c in clients])
    streams = 2 if algorithm == "mfl" else 1
    release = z * math.sqrt(streams)
    if clip_norm == "adaptive":
        # TFF's initial adaptive clip is 0.1. Its default clipped-count noise (0.05 per expected
        # client = 0.2) is too small for this multiplier, so the module raises it to the release
        # multiplier, and the value noise is then release / sqrt(1 - 1/4).
        clip, value_noise = 0.1, release / math.sqrt(0.75)
    else:
        clip, value_noise = clip_norm, release
    expected = value_noise * clip / NUM_CLIENTS
    MEASURED[f"{algorithm} {clip_norm} noise std"] = (float(np.std(theta)), expected)
    assert np.std(theta) == pytest.approx(expected, rel=0.05)
    assert abs(np.mean(theta)) < 0.05 * expected
    rejected = [v for k, v in _leaves(output.metrics) if k.endswith("num_clients_rejected")]
    assert rejected and all(r == 0 for r in rejected)


# ---------------------------------------------------------------------------------------------
# Compression, on the aggregation process alone: a value of two tensors, one weight per client.

WEIGHTS = (3.0, 1.0, 6.0)


def _compression_rounds(factory, shapes, rounds, scales=(0.3, 0.1, 0.2), seed=0):
    """The aggregates of `rounds` rounds of `factory`'s process on the same random client values
    (each client's tensors scaled to L2 norm `scales[i]`), and those values."""
    value_type = tff.types.to_type([tff.TensorType(np.float32, shape) for shape in shapes])
    process = factory.create(value_type, tff.TensorType(np.float32))
    rng = np.random.default_rng(seed)
    results, all_values = [], []
    state = process.initialize()
    for _ in range(rounds):
        values = []
        for scale in scales:
            tensors = [rng.standard_normal(shape).astype(np.float32) for shape in shapes]
            norm = math.sqrt(sum(float(np.sum(t.astype(np.float64) ** 2)) for t in tensors))
            values.append([t * np.float32(scale / norm) for t in tensors])
        output = process.next(state, values, list(WEIGHTS))
        state = output.state
        results.append([np.asarray(t) for t in output.result])
        all_values.append(values)
    return results, all_values


def test_compression_with_tff_settings_equals_tffs_compression_aggregator(monkeypatch):
    """Our composition at 8 bits and threshold 20,000 against TFF's own compression_aggregator
    (the independent reference), over 3 rounds of the same client values, with deterministic
    rounding (TFF's `stochastic=False` encoder option) so that the two can be equal: one tensor
    above the threshold (quantized), one below. Client norms from 0.5 to 30 make the adaptive
    clipping (initial clip 1) and zeroing (initial threshold 21) act and adapt."""
    shapes = [(20001,), (3,)]
    scales = (0.5, 3.0, 30.0)
    ours, _ = _compression_rounds(
        aggregation._composed_compression(8, 20000, stochastic=False), shapes, 3, scales
    )
    reference, _ = _compression_rounds(
        tff.learning.compression_aggregator(stochastic=False), shapes, 3, scales
    )
    # The same zeroing and clipping without quantization.
    unquantized, _ = _compression_rounds(
        tff.learning.robust_aggregator(zeroing=True, clipping=True, weighted=True),
        shapes,
        3,
        scales,
    )
    for got, want, exact in zip(ours, reference, unquantized):
        for g, w in zip(got, want):
            np.testing.assert_array_equal(g, w)
        # Only the tensor above the threshold was quantized.
        assert np.max(np.abs(got[0] - exact[0])) > 1e-6
        np.testing.assert_allclose(got[1], exact[1], rtol=1e-6, atol=1e-8)
    # TFF's settings give TFF's own factory.
    monkeypatch.setattr(tff.learning, "compression_aggregator", lambda **_: "tff's own")
    assert aggregation.compression_factory(8, 20000) == "tff's own"
    assert aggregation.compression_factory(8, 0) != "tff's own"


def _weighted_mean(values, index):
    stacked = np.stack([np.asarray(v[index], np.float64) for v in values])
    return np.tensordot(np.asarray(WEIGHTS), stacked, axes=1) / sum(WEIGHTS)


def _quantization_bound(values, index, bits):
    """Closed-form bound on |quantized weighted mean - exact weighted mean| per coordinate: each
    client quantizes its weighted tensor w*x between its own min and max, one step
    (max - min) / (2**bits - 1), and the mean divides the sum of those errors by the weights."""
    steps = [
        (
            np.max(w * np.asarray(v[index], np.float64))
            - np.min(w * np.asarray(v[index], np.float64))
        )
        / (2**bits - 1)
        for w, v in zip(WEIGHTS, values)
    ]
    return sum(steps) / sum(WEIGHTS)


@pytest.mark.parametrize("bits", [8, 3])
def test_threshold_0_quantizes_every_tensor_within_one_step(bits):
    """The default threshold 0 quantizes even a 5-element tensor; each tensor's result is within
    the closed-form quantization error of the exact weighted mean (client norms stay under the
    initial clip and zeroing thresholds, so neither acts), and not exact."""
    shapes = [(40, 10), (5,)]
    (result,), (values,) = _compression_rounds(
        aggregation.compression_factory(quantization_bits=bits), shapes, 1
    )
    for index in range(len(shapes)):
        error = np.max(np.abs(result[index] - _weighted_mean(values, index)))
        bound = _quantization_bound(values, index, bits)
        MEASURED[f"{bits}-bit quantization error, tensor {shapes[index]}"] = (error, bound)
        assert 0 < error <= bound * (1 + 1e-5) + 1e-7


def test_a_tensor_at_or_below_the_threshold_is_summed_exactly():
    shapes = [(40, 10), (5,)]
    (result,), (values,) = _compression_rounds(
        aggregation.compression_factory(quantization_bits=8, quantization_threshold=5), shapes, 1
    )
    np.testing.assert_allclose(result[1], _weighted_mean(values, 1), rtol=1e-6, atol=1e-8)
    error = np.max(np.abs(result[0] - _weighted_mean(values, 0)))
    assert 0 < error <= _quantization_bound(values, 0, 8) * (1 + 1e-5) + 1e-7


MEASURED: dict = {}


def test_report_measured_values():
    """Prints what the tests above measured (pytest -s), for the record."""
    for name, (got, reference) in MEASURED.items():
        print(f"{name}: {got:.6g} (reference {reference:.6g})")
