"""Tests of `mfl_tff.data.settings`: per-task hyperparameters, overrides, built-in values."""

from __future__ import annotations

import dataclasses

import pytest

from mfl_tff.data import digits, emnist, registry, settings, sinusoid, synthetic
from mfl_tff.data.settings import TaskSettings
from mfl_tff.data.task import FederatedTask

SMALL = {"num_train_clients": 30, "num_eval_clients": 5}


def test_defaults_are_the_training_binarys_historic_defaults():
    # A user's task without settings trains as every task did before tasks carried settings.
    assert TaskSettings() == TaskSettings(
        inner_lr=0.4,
        inner_steps=5,
        local_epochs=1,
        outer_lr=0.01,
        meta_optimizer="adam",
        meta_lr=1e-3,
        alpha_granularity="per_layer",
        clients_per_round=25,
        eval_adaptation_steps=None,
        shots=None,
    )


def test_field_names_are_the_flag_names_they_fill():
    assert settings.names() == [
        "inner_lr",
        "inner_steps",
        "local_epochs",
        "outer_lr",
        "meta_optimizer",
        "meta_lr",
        "alpha_granularity",
        "clients_per_round",
        "eval_adaptation_steps",
        "shots",
    ]


def test_with_overrides_replaces_only_values_that_are_set():
    base = TaskSettings(inner_lr=0.01, inner_steps=1)
    got = base.with_overrides(inner_lr=0.05, inner_steps=None, meta_optimizer=None)
    assert got == dataclasses.replace(base, inner_lr=0.05)
    assert base.with_overrides() == base


def test_with_overrides_rejects_unknown_names_and_bad_values():
    with pytest.raises(TypeError, match="no_such"):
        TaskSettings().with_overrides(no_such=1)
    with pytest.raises(ValueError, match="inner_lr"):
        TaskSettings().with_overrides(inner_lr=-0.1)


@pytest.mark.parametrize(
    "changes",
    [
        {"inner_lr": 0.0},
        {"inner_lr": float("nan")},
        {"outer_lr": -1.0},
        {"meta_lr": -1e-3},
        {"meta_lr": float("inf")},
        {"inner_steps": 0},
        {"local_epochs": 0},
        {"clients_per_round": 0},
        {"eval_adaptation_steps": 0},
        {"shots": 0},
        {"shots": (0, 5)},
        {"shots": (5, 2)},
        {"shots": (5, 5)},  # a range of one count is stored as the count
        {"shots": [2, 5]},
        {"inner_steps": 1.5},
        {"meta_optimizer": ""},
        {"alpha_granularity": None},
    ],
)
def test_out_of_range_values_are_rejected(changes):
    with pytest.raises(ValueError, match=next(iter(changes))):
        TaskSettings(**changes)


def test_meta_lr_zero_is_allowed_as_an_ablation():
    assert TaskSettings(meta_lr=0.0).meta_lr == 0.0


def test_adaptation_steps_follow_inner_steps_unless_set():
    assert TaskSettings(inner_steps=3).adaptation_steps == 3
    assert TaskSettings(inner_steps=3).with_overrides(inner_steps=2).adaptation_steps == 2
    assert TaskSettings(inner_steps=3, eval_adaptation_steps=10).adaptation_steps == 10


def test_as_dict_resolves_the_adaptation_steps_and_describe_marks_explicit_flags():
    values = TaskSettings(inner_steps=3, shots=None).as_dict()
    assert list(values) == settings.names()
    assert values["eval_adaptation_steps"] == 3 and values["shots"] is None
    text = TaskSettings(inner_lr=0.01, meta_lr=0.0, shots=10).describe(explicit={"meta_lr"})
    assert text.startswith("inner_lr=0.01 inner_steps=5 ")
    assert "meta_lr=0* " in text and text.endswith("eval_adaptation_steps=5 shots=10")
    assert "shots" not in TaskSettings().describe()


def test_the_settings_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        TaskSettings().inner_lr = 1.0


def test_sinusoid_carries_the_maml_meta_sgd_protocol():
    got = registry.get_task("sinusoid", **SMALL).settings
    assert got == TaskSettings(
        inner_lr=0.01,
        inner_steps=1,
        local_epochs=1,
        outer_lr=0.01,
        meta_optimizer="adam",
        meta_lr=1e-3,
        alpha_granularity="per_coordinate",
        clients_per_round=25,
        shots=10,
    )


def test_digits_fewshot_carries_exactly_the_old_binary_defaults():
    # Its fixed-seed results must not change: these were train.py's defaults for every task.
    got = registry.get_task("digits_fewshot", **SMALL).settings
    assert got == dataclasses.replace(TaskSettings(), shots=5)


def test_dirichlet_digits_carries_the_quality_benchmarks_setup():
    got = registry.get_task("digits", **SMALL).settings
    assert (got.inner_lr, got.inner_steps, got.outer_lr) == (0.1, 5, 0.1)
    assert (got.alpha_granularity, got.clients_per_round, got.shots) == ("per_layer", 20, None)


def test_synthetic_and_emnist_carry_their_own_settings():
    assert registry.get_task("synthetic", **SMALL).settings == synthetic.SETTINGS
    # EMNIST's data file is not on these machines; its builder attaches emnist.SETTINGS.
    assert emnist.SETTINGS.inner_lr == 0.03 and emnist.SETTINGS.shots is None
    assert synthetic.SETTINGS != TaskSettings() and emnist.SETTINGS != TaskSettings()


@pytest.mark.parametrize(
    "name, shots",
    [
        ("sinusoid", 5),
        ("digits_fewshot", 3),
        ("digits", 4),
        ("sinusoid", (2, 20)),
        ("digits_fewshot", (1, 10)),
    ],
)
def test_a_task_records_the_shots_it_was_built_with(name, shots):
    task = registry.get_task(name, shots=shots, **SMALL)
    assert task.settings.shots == shots
    # Only the shot count moves: the protocol's other values stay.
    module_settings = {
        "sinusoid": sinusoid.SETTINGS,
        "digits_fewshot": digits.FEWSHOT_SETTINGS,
        "digits": digits.DIGITS_SETTINGS,
    }[name]
    assert task.settings == dataclasses.replace(module_settings, shots=shots)


def test_a_task_needs_task_settings():
    task = registry.get_task("sinusoid", **SMALL)
    fields = {f.name: getattr(task, f.name) for f in dataclasses.fields(FederatedTask) if f.init}
    with pytest.raises(TypeError, match="TaskSettings"):
        FederatedTask(**{**fields, "settings": {"inner_lr": 0.1}})


def test_a_shot_range_is_kept_and_described_as_on_the_command_line():
    values = TaskSettings(shots=(2, 20))
    assert values.shots == (2, 20) and values.as_dict()["shots"] == (2, 20)
    assert values.describe(explicit={"shots"}).endswith("shots=2:20*")
    assert settings.max_shots((2, 20)) == 20 and settings.max_shots(7) == 7


@pytest.mark.parametrize(
    "text, expected",
    [("5", 5), ("2:20", (2, 20)), (" 3 : 4 ", (3, 4)), ("4:4", 4)],
)
def test_parse_shots(text, expected):
    assert settings.parse_shots(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [("0.3", 0.3), ("0", 0.0), ("0:1", (0.0, 1.0)), ("0.5:0.5", 0.5), ("1e-1:2", (0.1, 2.0))],
)
def test_parse_noise(text, expected):
    assert settings.parse_noise(text) == expected


@pytest.mark.parametrize(
    "parse, text, fix",
    [
        (settings.parse_shots, "2:", "--shots=5 or --shots=2:20"),
        (settings.parse_shots, ":3", "--shots=5 or --shots=2:20"),
        (settings.parse_shots, "a:b", "--shots=5 or --shots=2:20"),
        (settings.parse_shots, "1.5", "--shots=5 or --shots=2:20"),
        (settings.parse_shots, "1:2:3", "--shots=5 or --shots=2:20"),
        (settings.parse_shots, "", "--shots=5 or --shots=2:20"),
        (settings.parse_shots, "5:2", "pass --shots=2:5"),
        (settings.parse_shots, "0:4", ">= 1"),
        (settings.parse_shots, "0", ">= 1"),
        (settings.parse_shots, "2:-3", ">= 1"),
        (settings.parse_noise, "1:-0.5", ">= 0"),
        (settings.parse_noise, "a:b", "--label_noise=0.3 or --label_noise=0:1"),
        (settings.parse_noise, "0.1:", "--label_noise=0.3 or --label_noise=0:1"),
        (settings.parse_noise, "-0.1", ">= 0"),
        (settings.parse_noise, "nan", ">= 0"),
        (settings.parse_noise, "1:0.5", "pass --label_noise=0.5:1"),
    ],
)
def test_malformed_range_flags_are_one_line_errors_naming_the_fix(parse, text, fix):
    with pytest.raises(ValueError) as error:
        parse(text)
    message = str(error.value)
    assert fix in message and "\n" not in message and message.startswith("--")
