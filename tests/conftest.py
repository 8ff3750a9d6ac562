"""Shared fixtures: small files in TFF's real EMNIST SQLite format, worker-process hygiene, and the
reference run of the training binary. Plain helpers are in tests/testing.py."""

from __future__ import annotations

import os
import signal
import sys

import numpy as np
import pytest

from mfl_tff.data import digits, emnist, registry
from mfl_tff.training import runtime
from tests import testing


@pytest.fixture(scope="session")
def emnist_dir(tmp_path_factory):
    """A cache directory with emnist_all.sqlite; returns (dir, digits train, all train)."""
    rng = np.random.default_rng(1234)
    ids = [f"f{i:04d}_{i % 7:02d}" for i in range(testing.NUM_WRITERS_ALL)]
    digits_train = testing.random_writers(rng, ids[: testing.NUM_WRITERS], 10)
    all_train = testing.random_writers(rng, ids, 62)
    splits = {
        "digits_only_train": digits_train,
        # Test splits hold other examples of the same writers; they must never reach a client.
        "digits_only_test": testing.random_writers(rng, ids[: testing.NUM_WRITERS], 10),
        "all_train": all_train,
        "all_test": testing.random_writers(rng, ids, 62),
    }
    directory = tmp_path_factory.mktemp("emnist_cache")
    testing.write_emnist_file(
        str(directory / emnist.CACHE_FILE_NAME), splits, str(tmp_path_factory.mktemp("scratch"))
    )
    return directory, digits_train, all_train


@pytest.fixture(scope="session")
def fewshot_task():
    """Few-shot digits with 8 training clients (aggregation_test.py, faults_test.py)."""
    return registry.get_task("digits_fewshot", num_train_clients=8, num_eval_clients=2)


@pytest.fixture(scope="session")
def small_digits_task():
    """Digits, 8 training clients of at most 2 batches (benchmarking_test, floors_test)."""
    return digits.build_digits(num_train_clients=8, num_eval_clients=1, max_batches=2)


@pytest.fixture(scope="session")
def fewshot_clients(fewshot_task):
    """The first AGGREGATOR_TEST_CLIENTS training clients of `fewshot_task`, packed for round 1.
    Tests must not change them in place."""
    ids = fewshot_task.train_data.client_ids[: testing.AGGREGATOR_TEST_CLIENTS]
    return fewshot_task.train_clients(ids, 1)


@pytest.fixture(scope="module")
def tff_local_execution():
    """TFF's runtime for a test module: a worker we start, stopped (and checked gone) after it.

    Only this fixture's worker is checked: background jobs may have workers of their own."""
    before = set(runtime.live_worker_pids())
    with runtime.local_execution():
        yield
    assert set(runtime.live_worker_pids()) <= before


def _train_reference(scratch):
    root = scratch / "reference"
    completed = testing.run_binary("train", *testing.TINY_FLAGS, f"--root_output_dir={root}")
    assert completed.returncode == 0, completed.stderr
    return root, completed


# Jobs of this file that may start early (see `_start_background_jobs`), by the fixture that
# needs them. A test module declares its own the same way.
BACKGROUND_JOBS = {"train_reference": {"reference": _train_reference}}


@pytest.fixture(scope="session")
def train_reference(background):
    """The uninterrupted tiny run of experiments/train.py: (root_output_dir, testing.Run).

    Shared by train_test.py (the file contract, resume) and train_remote_test.py (remote equals
    local: the rounds trained do not depend on --total_rounds, so its round-3 checkpoint is what
    a 3-round run ends with). `run_binary` has checked that the run's worker is gone.
    """
    return background.results(__name__, "train_reference")["reference"]


# Background jobs at a time: one core is left to the pytest process, whose in-process tests are
# the longest chain of work in the suite (on 2 cores, more jobs at once would only slow it down).
# Each job is one Python process and its TFF worker.
BACKGROUND_WORKERS = max(1, len(os.sched_getaffinity(0)) - 1)


@pytest.fixture(scope="session")
def background(tmp_path_factory):
    jobs = testing.Background(tmp_path_factory, BACKGROUND_WORKERS)
    yield jobs
    jobs.close()


@pytest.fixture(scope="session", autouse=True)
def _children_see_ctrl_c():
    """Lets the tests' children receive Ctrl-C as they would from a user's terminal.

    A runner started in the background (`make test &` without job control) ignores SIGINT, and
    children inherit an ignored signal (a handled one is reset to its default in the child).
    Set here, once and in the main thread, because children are started from other threads
    too, where neither `signal.signal` nor Popen's `preexec_fn` is safe to use.
    """
    previous = signal.getsignal(signal.SIGINT)
    if previous == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    if previous == signal.SIG_IGN:
        signal.signal(signal.SIGINT, previous)


def pytest_collection_modifyitems(items):
    """Runs the modules that declare background jobs last (keeping every other order), so that
    their jobs run while all the other tests do."""
    items.sort(key=lambda item: hasattr(getattr(item, "module", None), "BACKGROUND_JOBS"))


@pytest.fixture(scope="session", autouse=True)
def _start_background_jobs(request, background, _children_see_ctrl_c):
    """Queues the selected tests' expensive jobs at the start of the session, in the order the
    tests will ask for them, so that they run while the in-process tests do.

    A module (or this file) declares `BACKGROUND_JOBS = {fixture name: {job name: job}}`; the
    jobs of a fixture are queued if a selected test of that module uses the fixture.
    """
    for item in request.session.items:
        for module in (getattr(item, "module", None), sys.modules[__name__]):
            for fixture_name, jobs in getattr(module, "BACKGROUND_JOBS", {}).items():
                if fixture_name in item.fixturenames:
                    for name, job in jobs.items():
                        background.start(testing.job_key(module.__name__, fixture_name, name), job)
