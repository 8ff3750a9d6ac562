"""Federated EMNIST: real handwritten characters, one client per writer, read offline through TFF.

Data set: EMNIST (Cohen et al., "EMNIST: an extension of MNIST to handwritten letters",
arXiv 1702.05373), grouped by writer as in LEAF (Caldas et al., "LEAF: A Benchmark for Federated
Settings", arXiv 1812.01097) and published by TensorFlow Federated as
`tff.simulation.datasets.emnist`: 3,383 writers and 10 digit classes (`only_digits=True`), or 3,400
writers and 62 classes (digits, upper- and lower-case letters).

Loading goes through TFF's own `tff.simulation.datasets.emnist.load_data`, which reads the SQLite
file `<cache_dir>/emnist_all.sqlite` (one file for both `only_digits` settings; `cache_dir` defaults
to `~/.tff`) and downloads it when it is missing. These machines have no network, so `build_emnist`
checks for the file first and raises a one-line `FileNotFoundError` saying where to put it, instead
of letting TFF try a download. The file is TFF's published archive, decompressed:

    xz -d emnist_all.sqlite.lzma   # from ARCHIVE_URL, fetched on a machine with network

Clients. TFF splits each writer's examples into a `train` and a `test` part, so its test split holds
the same writers. Meta-learning needs held-out clients that were never trained on, so we use only
TFF's train split and divide its writers: a seeded permutation of the (sorted) writer ids, whose
last `num_eval_clients` writers are held out. Every client, training or held out, is one writer
with all of that writer's examples from TFF's train split. Elements are mapped to this project's
convention, `x` = the float32 [28, 28] pixels exactly as TFF stores them (1.0 is background, 0.0
ink) and `y` = the int32 label (0-9 digits, 10-35 upper case, 36-61 lower case).

Data on the workers (`data_on_workers=True`, `mfl_tff.data.emnist_rows`): the same clients, with
`x` the int32 SQLite row id of each example, and the client computation reads the pixels of those
rows on the worker, from the same file at the same path (or `worker_data_cache_dir`).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import os
from collections.abc import Callable, Sequence
from typing import Optional, Union

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from mfl_tff.data import emnist_rows, packing
from mfl_tff.data.client_data import ArrayClientData
from mfl_tff.data.settings import TaskSettings
from mfl_tff.data.task import FederatedTask, check_positive
from mfl_tff.models import functional, keras_models

IMAGE_SHAPE = (28, 28)
MODELS = ("cnn", "mlp")
# The name and source TFF's emnist.load_data uses (its origin URL minus `.lzma`). A test checks
# that TFF still reads exactly this path, so a TFF upgrade that renames it cannot go unnoticed.
CACHE_FILE_NAME = "emnist_all.sqlite"
ARCHIVE_URL = "https://storage.googleapis.com/tff-datasets-public/emnist_all.sqlite.lzma"

PathLike = Union[str, os.PathLike]

# Not measured here (the data is not on these machines); taken from the literature. The client
# rate 10^-1.5 ~= 0.03 is the best FedAvg client SGD rate for a CNN of two conv layers (32 and 64
# filters) on federated EMNIST in Reddi et al., "Adaptive Federated Optimization" (arXiv
# 2003.00295), which samples 10 writers per round. A writer of the digits split holds about 100
# examples, half of them support, so 5 inner steps of 10 are about one pass over its support set.
# Per-layer rates and Adam 1e-3 as in the few-shot digits protocol.
SETTINGS = TaskSettings(
    inner_lr=0.03,
    inner_steps=5,
    local_epochs=1,
    outer_lr=0.01,
    meta_optimizer="adam",
    meta_lr=1e-3,
    alpha_granularity="per_layer",
    clients_per_round=10,
)


def num_classes(only_digits: bool) -> int:
    """10 classes for digits only, 62 for digits and letters."""
    return 10 if only_digits else 62


def default_cache_dir() -> str:
    """The directory TFF's loader reads when `cache_dir` is None: `~/.tff`."""
    return os.path.join(os.path.expanduser("~"), ".tff")


def cache_file_path(data_cache_dir: Optional[PathLike] = None) -> str:
    """Path of the SQLite file TFF's `emnist.load_data(cache_dir=data_cache_dir)` reads."""
    directory = default_cache_dir() if data_cache_dir is None else os.fspath(data_cache_dir)
    # TFF joins the path without expanding `~`; we expand it so that '~/data' means what users mean.
    return os.path.join(os.path.expanduser(directory), CACHE_FILE_NAME)


def check_cache_file(data_cache_dir: Optional[PathLike] = None) -> str:
    """Returns the cache file's path, or raises if it is missing (TFF would then download it).

    Raises:
      FileNotFoundError: With a one-line message naming the file and the directory to put it in.
    """
    path = cache_file_path(data_cache_dir)
    if not os.path.isfile(path):
        directory = os.path.dirname(path)
        raise FileNotFoundError(
            f"Federated EMNIST data not found: place the file {CACHE_FILE_NAME} in the directory "
            f"{directory} (or pass data_cache_dir); make it from TFF's published archive "
            f"{ARCHIVE_URL} with `xz -d {CACHE_FILE_NAME}.lzma` (no download is attempted here)."
        )
    return path


def load_train_writers(
    *, only_digits: bool = True, data_cache_dir: Optional[PathLike] = None
) -> tff.simulation.datasets.ClientData:
    """TFF's EMNIST train split, one client per writer, elements mapped to `x`/`y`.

    Args:
      only_digits: Digits only (10 classes) or digits and letters (62 classes).
      data_cache_dir: Directory holding `emnist_all.sqlite`; None is TFF's default, `~/.tff`.

    Returns:
      A `tff.simulation.datasets.ClientData` whose elements are
      `OrderedDict(x=float32 [28, 28], y=int32 [])`.

    Raises:
      FileNotFoundError: If the cache file is missing (nothing is downloaded).
      ValueError: If the file has no writers in the splits TFF reads.
    """
    path = check_cache_file(data_cache_dir)
    try:
        train, _ = tff.simulation.datasets.emnist.load_data(
            only_digits=only_digits, cache_dir=os.path.dirname(path)
        )
    except StopIteration as e:
        # TFF peeks at the first client of each split and so fails with a bare StopIteration on a
        # file that lacks a split; say which file and splits instead.
        prefix = "digits_only" if only_digits else "all"
        raise ValueError(
            f"{path} has no writers in split '{prefix}_train' or '{prefix}_test'; "
            "it must be TFF's complete emnist_all.sqlite."
        ) from e
    return train.preprocess(_to_xy)


def _to_xy(dataset: tf.data.Dataset) -> tf.data.Dataset:
    return dataset.map(
        lambda e: collections.OrderedDict(
            x=tf.cast(e["pixels"], tf.float32), y=tf.cast(e["label"], tf.int32)
        )
    )


def split_writers(
    writer_ids: Sequence[str],
    *,
    num_train_clients: Optional[int],
    num_eval_clients: int,
    seed: int,
) -> tuple[list[str], list[str]]:
    """Divides writers into disjoint training and held-out clients, as a function of the seed only.

    Args:
      writer_ids: All writer ids (their order does not matter; they are sorted first).
      num_train_clients: Training writers; None takes every writer that is not held out.
      num_eval_clients: Held-out writers: the last ones of a seeded permutation.
      seed: Seed of the permutation.

    Returns:
      `(train_ids, eval_ids)`, each sorted.

    Raises:
      ValueError: If a count is below 1 or there are not enough writers.
    """
    check_positive(num_eval_clients=num_eval_clients)
    if num_train_clients is not None:
        check_positive(num_train_clients=num_train_clients)
    writers = sorted(writer_ids)
    wanted = num_eval_clients + (1 if num_train_clients is None else num_train_clients)
    if wanted > len(writers):
        train_text = "at least 1" if num_train_clients is None else str(num_train_clients)
        raise ValueError(
            f"EMNIST has {len(writers)} writers, fewer than num_eval_clients={num_eval_clients} "
            f"plus {train_text} training clients; lower num_eval_clients or num_train_clients."
        )
    # Sorting first makes the split independent of the order the database returns ids in.
    rng = np.random.default_rng(packing.client_seed(seed, "emnist/writers"))
    order = [writers[i] for i in rng.permutation(len(writers))]
    eval_ids = order[len(order) - num_eval_clients :]
    rest = order[: len(order) - num_eval_clients]
    train_ids = rest if num_train_clients is None else rest[:num_train_clients]
    return sorted(train_ids), sorted(eval_ids)


def _model_fn(
    model: str, num_outputs: int, seed: int
) -> Callable[[], tff.learning.models.FunctionalModel]:
    if model == "cnn":
        keras_fn = functools.partial(
            keras_models.small_cnn, IMAGE_SHAPE, num_outputs, filters=(32, 64)
        )
    elif model == "mlp":
        keras_fn = functools.partial(keras_models.mlp, IMAGE_SHAPE, (200, 200), num_outputs)
    else:
        raise ValueError(f"Unknown EMNIST model {model!r}; choose one of {', '.join(MODELS)}.")
    return functools.partial(
        functional.functional_model,
        keras_fn,
        x_shape=IMAGE_SHAPE,
        problem="classification",
        seed=seed,
    )


def build_emnist(
    *,
    only_digits: bool = True,
    data_cache_dir: Optional[PathLike] = None,
    num_train_clients: Optional[int] = None,
    num_eval_clients: int = 100,
    model: str = "cnn",
    batch_size: int = 10,
    max_batches: int = 10,
    shots: Optional[int] = None,
    seed: int = 0,
    data_on_workers: bool = False,
    worker_data_cache_dir: Optional[PathLike] = None,
) -> FederatedTask:
    """Federated EMNIST with writers as clients and unseen writers held out.

    Args:
      only_digits: Digits only (10 classes) or digits and letters (62 classes).
      data_cache_dir: Directory holding `emnist_all.sqlite`; None is TFF's default, `~/.tff`.
      num_train_clients: Training writers; None uses every writer that is not held out.
      num_eval_clients: Held-out writers, never used in training.
      model: 'cnn' (two conv blocks, 32 and 64 filters) or 'mlp' (200-200).
      batch_size: Examples per packed batch.
      max_batches: Cap on batches for support and for query (bounds padding and local steps).
      shots: Support examples per client (the rest is query); None splits each client in half.
      seed: Seed of the writer split, the packing and the initial model.
      data_on_workers: Send each example as its int32 SQLite row id and read the pixels on the
        worker (`mfl_tff.data.emnist_rows`): the same clients, packed the same. Each worker needs
        the same `emnist_all.sqlite` at the same path as the driver (or in
        `worker_data_cache_dir`).
      worker_data_cache_dir: With `data_on_workers`, the directory holding `emnist_all.sqlite` on
        the workers, if not the driver's (not checked here: a worker without the file fails the
        round with an error naming the path).

    Returns:
      A `FederatedTask` whose `train_data` and `eval_data` are TFF `ClientData` over disjoint
      writers, elements `x` (float32 [28, 28], or with `data_on_workers` the int32 row id) and
      `y` (int32).

    Raises:
      FileNotFoundError: If `emnist_all.sqlite` is not in the cache directory.
      ValueError: If an option is invalid, there are not enough writers, or (with
        `data_on_workers`) the file's row ids do not fit int32.
    """
    # Validate everything cheap before touching the (large) data file.
    check_positive(
        num_eval_clients=num_eval_clients, batch_size=batch_size, max_batches=max_batches
    )
    if shots is not None and not isinstance(shots, (int, np.integer)):
        raise ValueError(
            f"emnist takes one support size per client (shots=N), got {shots!r}; ranges are "
            "for sinusoid and digits_fewshot."
        )
    for name, value in (("num_train_clients", num_train_clients), ("shots", shots)):
        if value is not None:
            check_positive(**{name: value})
    if worker_data_cache_dir is not None and not data_on_workers:
        raise ValueError("worker_data_cache_dir applies only with data_on_workers=True.")
    model_fn = _model_fn(model, num_classes(only_digits), seed)
    split = packing.SplitSpec(support_size=shots)
    pack = packing.PackSpec(batch_size, max_batches, max_batches)

    writers = load_train_writers(only_digits=only_digits, data_cache_dir=data_cache_dir)
    train_ids, eval_ids = split_writers(
        writers.client_ids,
        num_train_clients=num_train_clients,
        num_eval_clients=num_eval_clients,
        seed=seed,
    )
    source = None
    if data_on_workers:
        path = cache_file_path(data_cache_dir)
        emnist_rows.check_row_ids(path)
        # Codes are a few bytes per example: kept, so later rounds' splits query nothing.
        codes = functools.lru_cache(maxsize=None)(
            functools.partial(
                emnist_rows.client_codes, path, f"{'digits_only' if only_digits else 'all'}_train"
            )
        )
        train_data, eval_data = ArrayClientData(train_ids, codes), ArrayClientData(eval_ids, codes)
        if worker_data_cache_dir is not None:
            path = cache_file_path(worker_data_cache_dir)
        source = emnist_rows.EmnistRows(path)
    else:
        # Subsets through TFF's own constructor share the writers' dataset function, so the
        # clients stay ordinary (serializable) ClientData.
        from_ids = tff.simulation.datasets.ClientData.from_clients_and_tf_fn
        train_data = from_ids(train_ids, writers.serializable_dataset_fn)
        eval_data = from_ids(eval_ids, writers.serializable_dataset_fn)
    return FederatedTask(
        name="emnist",
        train_data=train_data,
        eval_data=eval_data,
        model_fn=model_fn,
        problem="classification",
        train_split=split,
        train_pack=pack,
        seed=seed,
        settings=dataclasses.replace(SETTINGS, shots=shots),
        example_source=source,
    )
