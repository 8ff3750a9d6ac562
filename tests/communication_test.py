"""Tests of `mfl_tff.algorithms.communication`: bytes per client per round, from the TFF types.

References are closed forms: a float32 is 4 bytes, so a model of P parameters broadcast to a
client is 4P bytes, its update with the mean's weight 4P + 4; TFF's 8-bit quantization sends, per
tensor of n elements, its (min, max) and the n 8-bit values bitpacked 28 bits to an int32 word
(`tensor_encoding`'s BitpackingEncodingStage), 8 + 4 * ceil(8n / 28) bytes.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import tensorflow_federated as tff

from mfl_tff.algorithms import builders, communication
from mfl_tff.data import digits

STEPS = 1  # Bytes do not depend on the steps; one keeps the second-order builds quick.


@pytest.fixture(scope="module")
def task():
    return digits.build_digits(num_train_clients=6, num_eval_clients=3, seed=0)


@pytest.fixture(scope="module")
def shapes(task):
    return [np.shape(w) for w in task.model_fn().initial_weights[0]]


def _params(shapes) -> int:
    return sum(math.prod(s) for s in shapes)


@pytest.fixture(scope="module")
def build(task):
    """Builds each (algorithm, options) once for the module: building is the slow part."""
    built = {}

    def build_fn(name, **options):
        key = (name, tuple(sorted(options.items(), key=lambda item: item[0])))
        if key not in built:
            built[key] = builders.build_algorithm(
                name, task, builders.AlgorithmOptions(inner_lr=0.1, inner_steps=STEPS, **options)
            )
        return built[key]

    return build_fn


def _measure(build, name, **options):
    process, spec = build(name, **options)
    return communication.measure(process, spec.stream_aggregators)


def test_type_bytes_counts_elements_times_item_size():
    struct = tff.types.to_type([(np.float32, (3, 4)), (np.int64, (5,)), np.int32])
    assert communication.type_bytes(struct) == 48 + 40 + 4
    federated = tff.FederatedType(tff.TensorType(np.float64, (2,)), tff.CLIENTS)
    assert communication.type_bytes(federated) == 16


def test_type_bytes_refuses_a_shape_the_type_does_not_fix():
    with pytest.raises(ValueError, match="not fixed"):
        communication.type_bytes(tff.TensorType(np.float32, (None, 3)))


def test_client_transfers_of_a_hand_written_round():
    @tff.tensorflow.computation(np.float32)
    def double(x):
        return x * 2.0

    @tff.federated_computation(
        tff.FederatedType(tff.TensorType(np.float32, (10,)), tff.SERVER),
        tff.FederatedType(tff.TensorType(np.float32, (3,)), tff.CLIENTS),
        tff.FederatedType(np.float32, tff.CLIENTS),
    )
    def round_fn(model, values, weights):
        tff.federated_broadcast(model)  # 40 bytes down
        doubled = tff.federated_map(double, weights)  # stays on the clients
        # 12 + 4 (value and weight) and 4 bytes up.
        return tff.federated_mean(values, weights), tff.federated_sum(doubled)

    got = communication.client_transfers(round_fn)
    assert got == communication.Transfers(download=40, upload=12 + 4 + 4)


def test_fedavg_sends_the_model_down_and_its_update_and_weight_up(build, shapes):
    cost = _measure(build, "fedavg", cohort_size=3)
    params = _params(shapes)
    assert cost.download_bytes == 4 * params
    assert cost.upload_bytes["model"] == 4 * params + 4
    assert "meta" not in cost.upload_bytes
    assert 0 < cost.upload_bytes["other"] < 100  # client metrics: a few scalars


def test_cohorts_do_not_change_the_bytes_per_client(build):
    # The cohort wrapper is the same client work for every algorithm.
    assert _measure(build, "fedavg", cohort_size=3) == _measure(build, "fedavg")


def test_mfl_broadcasts_alpha_twice_and_uploads_its_meta_gradient(build, shapes):
    cost = _measure(build, "mfl", alpha_granularity="per_layer", meta_model="rates")
    params, layers = _params(shapes), len(shapes)
    # Theta once; alpha before the local phase and the new alpha before the adaptive phase.
    assert cost.download_bytes == 4 * params + 2 * 4 * layers
    assert cost.upload_bytes["model"] == 4 * params + 4
    assert cost.upload_bytes["meta"] == 4 * layers + 4


def test_mfl_default_meta_model_sends_its_network_with_alpha(build, shapes):
    """mfl's default (conditioned) meta-parameters are alpha and a network from 1 + L features
    (log loss, a log gradient norm per tensor) through 16 hidden units to K x L multipliers."""
    cost = _measure(build, "mfl", alpha_granularity="per_layer")
    params, layers = _params(shapes), len(shapes)
    features, hidden, outputs = 1 + layers, 16, STEPS * layers
    meta = layers + features * hidden + hidden + hidden * outputs + outputs
    assert cost.download_bytes == 4 * params + 2 * 4 * meta
    assert cost.upload_bytes["model"] == 4 * params + 4
    assert cost.upload_bytes["meta"] == 4 * meta + 4


def test_quantized_updates_are_counted_after_encoding(build, shapes):
    quantized = tff.aggregators.MeanFactory(
        tff.aggregators.EncodedSumFactory.quantize_above_threshold(8, threshold=0)
    )
    cost = _measure(build, "fedavg", model_aggregator=quantized)
    encoded = sum(8 + 4 * math.ceil(8 * math.prod(s) / 28) for s in shapes)
    assert cost.upload_bytes["model"] == encoded + 4  # and the float32 weight
    assert cost.download_bytes == 4 * _params(shapes)  # the broadcast is not compressed


def test_round_metrics_and_report_scale_with_clients_and_rounds():
    cost = communication.Communication(100, {"model": 40, "meta": 8, "other": 2})
    metrics = cost.round_metrics(clients=5, round_num=3)
    assert metrics["upload_bytes_per_client"] == 50
    assert metrics["upload_meta_bytes_per_client"] == 8
    assert metrics["round_upload_bytes"] == 250
    assert metrics["cumulative_upload_bytes"] == 750
    assert metrics["cumulative_download_bytes"] == 1500
    report = cost.report(clients=5, rounds=4)
    assert report["bytes_per_client_per_round"]["upload"]["total"] == 50
    assert report["cumulative_bytes"] == {"download": 2000, "upload": 1000}


def test_streams_of_another_process_are_refused(build):
    process, _ = build("fedavg", cohort_size=3)
    _, mfl_spec = build("mfl", alpha_granularity="per_layer")
    with pytest.raises(ValueError, match="built with"):
        communication.measure(process, mfl_spec.stream_aggregators)
