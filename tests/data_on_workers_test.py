"""Tests of pool mode (`data_on_workers=True`, `--data_on_workers`) on the digits tasks.

In pool mode the driver sends each client as int32 row indices into the task's pool of images, and
the client computation gathers the images on the worker (`example_sources.build_on_worker`). What
matters: the default tasks are bit-identical to before pool mode existed; gathering gives exactly
the default task's packed clients (every round's split, held-out clients, cohorts); the driver
sends far fewer bytes; and training and evaluation end where the default task's do. The same on
two workers is in tests/multi_worker_test.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from mfl_tff.algorithms import builders, cohorts
from mfl_tff.data import example_sources, registry
from mfl_tff.evaluation import summaries
from mfl_tff.training import personalize, rounds
from tests import testing

OPTIONS = {
    "digits": dict(num_train_clients=20, num_eval_clients=4),
    "digits_fewshot": dict(num_train_clients=40, num_eval_clients=3),
}
# `testing.digest(testing.packed_sample(task))` of each default task, computed with the code from
# before pool mode existed: the default clients must stay bit-identical.
DEFAULT_DIGESTS = {
    "digits": "b2137c1810f000c7434fa99f1e4ed0460011404803b686eeec27ba84eb24d02f",
    "digits_fewshot": "3f8b698879db1fc37cc5c3475ddc05bde4907931100b7a7dc1b708d051408f76",
}
PIXELS = 64  # one 8x8 image


@pytest.fixture(scope="module", params=sorted(OPTIONS))
def tasks(request):
    """(default task, the same task in pool mode) for each digits task."""
    options = OPTIONS[request.param]
    return (
        registry.get_task(request.param, **options),
        registry.get_task(request.param, data_on_workers=True, **options),
    )


def test_the_default_task_is_unchanged(tasks):
    default, pooled = tasks
    assert default.example_source is None and not default.data_on_workers
    assert pooled.data_on_workers
    assert testing.digest(testing.packed_sample(default)) == DEFAULT_DIGESTS[default.name]


def test_gathered_clients_are_the_default_tasks_exactly(tasks):
    default, pooled = tasks
    for want, got in zip(testing.packed_sample(default), testing.packed_sample(pooled)):
        for client_want, client_got in zip(want, got):
            assert client_got["support"]["x"].dtype == np.int32
            testing.assert_identical(
                client_want, example_sources.build_on_worker(client_got, pooled.example_source)
            )
        # Cohorts: stacked clients (padded with an empty one) gather in one call.
        for cohort_want, cohort_got in zip(
            cohorts.make_cohorts(want, 2), cohorts.make_cohorts(got, 2)
        ):
            testing.assert_identical(
                cohort_want, example_sources.build_on_worker(cohort_got, pooled.example_source)
            )
    # The computations' client type: the same, with x int32 indices of the features' leading axes.
    want, got = default.client_data_type(), pooled.client_data_type()
    for part in ("support", "query"):
        assert got[part].x.dtype == np.int32
        assert tuple(got[part].x.shape) == tuple(want[part].x.shape)[:2]
        assert got[part].y == want[part].y and got[part].mask == want[part].mask


def _nbytes(client) -> int:
    return sum(a.nbytes for a in tf.nest.flatten(client))


def test_the_driver_sends_indices_instead_of_features():
    options = OPTIONS["digits_fewshot"]
    default = registry.get_task("digits_fewshot", **options)
    pooled = registry.get_task("digits_fewshot", data_on_workers=True, **options)
    ids = default.train_data.client_ids[:4]
    for want, got in zip(default.train_clients(ids, 1), pooled.train_clients(ids, 1)):
        # Example slots (real and padding), each with an int32 label and a float32 mask.
        slots = sum(part["mask"].size for part in want.values())
        assert slots == 25 + 2 * 25  # 5-way 5-shot support, 5 x 10 query in batches of 25
        assert _nbytes(want) == slots * (4 * PIXELS + 4 + 4) == 19_800
        assert _nbytes(got) == slots * (4 + 4 + 4) == 900


def test_a_pool_needs_clients_of_indices():
    default = registry.get_task("digits", **OPTIONS["digits"])
    with pytest.raises(ValueError, match="integer code"):
        type(default)(
            name="broken",
            train_data=default.train_data,
            eval_data=default.eval_data,
            model_fn=default.model_fn,
            problem="classification",
            train_split=default.train_split,
            train_pack=default.train_pack,
            example_source=example_sources.FeaturePool(np.zeros((4, 8, 8), np.float32)),
        )


# The gather comes before any algorithm's code, in the one client computation every algorithm's
# phases are built with (`client_work.build_client_computation`), so fedavg and the evaluation
# cover the plumbing; the exact equality of the gathered tensors is the test above. Cohorts on
# the worker are in tests/multi_worker_test.py.
ALGORITHMS = {"fedavg": {}}


@pytest.mark.timeout(180)
def test_training_and_evaluation_end_where_the_default_tasks_do(tff_local_execution):
    options = OPTIONS["digits_fewshot"]
    tasks = (
        registry.get_task("digits_fewshot", **options),
        registry.get_task("digits_fewshot", data_on_workers=True, **options),
    )
    curves = []
    for name, extra in ALGORITHMS.items():
        ends = []
        for task in tasks:
            algorithm_options = builders.AlgorithmOptions.from_settings(task.settings, **extra)
            process, spec = builders.build_algorithm(name, task, algorithm_options)
            state = rounds.run_rounds(process, spec, task, clients_per_round=4, rounds=range(1, 4))
            ends.append(testing.model_and_meta(process, state))
            if name == "fedavg":
                _, per_client = personalize.evaluate(
                    process,
                    state,
                    spec,
                    task,
                    fine_tune_lr=0.4,
                    max_steps=1,
                    rounds=3,
                    num_clients=2,
                    return_per_client=True,
                )
                curves.append(
                    [summaries.stack_clients(per_client, key) for key in ("own_loss", "own_metric")]
                )
        (want_theta, want_alpha), (theta, alpha) = ends
        np.testing.assert_allclose(theta, want_theta, rtol=0, atol=1e-6)
        if want_alpha is not None:
            np.testing.assert_allclose(alpha, want_alpha, rtol=0, atol=1e-6)
    np.testing.assert_allclose(curves[1], curves[0], rtol=0, atol=1e-6)
