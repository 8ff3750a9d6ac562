"""Tasks on scikit-learn's bundled handwritten digits (1,797 real 8x8 images; no network needed).

* `digits`: the pool split across clients with Dirichlet label skew and unequal client sizes.
* `digits_fewshot`: MAML's N-way K-shot protocol (Finn et al., arXiv 1703.03400) on real images.
  Each client owns `ways` digit classes drawn at random and its own random mapping of them to local
  labels 0..ways-1, so no single global model is right for every client. Training and held-out
  clients draw from disjoint image pools; clients are generated from their id, so the supply is
  unbounded and any client is reproducible.

Both take `data_on_workers=True` (`FederatedTask.example_source`): every client is then the same
draws as by default, with `x` the int32 indices of its images in `load_digits()`, which becomes
the task's `FeaturePool`; the computations gather the images on the worker.
"""

from __future__ import annotations

import collections
import dataclasses
import functools

import numpy as np
from sklearn import datasets as sk_datasets

from mfl_tff.data import example_sources, packing, partition
from mfl_tff.data import settings as settings_lib
from mfl_tff.data.client_data import ArrayClientData
from mfl_tff.data.settings import TaskSettings
from mfl_tff.data.task import FederatedTask, check_positive
from mfl_tff.models import functional, keras_models

NUM_CLASSES = 10
IMAGE_SHAPE = (8, 8)

# The README's "does adaptation harm?" benchmark on Dirichlet digits, where every algorithm
# adapted without losing accuracy: 5 inner and fine-tuning steps at rate 0.1 (Per-FedAvg's beta
# 0.1 too), per-layer rates, Adam 1e-3, 20 of the 80 training clients per round.
DIGITS_SETTINGS = TaskSettings(
    inner_lr=0.1,
    inner_steps=5,
    local_epochs=1,
    outer_lr=0.1,
    meta_optimizer="adam",
    meta_lr=1e-3,
    alpha_granularity="per_layer",
    clients_per_round=20,
)

# 5-way 5-shot as in MAML: 5 inner and adaptation steps at rate 0.4, per-layer rates, Adam 1e-3,
# 25 clients per round. These are exactly the training binary's defaults from before tasks carried
# settings, so fixed-seed results on this task do not change.
FEWSHOT_SETTINGS = TaskSettings(
    inner_lr=0.4,
    inner_steps=5,
    local_epochs=1,
    outer_lr=0.01,
    meta_optimizer="adam",
    meta_lr=1e-3,
    alpha_granularity="per_layer",
    clients_per_round=25,
    shots=5,
)


@functools.lru_cache(maxsize=1)
def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """All 1,797 images scaled to [0, 1] as float32 [N, 8, 8], and int32 labels."""
    bunch = sk_datasets.load_digits()
    return (bunch.images / 16.0).astype(np.float32), bunch.target.astype(np.int32)


def _model_fn(model: str, num_classes: int, seed: int):
    if model == "mlp":
        keras_fn = functools.partial(keras_models.mlp, IMAGE_SHAPE, (64, 64), num_classes)
    elif model == "cnn":
        keras_fn = functools.partial(keras_models.small_cnn, IMAGE_SHAPE, num_classes)
    else:
        raise ValueError(f"Unknown digits model {model!r}; choose 'mlp' or 'cnn'.")
    return functools.partial(
        functional.functional_model,
        keras_fn,
        x_shape=IMAGE_SHAPE,
        problem="classification",
        seed=seed,
    )


def build_digits(
    *,
    num_train_clients: int = 80,
    num_eval_clients: int = 20,
    dirichlet_concentration: float = 0.5,
    shots: int | None = None,
    batch_size: int = 10,
    max_batches: int = 4,
    model: str = "mlp",
    seed: int = 0,
    data_on_workers: bool = False,
) -> FederatedTask:
    """Digits split across clients with Dirichlet(`dirichlet_concentration`) label skew.

    Args:
      num_train_clients: Training clients.
      num_eval_clients: Held-out clients (their examples are never in a training client).
      dirichlet_concentration: Label-skew concentration; smaller is more skewed.
      shots: Support examples per client (the rest is query); None splits each client in half.
      batch_size: Examples per packed batch.
      max_batches: Cap on batches for support and for query (bounds padding and local steps).
      model: 'mlp' (64-64) or 'cnn'.
      seed: Seed of the partition, the packing and the initial model.
      data_on_workers: Pool mode: clients hold image indices, the task all 1,797 images as its
        `FeaturePool` (the same clients, gathered on the worker).
    """
    check_positive(
        num_train_clients=num_train_clients,
        num_eval_clients=num_eval_clients,
        batch_size=batch_size,
        max_batches=max_batches,
    )
    if shots is not None:
        shots = settings_lib.check_shots(shots)
        if isinstance(shots, tuple):
            raise ValueError(
                f"digits takes one shots count for every client, got the range {shots}; pass an "
                "integer (ranges are for digits_fewshot and sinusoid)."
            )
    images, labels = load_digits()
    rng = np.random.default_rng(packing.client_seed(seed, "digits/partition"))
    parts = partition.dirichlet_label_partition(
        labels, num_train_clients + num_eval_clients, dirichlet_concentration, rng
    )
    clients = collections.OrderedDict()
    for i, idx in enumerate(parts):
        cid = f"train/{i:05d}" if i < num_train_clients else f"eval/{i - num_train_clients:05d}"
        x = idx.astype(np.int32) if data_on_workers else images[idx]
        clients[cid] = collections.OrderedDict(x=x, y=labels[idx])
    train_ids = [c for c in clients if c.startswith("train/")]
    eval_ids = [c for c in clients if c.startswith("eval/")]
    return FederatedTask(
        name="digits",
        train_data=ArrayClientData(train_ids, clients.__getitem__),
        eval_data=ArrayClientData(eval_ids, clients.__getitem__),
        model_fn=_model_fn(model, NUM_CLASSES, seed),
        problem="classification",
        train_split=packing.SplitSpec(support_size=shots),
        train_pack=packing.PackSpec(batch_size, max_batches, max_batches),
        seed=seed,
        settings=dataclasses.replace(DIGITS_SETTINGS, shots=shots),
        example_source=example_sources.FeaturePool(images) if data_on_workers else None,
    )


def fewshot_pools(seed: int, eval_fraction: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint train/held-out image index pools, stratified by class."""
    _, labels = load_digits()
    rng = np.random.default_rng(packing.client_seed(seed, "digits_fewshot/pools"))
    train, held_out = [], []
    for c in range(NUM_CLASSES):
        idx = rng.permutation(np.flatnonzero(labels == c))
        cut = int(round(len(idx) * eval_fraction))
        held_out.append(idx[:cut])
        train.append(idx[cut:])
    return np.concatenate(train), np.concatenate(held_out)


def fewshot_shots(client_id: str, shots: settings_lib.Shots, seed: int) -> int:
    """A client's shots per class: `shots`, or its own draw from lo..hi (inclusive)."""
    if not isinstance(shots, tuple):
        return shots
    rng = np.random.default_rng(packing.client_seed(seed, f"digits_fewshot/shots/{client_id}"))
    return int(rng.integers(shots[0], shots[1] + 1))


def _fewshot_client(
    client_id: str,
    *,
    pool: np.ndarray,
    ways: int,
    shots: settings_lib.Shots,
    query_shots: int,
    seed: int,
    data_on_workers: bool = False,
) -> collections.OrderedDict:
    images, labels = load_digits()
    num_shots = fewshot_shots(client_id, shots, seed)
    rng = np.random.default_rng(packing.client_seed(seed, f"digits_fewshot/{client_id}"))
    classes = rng.choice(NUM_CLASSES, size=ways, replace=False)  # position = local label
    support, query = [], []
    for local_label, c in enumerate(classes):
        idx = rng.choice(pool[labels[pool] == c], size=num_shots + query_shots, replace=False)
        support += [(i, local_label) for i in idx[:num_shots]]
        query += [(i, local_label) for i in idx[num_shots:]]
    # Support first: the task's SplitSpec(shuffle=False) cuts exactly here.
    order = np.array([i for i, _ in support + query])
    local = np.array([lab for _, lab in support + query], dtype=np.int32)
    x = order.astype(np.int32) if data_on_workers else images[order]
    return collections.OrderedDict(x=x, y=local)


def build_digits_fewshot(
    *,
    ways: int = 5,
    shots: settings_lib.Shots = FEWSHOT_SETTINGS.shots,
    query_shots: int = 10,
    num_train_clients: int = 20_000,
    num_eval_clients: int = 500,
    model: str = "mlp",
    seed: int = 0,
    data_on_workers: bool = False,
) -> FederatedTask:
    """N-way K-shot classification of real digits, one task per client.

    Args:
      ways: Classes per client (N).
      shots: Support examples per class (K), or a range (lo, hi): each client draws its own K
        uniformly from lo..hi (from its id and `seed`). Support is packed into one batch of
        ways * hi examples; the padding is masked.
      query_shots: Query examples per class.
      num_train_clients: Size of the training population (clients are generated from their id).
      num_eval_clients: Held-out clients, drawn from images no training client sees.
      model: 'mlp' (64-64) or 'cnn'.
      seed: Seed of the pools, the clients, the packing and the initial model.
      data_on_workers: Pool mode: clients hold image indices, the task all 1,797 images as its
        `FeaturePool` (the same clients, gathered on the worker).
    """
    shots = settings_lib.check_shots(shots)
    check_positive(
        ways=ways,
        query_shots=query_shots,
        num_train_clients=num_train_clients,
        num_eval_clients=num_eval_clients,
    )
    if ways > NUM_CLASSES:
        raise ValueError(f"ways must be at most {NUM_CLASSES}, got {ways}.")
    train_pool, eval_pool = fewshot_pools(seed)
    _, labels = load_digits()
    smallest = min(np.sum(labels[eval_pool] == c) for c in range(NUM_CLASSES))
    most_shots = settings_lib.max_shots(shots)
    if most_shots + query_shots > smallest:
        which = "shots" if most_shots == shots else "the shots range's hi"
        raise ValueError(
            f"{which} + query_shots = {most_shots + query_shots} exceeds the {smallest} held-out "
            "images of the rarest digit; lower them."
        )
    make = functools.partial(
        _fewshot_client,
        ways=ways,
        shots=shots,
        query_shots=query_shots,
        seed=seed,
        data_on_workers=data_on_workers,
    )
    train_ids = [f"train/{i:07d}" for i in range(num_train_clients)]
    eval_ids = [f"eval/{i:07d}" for i in range(num_eval_clients)]
    batch = ways * most_shots
    if isinstance(shots, tuple):
        # Every client's support is its first ways * K examples, whatever K it drew.
        split = packing.SplitSpec(query_size=ways * query_shots, shuffle=False)
    else:
        split = packing.SplitSpec(support_size=batch, shuffle=False)
    return FederatedTask(
        name="digits_fewshot",
        train_data=ArrayClientData(train_ids, functools.partial(make, pool=train_pool)),
        eval_data=ArrayClientData(eval_ids, functools.partial(make, pool=eval_pool)),
        model_fn=_model_fn(model, ways, seed),
        problem="classification",
        train_split=split,
        train_pack=packing.PackSpec(batch, 1, -(-ways * query_shots // batch)),
        seed=seed,
        settings=dataclasses.replace(FEWSHOT_SETTINGS, shots=shots),
        example_source=(example_sources.FeaturePool(load_digits()[0]) if data_on_workers else None),
    )
