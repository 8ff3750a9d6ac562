"""LEAF/FedProx Synthetic(alpha, beta) (Li et al., "Federated Optimization in Heterogeneous
Networks", arXiv 1812.06127): softmax regression data, 60-dim inputs, 10 classes.

Client k draws u_k ~ N(0, alpha) and B_k ~ N(0, beta); its model W_k, b_k ~ N(u_k, 1) and its input
mean v_k ~ N(B_k, 1); inputs x ~ N(v_k, diag(j^-1.2)) and labels y = argmax(W_k x + b_k). Alpha sets
how much the clients' models differ, beta how much their inputs do. Client sizes follow LEAF's power
law, lognormal(4, 2) + 50, capped at `max_examples`.

`data_on_workers=True` generates the clients on the worker (`mfl_tff.data.synthetic_on_workers`):
the driver draws only the client sizes (the default's) and sends one int32 code per example, and
TensorFlow's stateless ops draw the models, inputs and labels inside the client computation. Same
distribution, other clients: those draws are not numpy's, so they differ from the default's.
"""

from __future__ import annotations

import collections
import functools

import numpy as np

from mfl_tff.data import packing, synthetic_on_workers
from mfl_tff.data.client_data import ArrayClientData
from mfl_tff.data.settings import TaskSettings
from mfl_tff.data.task import FederatedTask, check_positive
from mfl_tff.models import functional, keras_models

DIM = 60
NUM_CLASSES = 10

# FedProx's SGD rate for this data (0.01, with batches of 10 and 10 clients per round, as here).
# Measured (200 rounds x 10 clients, 30 held-out clients, seed 0, accuracy after 5 adaptation
# steps): at 0.01 fedavg 0.773, maml 0.797, mfl 0.807; at 0.05 0.802, 0.795, 0.795, the same within
# noise; at 0.2 fedavg and maml drop to 0.73-0.75 and fluctuate. 5 inner steps of 10 are about one
# pass over a median client's support set (about 50 examples). Per-layer rates and Adam 1e-3 as in
# the few-shot digits protocol.
SETTINGS = TaskSettings(
    inner_lr=0.01,
    inner_steps=5,
    local_epochs=1,
    outer_lr=0.01,
    meta_optimizer="adam",
    meta_lr=1e-3,
    alpha_granularity="per_layer",
    clients_per_round=10,
)


def _size(rng: np.random.Generator, max_examples: int) -> int:
    return min(int(rng.lognormal(4, 2)) + 50, max_examples)


def client_size(client_id: str, max_examples: int, seed: int) -> int:
    """A client's number of examples: its first draw, LEAF's lognormal(4, 2) + 50, capped."""
    rng = np.random.default_rng(packing.client_seed(seed, f"synthetic/{client_id}"))
    return _size(rng, max_examples)


def _client(
    client_id: str, *, alpha: float, beta: float, max_examples: int, seed: int
) -> collections.OrderedDict:
    rng = np.random.default_rng(packing.client_seed(seed, f"synthetic/{client_id}"))
    size = _size(rng, max_examples)
    u = rng.normal(0.0, np.sqrt(alpha))
    b_mean = rng.normal(0.0, np.sqrt(beta))
    w = rng.normal(u, 1.0, size=(DIM, NUM_CLASSES))
    bias = rng.normal(u, 1.0, size=NUM_CLASSES)
    v = rng.normal(b_mean, 1.0, size=DIM)
    scale = np.arange(1, DIM + 1) ** -0.6  # standard deviations: covariance diag j^-1.2
    x = (v + rng.normal(size=(size, DIM)) * scale).astype(np.float32)
    y = np.argmax(x @ w + bias, axis=1).astype(np.int32)
    return collections.OrderedDict(x=x, y=y)


def build_synthetic(
    *,
    alpha: float = 1.0,
    beta: float = 1.0,
    num_train_clients: int = 100,
    num_eval_clients: int = 30,
    max_examples: int = 400,
    batch_size: int = 10,
    max_batches: int = 10,
    seed: int = 0,
    data_on_workers: bool = False,
) -> FederatedTask:
    """Synthetic(alpha, beta) with a softmax-regression model.

    Args:
      alpha: Spread of the clients' models.
      beta: Spread of the clients' inputs.
      num_train_clients: Training clients.
      num_eval_clients: Held-out clients.
      max_examples: Cap on a client's size (LEAF's power law has a long tail).
      batch_size: Examples per packed batch.
      max_batches: Cap on batches for support and for query.
      seed: Seed of the clients, the packing and the initial model.
      data_on_workers: Generate the clients on the worker (`synthetic_on_workers`): the driver
        sends int32 codes of (client, example) and no labels. The same distribution and client
        sizes, but other clients than the default (TensorFlow's stream).
    """
    if alpha < 0 or beta < 0:
        raise ValueError(f"alpha and beta must be >= 0, got {alpha}, {beta}.")
    check_positive(
        num_train_clients=num_train_clients,
        num_eval_clients=num_eval_clients,
        batch_size=batch_size,
        max_batches=max_batches,
    )
    if max_examples < 2:
        raise ValueError(f"max_examples must be >= 2, got {max_examples}.")
    source = None
    if data_on_workers:
        source = synthetic_on_workers.SyntheticSource(
            seed=seed,
            alpha=alpha,
            beta=beta,
            dim=DIM,
            num_classes=NUM_CLASSES,
            max_examples=max_examples,
            num_train_clients=num_train_clients,
            num_eval_clients=num_eval_clients,
        )

        def make(client_id):
            return source.client_arrays(client_id, client_size(client_id, max_examples, seed))

    else:
        make = functools.partial(
            _client, alpha=alpha, beta=beta, max_examples=max_examples, seed=seed
        )
    return FederatedTask(
        name="synthetic",
        train_data=ArrayClientData([f"train/{i:05d}" for i in range(num_train_clients)], make),
        eval_data=ArrayClientData([f"eval/{i:05d}" for i in range(num_eval_clients)], make),
        model_fn=functools.partial(
            functional.functional_model,
            functools.partial(keras_models.softmax_regression, DIM, NUM_CLASSES),
            x_shape=(DIM,),
            problem="classification",
            seed=seed,
        ),
        problem="classification",
        train_split=packing.SplitSpec(support_fraction=0.5),
        train_pack=packing.PackSpec(batch_size, max_batches, max_batches),
        seed=seed,
        settings=SETTINGS,
        example_source=source,
    )
