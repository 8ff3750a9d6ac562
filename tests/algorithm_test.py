"""Tests of `mfl_tff.algorithms.algorithm`: optimizers by stream, options checks, client phases.

Pure Python: optimizers are built and stepped eagerly, no TFF computation runs. Which optimizer
was built is told by its first step (not by its class): from a gradient g, SGD moves by lr * g and
Adam by lr * sign(g) (its bias-corrected m / sqrt(v) is g / |g| on the first step).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_federated as tff

from mfl_tff.algorithms import algorithm, catalog, fedavg
from mfl_tff.algorithms.algorithm import AlgorithmOptions, ClientPhase
from mfl_tff.data.settings import TaskSettings

GRAD = np.array([0.5, -2.0, 0.25], np.float32)


def first_step(optimizer) -> np.ndarray:
    """How far one step of `optimizer` from zeros with gradient GRAD moves each coordinate."""
    spec = tf.TensorSpec(GRAD.shape, tf.float32)
    _, new = optimizer.next(optimizer.initialize(spec), tf.zeros(GRAD.shape), tf.constant(GRAD))
    return -np.asarray(new, np.float64)


def kind_and_rate(optimizer) -> tuple[str, float]:
    """('sgd', lr) or ('adam', lr), from the optimizer's first step."""
    step = first_step(optimizer)
    rate = float(step[0] / GRAD[0])
    if np.allclose(step, rate * GRAD, rtol=1e-5):
        return "sgd", rate
    rate = float(step[0])
    if np.allclose(step, rate * np.sign(GRAD), rtol=1e-4):
        return "adam", rate
    raise AssertionError(f"neither SGD nor Adam: first step {step}")


def test_kind_and_rate_tells_sgd_from_adam():
    """Guards the helper every other test relies on, with TFF's own optimizers."""
    assert kind_and_rate(tff.learning.optimizers.build_sgdm(0.3)) == (
        "sgd",
        pytest.approx(0.3, rel=1e-4),
    )
    assert kind_and_rate(tff.learning.optimizers.build_adam(0.3)) == (
        "adam",
        pytest.approx(0.3, rel=1e-4),
    )


# The default optimizer of each record's streams under default options: (model, meta).
SGD_1 = ("sgd", 1.0)
ADAM_META = ("adam", 1e-3)
DEFAULTS = {
    "fedavg": (SGD_1, None),
    "fedprox": (SGD_1, None),
    "reptile": (SGD_1, None),
    "per_fedavg_fo": (SGD_1, None),
    "per_fedavg_hf": (SGD_1, None),
    # Their theta update is a meta-gradient: the meta optimizer steps it.
    "maml": (ADAM_META, None),
    "fomaml": (ADAM_META, None),
    "meta_sgd": (ADAM_META, ADAM_META),
    # mfl's default adaptive update is `meta` (a meta-gradient on theta): Adam at the server.
    "mfl": (ADAM_META, ADAM_META),
}


def test_every_registered_algorithm_has_expected_defaults():
    assert set(DEFAULTS) == set(catalog.names())


@pytest.mark.parametrize("name", sorted(DEFAULTS))
def test_default_optimizers_per_record(name):
    record = catalog.get(name)
    model_default, meta_default = DEFAULTS[name]
    options = AlgorithmOptions()
    kind, rate = kind_and_rate(record.optimizer("model", options))
    assert (kind, rate) == (model_default[0], pytest.approx(model_default[1], rel=1e-4))
    assert record.learns_meta == (meta_default is not None)
    if meta_default is not None:
        kind, rate = kind_and_rate(record.optimizer("meta", options))
        assert (kind, rate) == (meta_default[0], pytest.approx(meta_default[1], rel=1e-4))


def test_mfl_local_adaptive_update_defaults_to_fedavgs_server_sgd():
    options = AlgorithmOptions(adaptive_update="local")
    assert kind_and_rate(catalog.get("mfl").optimizer("model", options)) == ("sgd", 1.0)


@pytest.mark.parametrize(
    "name, stream, reads",
    [
        ("fedavg", "model", "server"),
        ("reptile", "model", "server"),
        ("mfl", "model", "server"),
        ("mfl", "meta", "meta"),
        ("maml", "model", "meta"),
        ("meta_sgd", "model", "meta"),
        ("meta_sgd", "meta", "meta"),
    ],
)
def test_each_stream_reads_its_own_options(name, stream, reads):
    """server_* options step theta of model-delta algorithms, meta_* the meta-gradient ones."""
    options = AlgorithmOptions(
        server_optimizer="sgd", server_lr=0.25, meta_optimizer="adam", meta_lr=0.125
    )
    expected = ("sgd", 0.25) if reads == "server" else ("adam", 0.125)
    kind, rate = kind_and_rate(catalog.get(name).optimizer(stream, options))
    assert (kind, rate) == (expected[0], pytest.approx(expected[1], rel=1e-4))


def test_server_lr_alone_keeps_the_default_optimizer_and_vice_versa():
    mfl = catalog.get("mfl")
    assert kind_and_rate(mfl.optimizer("model", AlgorithmOptions(server_lr=0.5))) == (
        "adam",
        pytest.approx(0.5, rel=1e-4),
    )
    fedavg_adam = catalog.get("fedavg").optimizer(
        "model", AlgorithmOptions(server_optimizer="adam")
    )
    assert kind_and_rate(fedavg_adam) == ("adam", pytest.approx(1.0, rel=1e-4))


def test_an_optimizer_instance_passes_through_unchanged():
    server = tff.learning.optimizers.build_sgdm(0.7, momentum=0.5)
    meta = tff.learning.optimizers.build_adagrad(0.2)
    options = AlgorithmOptions(server_optimizer=server, meta_optimizer=meta, server_lr=99.0)
    mfl = catalog.get("mfl")
    # Its own rate: server_lr / meta_lr apply to optimizers given by name only.
    assert mfl.optimizer("model", options) is server
    assert mfl.optimizer("meta", options) is meta
    assert catalog.get("maml").optimizer("model", options) is meta


@pytest.mark.parametrize(
    "name, stream, field",
    [
        ("fedavg", "model", "server_optimizer"),
        ("mfl", "model", "server_optimizer"),
        ("mfl", "meta", "meta_optimizer"),
        ("maml", "model", "meta_optimizer"),
    ],
)
def test_an_optimizer_of_the_wrong_type_is_a_type_error_naming_the_option(name, stream, field):
    options = AlgorithmOptions(**{field: tf.keras.optimizers.SGD()})
    with pytest.raises(TypeError, match=rf"{field} must be a tff\.learning\.optimizers") as error:
        catalog.get(name).optimizer(stream, options)
    assert "SGD" in str(error.value)  # names what was passed


@pytest.mark.parametrize("name", algorithm.OPTIMIZERS)
def test_learning_rate_zero_freezes_what_it_steps(name):
    np.testing.assert_array_equal(first_step(algorithm.build_optimizer(name, 0.0)), 0.0)


@pytest.mark.parametrize("rate", [-1e-3, float("nan"), float("inf")])
def test_a_negative_or_non_finite_learning_rate_is_refused(rate):
    with pytest.raises(ValueError, match="learning rate must be a finite number >= 0"):
        algorithm.build_optimizer("sgd", rate)
    for options, stream in (
        (AlgorithmOptions(meta_lr=rate), "meta"),
        (AlgorithmOptions(server_lr=rate), "model"),
    ):
        with pytest.raises(ValueError, match="learning rate"):
            catalog.get("mfl").optimizer(stream, options)


def test_meta_lr_zero_freezes_alpha_and_server_lr_zero_theta():
    frozen = AlgorithmOptions(meta_lr=0.0, server_lr=0.0)
    mfl = catalog.get("mfl")
    for stream in ("model", "meta"):
        np.testing.assert_array_equal(first_step(mfl.optimizer(stream, frozen)), 0.0)


def test_unknown_optimizer_name_lists_the_choices():
    with pytest.raises(ValueError, match="rmsprop") as error:
        catalog.get("fedavg").optimizer("model", AlgorithmOptions(server_optimizer="rmsprop"))
    for name in algorithm.OPTIMIZERS:
        assert name in str(error.value)


# ---------------------------------------------------------------------------------------------
# Client phases and the common checks.


def _client_fn(weights, data):
    return None  # never called: phases are only constructed here


@pytest.mark.parametrize("streams", [(), ("theta",), ("model", "alpha"), ("model", "Meta")])
def test_client_phase_refuses_unknown_or_no_streams(streams):
    with pytest.raises(
        ValueError, match=r"streams must be a non-empty subset of \('model', 'meta'"
    ):
        ClientPhase("x", _client_fn, streams=streams)


@pytest.mark.parametrize("streams", [("model",), ("meta",), ("model", "meta")])
def test_client_phase_accepts_model_and_meta_streams(streams):
    assert ClientPhase("x", _client_fn, streams=streams).streams == streams


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(inner_steps=0), "inner_steps"),
        (dict(inner_steps=1.0), "inner_steps"),
        (dict(local_epochs=0), "local_epochs"),
        (dict(inner_lr=0.0), "inner_lr"),
        (dict(inner_lr=float("nan")), "inner_lr"),
        (dict(cohort_size=0), "cohort_size"),
    ],
)
def test_check_common_refuses_out_of_range_numbers(options, message):
    with pytest.raises(ValueError, match=message):
        algorithm.check_common(AlgorithmOptions(**options))


@pytest.mark.parametrize("field", ["model_aggregator", "meta_aggregator"])
@pytest.mark.parametrize(
    "factory",
    [
        tff.aggregators.UnweightedMeanFactory(),
        tff.aggregators.clipping_factory(1.0, tff.aggregators.MeanFactory()),
        tff.aggregators.DifferentiallyPrivateFactory.gaussian_fixed(0.5, 4, 1.0),
    ],
)
def test_cohorts_refuse_an_aggregator_other_than_the_weighted_mean(field, factory):
    """Clipping, noise or equal weights would apply to cohorts, not to clients."""
    options = AlgorithmOptions(cohort_size=3, **{field: factory})
    with pytest.raises(ValueError, match=rf"cohort_size=3 .*{field}"):
        algorithm.check_common(options)
    algorithm.check_common(AlgorithmOptions(**{field: factory}))  # fine without cohorts


def test_cohorts_accept_the_weighted_mean():
    algorithm.check_common(
        AlgorithmOptions(
            cohort_size=3,
            model_aggregator=tff.aggregators.MeanFactory(),
            meta_aggregator=tff.aggregators.MeanFactory(),
        )
    )


def test_an_aggregator_class_is_a_type_error_naming_the_option():
    with pytest.raises(TypeError, match="meta_aggregator must be a tff.aggregators"):
        algorithm.check_common(AlgorithmOptions(meta_aggregator=tff.aggregators.MeanFactory))


@pytest.mark.parametrize(
    "name, options, expected",
    [
        ("mfl", {}, "conditioned"),
        ("mfl", {"adaptive_update": "local"}, "rates"),  # `local` steps with alpha alone
        ("mfl", {"meta_model": "per_step"}, "per_step"),  # an explicit choice stays
        ("mfl", {"meta_model": "rates"}, "rates"),
        ("meta_sgd", {}, "rates"),
        ("meta_sgd", {"meta_model": "conditioned"}, "conditioned"),
        ("fedavg", {}, "rates"),
    ],
)
def test_an_unset_meta_model_resolves_to_the_algorithms_default(name, options, expected):
    resolved = catalog.get(name).resolve(AlgorithmOptions(**options))
    assert resolved.meta_model == expected
    assert resolved.inner_loop().meta_model == expected
    # Nothing else changes.
    assert dataclasses.replace(resolved, meta_model=options.get("meta_model")) == (
        AlgorithmOptions(**options)
    )


def test_an_unresolved_meta_model_is_refused_by_the_inner_loop():
    with pytest.raises(ValueError, match="resolve the options with the algorithm"):
        AlgorithmOptions().inner_loop()


def test_learns_meta_is_having_initial_meta_parameters():
    assert not fedavg.FEDAVG.learns_meta
    assert {name for name in catalog.names() if catalog.get(name).learns_meta} == {
        "meta_sgd",
        "mfl",
    }


def test_options_from_a_tasks_settings_take_its_fields_and_the_overrides():
    settings = TaskSettings(
        inner_lr=0.03,
        inner_steps=4,
        local_epochs=2,
        outer_lr=0.02,
        meta_optimizer="sgd",
        meta_lr=0.5,
        alpha_granularity="scalar",
        clients_per_round=7,
    )
    options = AlgorithmOptions.from_settings(settings, cohort_size=3, inner_steps=9)
    assert (options.inner_lr, options.local_epochs, options.outer_lr) == (0.03, 2, 0.02)
    assert (options.meta_optimizer, options.meta_lr) == ("sgd", 0.5)
    assert options.alpha_granularity == "scalar"
    assert options.inner_steps == 9  # an explicit option wins over the settings
    assert options.cohort_size == 3
