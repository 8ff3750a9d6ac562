"""Tests of `mfl_tff.algorithms.composer`: `Algorithm` records composed into LearningProcesses.

The records here are written in this file, with client functions whose updates are known in
closed form: client i, with n_i real support examples, sends the model update `n_i * ones` (and,
for the meta stream, a meta-gradient in terms of n_i and the broadcast meta-parameters) with weight
n_i. A round's result then follows from the aggregator's and the optimizers' definitions alone:
with the weighted mean and server SGD(lr), theta <- theta - lr * sum(n_i^2) / sum(n_i).

Two records: one model-stream phase (FedAvg's shape), and two phases, meta then model, where the
second receives the meta-parameters the first stepped (MFL's shape). A phase feeding both streams
at once (Meta-SGD's) is checked against exact gradients in meta_sgd_test. Parts TFF provides
(broadcast, `build_apply_optimizer_finalizer`, aggregators) are checked to be TFF's own by comparing
states with TFF's processes built directly.
"""

from __future__ import annotations

import collections

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_federated as tff

from mfl_tff.algorithms import algorithm, client_work, composer
from mfl_tff.models import functional, keras_models
from tests import testing

SIZES = (3, 5, 1)  # support examples of the three clients
STATE_FIELDS = ("global_model_weights", "distributor", "client_work", "aggregator", "finalizer")
SERVER_LR = 0.5
META_LR = 0.1
MIN_META = 0.01
CLIP = 0.5
ALPHA0 = 0.1

pytestmark = pytest.mark.usefixtures("tff_local_execution")


def model_fn():
    return functional.functional_model(
        lambda: keras_models.softmax_regression(3, 2), x_shape=(3,), problem="classification"
    )


@pytest.fixture(scope="module")
def model():
    return model_fn()


@pytest.fixture(scope="module")
def initial(model):
    return [np.asarray(w, np.float64) for w in model.initial_weights[0]]


def packed_client(num_support, poisoned=False):
    def part(n):
        mask = np.zeros((2, 4), np.float32)
        mask.reshape(-1)[:n] = 1.0
        return collections.OrderedDict(
            x=np.ones((2, 4, 3), np.float32), y=np.zeros((2, 4), np.int32), mask=mask
        )

    client = collections.OrderedDict(support=part(num_support), query=part(2))
    if poisoned:
        client["support"]["x"][0, 0, 0] = np.nan
    return client


@pytest.fixture(scope="module")
def clients():
    return [packed_client(n) for n in SIZES]


@pytest.fixture(scope="module")
def data_type(clients):
    return tff.types.tensorflow_to_type(
        tf.nest.map_structure(lambda a: tf.TensorSpec(a.shape, tf.as_dtype(a.dtype)), clients[0])
    )


def size_of(data):
    """n_i, the client's weight."""
    return tf.reduce_sum(data["support"]["mask"])


def scale_of(data):
    """n_i for the updates. The support x (all ones) adds exactly 0, or NaN for a poisoned
    client: its update is then non-finite, which `client_work.client_output` rejects."""
    return size_of(data) + (tf.reduce_mean(data["support"]["x"]) - 1.0)


def model_update_fn(weights, data):
    n, scale = size_of(data), scale_of(data)
    update = tuple(tf.ones_like(w) * scale for w in weights.trainable)
    return client_work.client_output(update, n, collections.OrderedDict(n=n))


def per_layer_alpha(model, options):
    return tuple(np.float32(options.inner_lr) for _ in model.initial_weights[0])


def record(name, phases, **kwargs):
    return algorithm.Algorithm(name=name, paper="", phases=lambda model, options: phases, **kwargs)


MODEL_ONLY = record(
    "model_only",
    (algorithm.ClientPhase("", model_update_fn),),
    default_server_optimizer=("sgd", 1.0),
)


def meta_phase_fn(weights, alpha, data):
    n, scale = size_of(data), scale_of(data)
    return client_work.client_output(
        tuple(-scale * tf.ones_like(a) for a in alpha), n, collections.OrderedDict(n=n)
    )


def adaptive_phase_fn(weights, alpha, data):
    """Model update n * alpha_l per layer: shows which alpha the phase received."""
    n, scale = size_of(data), scale_of(data)
    update = tuple(tf.ones_like(w) * scale * a for w, a in zip(weights.trainable, alpha))
    return client_work.client_output(update, n, collections.OrderedDict(n=n))


TWO_PHASE = record(
    "two_phase",
    (
        algorithm.ClientPhase("meta", meta_phase_fn, streams=("meta",), takes_meta=True),
        algorithm.ClientPhase("adaptive", adaptive_phase_fn, takes_meta=True),
    ),
    initial_meta=per_layer_alpha,
    min_meta=lambda options: options.min_alpha,
)


def sgd(learning_rate, momentum=None):
    return tff.learning.optimizers.build_sgdm(learning_rate=learning_rate, momentum=momentum)


@pytest.fixture(scope="module")
def model_process(data_type):
    return composer.compose(MODEL_ONLY, model_fn, data_type)


@pytest.fixture(scope="module")
def two_phase_process(data_type):
    """Unweighted mean on the model stream, clipped weighted mean on the meta stream."""
    options = algorithm.AlgorithmOptions(
        inner_lr=ALPHA0,
        server_optimizer=sgd(SERVER_LR),
        meta_optimizer=sgd(META_LR),
        min_alpha=MIN_META,
        model_aggregator=tff.aggregators.UnweightedMeanFactory(),
        meta_aggregator=tff.aggregators.clipping_factory(CLIP, tff.aggregators.MeanFactory()),
    )
    return composer.compose(TWO_PHASE, model_fn, data_type, options)


@pytest.fixture(scope="module")
def two_phase_round(two_phase_process, clients):
    return two_phase_process.next(two_phase_process.initialize(), clients)


def weighted_mean_of_sizes(sizes=SIZES):
    sizes = np.asarray(sizes, np.float64)
    return np.sum(sizes * sizes) / np.sum(sizes)


def assert_weights(actual, expected):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        np.testing.assert_allclose(a, e, rtol=1e-6, atol=1e-6)


def weights_type(model):
    return client_work.model_weights_type(model)


# ---------------------------------------------------------------------------------------------
# One model stream: exactly TFF's state layout and parts.


def test_model_only_state_is_tffs_learning_algorithm_state(model_process, model, initial):
    state = model_process.initialize()
    assert isinstance(state, tff.learning.templates.LearningAlgorithmState)
    assert tuple(state._fields) == STATE_FIELDS
    assert_weights(model_process.get_model_weights(state).trainable, initial)
    # The aggregator and finalizer states are those of TFF's own processes.
    optimizer = tff.learning.optimizers.build_sgdm(learning_rate=1.0)
    tff_finalizer = tff.learning.templates.build_apply_optimizer_finalizer(
        optimizer, weights_type(model)
    )
    tff_mean = tff.aggregators.MeanFactory().create(
        weights_type(model).trainable, tff.TensorType(np.float32)
    )
    tf.nest.assert_same_structure(state.finalizer, tff_finalizer.initialize())
    assert testing.max_abs_diff(state.finalizer, tff_finalizer.initialize()) == 0.0
    assert testing.max_abs_diff(state.aggregator, tff_mean.initialize()) == 0.0
    assert state.distributor == ()  # TFF's broadcast process holds no state


def test_model_only_round_is_broadcast_work_weighted_mean_and_server_step(
    model_process, clients, initial
):
    output = model_process.next(model_process.initialize(), clients)
    step = weighted_mean_of_sizes()
    assert_weights(
        model_process.get_model_weights(output.state).trainable, [w - step for w in initial]
    )
    metrics = output.metrics
    assert list(metrics) == ["distributor", "client_work", "aggregator", "finalizer"]
    work = metrics["client_work"]
    assert work["n"] == pytest.approx(step)  # metrics are weighted by the update weights
    assert work["num_examples"] == sum(SIZES)
    assert work["num_clients"] == len(SIZES) and work["num_clients_rejected"] == 0
    assert metrics["finalizer"]["update_non_finite"] == 0


def test_set_model_weights_is_what_the_next_round_starts_from(model_process, clients, model):
    state = model_process.initialize()
    start = tff.learning.models.ModelWeights(
        trainable=tuple(np.full(np.shape(w), 0.25, np.float32) for w in model.initial_weights[0]),
        non_trainable=(),
    )
    state = model_process.set_model_weights(state, start)
    assert_weights(model_process.get_model_weights(state).trainable, start.trainable)
    output = model_process.next(state, clients[:2])
    step = weighted_mean_of_sizes(SIZES[:2])
    assert_weights(
        model_process.get_model_weights(output.state).trainable,
        [w - step for w in start.trainable],
    )


def test_server_learning_rate_is_a_hyperparameter_of_the_state(model_process, clients, initial):
    state = model_process.initialize()
    hparams = model_process.get_hparams(state)
    assert list(hparams) == ["finalizer"]
    assert hparams["finalizer"]["learning_rate"] == pytest.approx(1.0)
    hparams["finalizer"]["learning_rate"] = np.float32(0.125)
    state = model_process.set_hparams(state, hparams)
    assert model_process.get_hparams(state)["finalizer"]["learning_rate"] == pytest.approx(0.125)
    output = model_process.next(state, clients)
    step = 0.125 * weighted_mean_of_sizes()
    assert_weights(
        model_process.get_model_weights(output.state).trainable, [w - step for w in initial]
    )


def test_a_round_whose_clients_are_all_rejected_leaves_the_model_unchanged(model_process, initial):
    output = model_process.next(model_process.initialize(), [packed_client(4, poisoned=True)])
    assert output.metrics["client_work"]["num_clients_rejected"] == 1
    # 0 / 0 from the weighted mean: TFF's finalizer skips the step.
    assert output.metrics["finalizer"]["update_non_finite"] == 1
    assert (
        testing.max_abs_diff(model_process.get_model_weights(output.state).trainable, initial) == 0
    )


# ---------------------------------------------------------------------------------------------
# Meta-parameters: two phases, the second seeing the alpha the first stepped; per-stream
# aggregators.


def clipped(values, num_coordinates):
    """|v| of updates v * ones(num_coordinates) after clipping each to L2 norm CLIP."""
    values = np.asarray(values, np.float64)
    return values * np.minimum(1.0, CLIP / (values * np.sqrt(num_coordinates)))


def test_meta_state_layout_holds_alpha_in_the_meta_finalizer(two_phase_process, model):
    state = two_phase_process.initialize()
    assert isinstance(state, tff.learning.templates.LearningAlgorithmState)
    assert tuple(state._fields) == STATE_FIELDS
    assert list(state.aggregator) == ["model", "meta"]
    assert list(state.finalizer) == ["model", "meta"]
    assert list(state.finalizer["meta"]) == ["meta", "optimizer"]
    assert len(state.client_work) == 2  # one (empty) state per phase
    alpha = state.finalizer["meta"]["meta"]
    assert len(alpha) == len(model.initial_weights[0])
    np.testing.assert_allclose(testing.flat(alpha), ALPHA0)
    np.testing.assert_array_equal(
        testing.flat(two_phase_process.get_hparams(state)["alpha"]), testing.flat(alpha)
    )
    tff_finalizer = tff.learning.templates.build_apply_optimizer_finalizer(
        sgd(SERVER_LR), weights_type(model)
    )
    assert testing.max_abs_diff(state.finalizer["model"], tff_finalizer.initialize()) == 0.0


def test_meta_update_uses_its_own_aggregator(two_phase_process, two_phase_round):
    """alpha - META_LR * (weighted mean of the clipped -n_i * ones)."""
    num_alpha = len(two_phase_process.get_hparams(two_phase_round.state)["alpha"])
    sizes = np.asarray(SIZES, np.float64)
    mean = np.sum(sizes * clipped(sizes, num_alpha)) / np.sum(sizes)
    assert mean != pytest.approx(weighted_mean_of_sizes())  # clipping was active
    np.testing.assert_allclose(
        testing.flat(two_phase_process.get_hparams(two_phase_round.state)["alpha"]),
        ALPHA0 + META_LR * mean,
        rtol=1e-6,
    )
    update = two_phase_round.metrics["meta_update"]
    assert update["alpha_min"] == pytest.approx(ALPHA0 + META_LR * mean, rel=1e-6)
    assert update["update_non_finite"] == 0


def test_a_later_phase_sees_the_meta_parameters_an_earlier_phase_stepped(
    two_phase_process, two_phase_round, initial
):
    new_alpha = testing.flat(two_phase_process.get_hparams(two_phase_round.state)["alpha"])
    assert np.all(new_alpha > ALPHA0 + 1e-3)
    # Model update n_i * alpha_l, unweighted mean over clients: mean(n) * alpha_l per layer.
    mean_n = np.mean(np.asarray(SIZES, np.float64))
    assert mean_n != pytest.approx(weighted_mean_of_sizes())  # weights are ignored
    assert_weights(
        two_phase_process.get_model_weights(two_phase_round.state).trainable,
        [w - SERVER_LR * mean_n * a for w, a in zip(initial, new_alpha)],
    )
    assert list(two_phase_round.metrics) == [
        "distributor",
        "meta_client_work",
        "meta_aggregator",
        "meta_update",
        "adaptive_client_work",
        "model_aggregator",
        "finalizer",
    ]
    for phase in ("meta_client_work", "adaptive_client_work"):
        assert two_phase_round.metrics[phase]["num_clients"] == len(SIZES)


def test_meta_hparams_and_model_weights_round_trip(two_phase_process, model, clients):
    state = two_phase_process.initialize()
    alpha = (np.float32(0.3), np.float32(0.7))
    state = two_phase_process.set_hparams(state, {"alpha": alpha})
    np.testing.assert_allclose(testing.flat(two_phase_process.get_hparams(state)["alpha"]), alpha)
    start = tff.learning.models.ModelWeights(
        trainable=tuple(np.full(np.shape(w), 2.0, np.float32) for w in model.initial_weights[0]),
        non_trainable=(),
    )
    state = two_phase_process.set_model_weights(state, start)
    for got in two_phase_process.get_model_weights(state).trainable:
        np.testing.assert_array_equal(got, 2.0)
    # Setting the weights keeps alpha, and the next round starts from both.
    np.testing.assert_allclose(testing.flat(two_phase_process.get_hparams(state)["alpha"]), alpha)
    output = two_phase_process.next(state, clients[2:])  # one client, n = 1
    new_alpha = np.asarray(alpha, np.float64) + META_LR * clipped([SIZES[2]], len(alpha))
    np.testing.assert_allclose(
        testing.flat(two_phase_process.get_hparams(output.state)["alpha"]), new_alpha, rtol=1e-6
    )
    for got, a in zip(two_phase_process.get_model_weights(output.state).trainable, new_alpha):
        np.testing.assert_allclose(got, 2.0 - SERVER_LR * SIZES[2] * a, rtol=1e-6)


def test_all_rejected_clients_skip_the_meta_finalizer(two_phase_process, initial):
    output = two_phase_process.next(
        two_phase_process.initialize(), [packed_client(4, poisoned=True)]
    )
    metrics = output.metrics
    assert metrics["meta_client_work"]["num_clients_rejected"] == 1
    # The weighted mean of no weight is 0 / 0: the meta finalizer skips its step.
    assert metrics["meta_update"]["update_non_finite"] == 1
    np.testing.assert_array_equal(
        testing.flat(two_phase_process.get_hparams(output.state)["alpha"]), np.float32(ALPHA0)
    )
    # The unweighted mean counts the rejected (zeroed) update as 0: a finite step that moves
    # nothing.
    assert metrics["finalizer"]["update_non_finite"] == 0
    assert (
        testing.max_abs_diff(two_phase_process.get_model_weights(output.state).trainable, initial)
        == 0.0
    )


# ---------------------------------------------------------------------------------------------
# The meta finalizer on its own, against closed-form optimizer steps.

META = (np.float32(0.1), np.array([0.05, 0.2, 0.3], np.float32))


def test_meta_type_of():
    assert composer.meta_type_of(META).is_equivalent_to(
        tff.types.to_type(((np.float32, ()), (np.float32, (3,))))
    )
    assert composer.meta_type_of((np.float32(1.0),) * 4).is_equivalent_to(
        tff.types.to_type(((np.float32, ()),) * 4)
    )


@pytest.fixture(scope="module")
def sgd_finalizer():
    return composer.build_meta_finalizer(sgd(0.5), META, min_meta=MIN_META)


def test_meta_finalizer_holds_the_meta_parameters_steps_then_projects(sgd_finalizer):
    state = sgd_finalizer.initialize()
    np.testing.assert_array_equal(testing.flat(state["meta"]), testing.flat(META))
    grad = (np.float32(-0.4), np.array([0.02, 0.5, -1.0], np.float32))
    output = sgd_finalizer.next(state, grad)
    expected = np.maximum(testing.flat(META) - 0.5 * testing.flat(grad), MIN_META)
    np.testing.assert_allclose(testing.flat(output.result), expected, rtol=1e-6)
    np.testing.assert_allclose(testing.flat(output.state["meta"]), expected, rtol=1e-6)
    assert testing.flat(output.result)[2] == pytest.approx(MIN_META)  # 0.2 - 0.25 projected
    m = output.measurements
    assert m["meta_gradient_norm"] == pytest.approx(np.linalg.norm(testing.flat(grad)), rel=1e-6)
    assert m["update_non_finite"] == 0
    assert m["alpha_min"] == pytest.approx(expected.min())
    assert m["alpha_max"] == pytest.approx(expected.max())
    assert m["alpha_mean"] == pytest.approx(expected.mean(), rel=1e-6)


def test_meta_finalizer_without_a_bound_is_unconstrained():
    process = composer.build_meta_finalizer(sgd(0.5), META, min_meta=None)
    grad = (np.float32(1.0), np.array([1.0, 1.0, 1.0], np.float32))
    output = process.next(process.initialize(), grad)
    np.testing.assert_allclose(testing.flat(output.result), testing.flat(META) - 0.5, rtol=1e-6)
    assert testing.flat(output.result).min() < 0


@pytest.fixture(scope="module")
def momentum_finalizer():
    return composer.build_meta_finalizer(sgd(0.1, momentum=0.9), META, min_meta=None)


def test_meta_finalizer_threads_the_optimizer_state(momentum_finalizer):
    """Heavy-ball momentum: the second step uses the first step's gradient too."""
    g1 = (np.float32(1.0), np.array([1.0, -2.0, 0.5], np.float32))
    g2 = (np.float32(-0.5), np.array([0.0, 1.0, 1.0], np.float32))
    first = momentum_finalizer.next(momentum_finalizer.initialize(), g1)
    second = momentum_finalizer.next(first.state, g2)
    a1 = testing.flat(META) - 0.1 * testing.flat(g1)
    a2 = a1 - 0.1 * (0.9 * testing.flat(g1) + testing.flat(g2))
    np.testing.assert_allclose(testing.flat(second.result), a2, rtol=1e-5)


def test_meta_finalizer_skips_a_non_finite_meta_gradient(momentum_finalizer):
    """Neither the meta-parameters nor the momentum take the NaN: the next step is a first one."""
    nan = (np.float32(np.nan), np.array([1.0, np.nan, 0.0], np.float32))
    skipped = momentum_finalizer.next(momentum_finalizer.initialize(), nan)
    np.testing.assert_array_equal(testing.flat(skipped.result), testing.flat(META))
    assert skipped.measurements["update_non_finite"] == 1
    g = (np.float32(1.0), np.array([1.0, -2.0, 0.5], np.float32))
    after = momentum_finalizer.next(skipped.state, g)
    np.testing.assert_allclose(
        testing.flat(after.result), testing.flat(META) - 0.1 * testing.flat(g), atol=1e-7
    )


# ---------------------------------------------------------------------------------------------
# Pieces.


def test_create_aggregator_always_takes_weights():
    value_type = tff.types.to_type((np.float32, (2,)))
    values = [np.array([1.0, 2.0], np.float32), np.array([3.0, 6.0], np.float32)]
    weights = [np.float32(1.0), np.float32(3.0)]
    expected = {
        tff.aggregators.MeanFactory: [2.5, 5.0],  # weighted
        tff.aggregators.SumFactory: [4.0, 8.0],  # unweighted: weights ignored
        tff.aggregators.UnweightedMeanFactory: [2.0, 4.0],
    }
    for factory_class, result in expected.items():
        process = composer.create_aggregator(factory_class(), value_type)
        assert process.is_weighted
        output = process.next(process.initialize(), values, weights)
        np.testing.assert_allclose(output.result, result)


def test_initial_model_weights_computation(model, initial):
    weights = composer.initial_model_weights_computation(model)()
    assert_weights(weights.trainable, initial)


@pytest.mark.parametrize(
    "rec, field",
    [(MODEL_ONLY, "server_optimizer"), (TWO_PHASE, "meta_optimizer")],
)
def test_an_optimizer_of_the_wrong_kind_is_a_type_error_naming_the_option(rec, field, data_type):
    options = algorithm.AlgorithmOptions(**{field: tf.keras.optimizers.SGD()})
    with pytest.raises(TypeError, match=rf"{field} must be a tff\.learning\.optimizers"):
        composer.compose(rec, model_fn, data_type, options)


def test_an_aggregator_class_is_a_type_error_naming_the_option_for_any_record(data_type):
    options = algorithm.AlgorithmOptions(model_aggregator=tff.aggregators.MeanFactory)
    with pytest.raises(TypeError, match="model_aggregator must be a tff.aggregators"):
        composer.compose(MODEL_ONLY, model_fn, data_type, options)


# ---------------------------------------------------------------------------------------------
# Meta-gradient clipping on the aggregate, and meta-models' structured meta-parameters.

AGGREGATE_CLIP = 0.05


def test_meta_clipping_acts_on_the_aggregate_of_the_gradient_streams(data_type, clients, model):
    """alpha - lr * clip(weighted mean of -n_i * ones): the mean is clipped once, at the server
    (per-client clipping would give a different, smaller mean), and only the streams the record
    names as meta-gradients are clipped."""
    clipped_record = record(
        "clipped",
        TWO_PHASE.phases(None, None),
        initial_meta=per_layer_alpha,
        gradient_streams=lambda options: ("meta",),
    )
    options = algorithm.AlgorithmOptions(
        inner_lr=ALPHA0,
        server_optimizer=sgd(SERVER_LR),
        meta_optimizer=sgd(META_LR),
        meta_clip_norm=AGGREGATE_CLIP,
    )
    process = composer.compose(clipped_record, model_fn, data_type, options)
    output = process.next(process.initialize(), clients)
    num_alpha = len(model.initial_weights[0])
    mean = weighted_mean_of_sizes()  # every coordinate of the aggregate is -mean
    norm = mean * np.sqrt(num_alpha)
    np.testing.assert_allclose(
        testing.flat(process.get_hparams(output.state)["alpha"]),
        ALPHA0 + META_LR * mean * AGGREGATE_CLIP / norm,
        rtol=1e-6,
    )
    clipping = output.metrics["meta_clipping"]
    assert clipping["norm_before_clipping"] == pytest.approx(norm, rel=1e-6)
    assert clipping["clipped"] == 1
    assert "model_clipping" not in output.metrics


def test_clip_norms_are_automatic_for_several_steps_and_zero_turns_them_off():
    one, five = algorithm.AlgorithmOptions(), algorithm.AlgorithmOptions(inner_steps=5)
    assert one.clip_norms() == (None, None)
    assert five.clip_norms() == (algorithm.AUTO_INNER_CLIP_NORM, algorithm.AUTO_META_CLIP_NORM)
    off = algorithm.AlgorithmOptions(inner_steps=5, inner_clip_norm=0, meta_clip_norm=3.0)
    assert off.clip_norms() == (None, 3.0)
    with pytest.raises(ValueError, match="inner_clip_norm must be a finite number >= 0"):
        algorithm.check_common(algorithm.AlgorithmOptions(inner_clip_norm=-1.0))
    with pytest.raises(ValueError, match="meta_model must be one of rates, per_step"):
        algorithm.check_common(algorithm.AlgorithmOptions(meta_model="lstm"))


STRUCTURED = collections.OrderedDict(
    alpha=(np.float32(0.2), np.array([0.1, 0.3, 0.02], np.float32)),
    meta_model=collections.OrderedDict(
        step_logits=np.zeros([2, 2], np.float32),
        momentum_logits=np.array([0.0, 2.0], np.float32),
    ),
)


def test_meta_finalizer_projects_alpha_only_and_reports_the_momentum():
    process = composer.build_meta_finalizer(sgd(0.5), STRUCTURED, min_meta=MIN_META)
    grad = collections.OrderedDict(
        alpha=(np.float32(-0.4), np.array([0.02, 0.5, -1.0], np.float32)),
        meta_model=collections.OrderedDict(
            step_logits=np.full([2, 2], 3.0, np.float32),
            momentum_logits=np.array([1.0, -1.0], np.float32),
        ),
    )
    output = process.next(process.initialize(), grad)
    alpha = np.maximum(
        testing.flat(STRUCTURED["alpha"]) - 0.5 * testing.flat(grad["alpha"]), MIN_META
    )
    np.testing.assert_allclose(testing.flat(output.result["alpha"]), alpha, rtol=1e-6)
    # The meta-model's own parameters go negative: they are not projected.
    np.testing.assert_allclose(output.result["meta_model"]["step_logits"], -1.5, rtol=1e-6)
    logits = np.array([-0.5, 2.5])
    np.testing.assert_allclose(output.result["meta_model"]["momentum_logits"], logits, rtol=1e-6)
    m = output.measurements
    assert m["alpha_min"] == pytest.approx(alpha.min())
    assert m["momentum_mean"] == pytest.approx(np.mean(1 / (1 + np.exp(-logits))), rel=1e-6)
    assert composer.meta_type_of(STRUCTURED).is_equivalent_to(
        tff.types.to_type(
            collections.OrderedDict(
                alpha=((np.float32, ()), (np.float32, (3,))),
                meta_model=collections.OrderedDict(
                    step_logits=(np.float32, (2, 2)), momentum_logits=(np.float32, (2,))
                ),
            )
        )
    )
