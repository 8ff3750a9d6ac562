"""Few-shot sine-wave regression, the benchmark of MAML (arXiv 1703.03400) and Meta-SGD
(arXiv 1707.09835).

Each client is one wave y = A sin(x - phase), A ~ U[0.1, 5.0], phase ~ U[0, pi], with inputs
x ~ U[-5, 5]: `shots` support points and a query set (random points for training clients; for
held-out clients, `eval_query_points` evenly spaced points in [-5, 5], as in the papers' plots).
Clients are generated from their id, so the supply is unbounded and any client is reproducible.

Heterogeneous clients: `shots=(lo, hi)` gives each client its own support size, drawn uniformly
from lo..hi, and `label_noise` adds Gaussian observation noise N(0, sigma^2) to the targets a
client observes (its support, and a training client's query), with sigma fixed or drawn per
client from U[lo, hi]. Held-out clients' query targets stay noise-free: evaluation measures the
true wave. Each draw has its own seed stream, so the defaults (a fixed count, no noise) give
exactly the clients of before.

`data_on_workers=True` generates the clients on the worker (`mfl_tff.data.sinusoid_on_workers`):
the driver draws only the support sizes and sends one int32 code per point, and TensorFlow's
stateless ops draw the waves, points and noise inside the client computation. Same distribution,
other clients: those draws are not numpy's, so the waves and points differ from the default's.
"""

from __future__ import annotations

import collections
import dataclasses
import functools

import numpy as np

from mfl_tff.data import packing, sinusoid_on_workers
from mfl_tff.data import settings as settings_lib
from mfl_tff.data.client_data import ArrayClientData
from mfl_tff.data.settings import TaskSettings
from mfl_tff.data.task import FederatedTask, check_positive
from mfl_tff.models import functional, keras_models

AMPLITUDE = (0.1, 5.0)
PHASE = (0.0, np.pi)
INPUT_RANGE = (-5.0, 5.0)

# The MAML / Meta-SGD regression protocol: 10 shots, one inner step at rate 0.01, Adam 1e-3 as
# the meta-optimizer, a meta-batch of 25 clients. Per-coordinate rates are Meta-SGD's, and mfl
# needs them too: after 1,500 rounds mfl reaches MSE 0.338 per coordinate against 0.761 per layer.
# With the few-shot digits' inner rate of 0.4 instead, meta_sgd ends 1,500 rounds worse after
# adaptation than before it.
SETTINGS = TaskSettings(
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


def wave(client_id: str, seed: int) -> tuple[float, float]:
    """The (amplitude, phase) of a client's wave."""
    rng = np.random.default_rng(packing.client_seed(seed, f"sinusoid/wave/{client_id}"))
    return float(rng.uniform(*AMPLITUDE)), float(rng.uniform(*PHASE))


def support_size(client_id: str, shots: settings_lib.Shots, seed: int) -> int:
    """A client's number of support points: `shots`, or its own draw from lo..hi (inclusive)."""
    if not isinstance(shots, tuple):
        return shots
    rng = np.random.default_rng(packing.client_seed(seed, f"sinusoid/shots/{client_id}"))
    return int(rng.integers(shots[0], shots[1] + 1))


def _noise(
    client_id: str, label_noise: settings_lib.Noise, seed: int, count: int
) -> tuple[float, np.ndarray]:
    """(sigma, `count` draws of N(0, sigma^2)) from the client's own noise stream."""
    rng = np.random.default_rng(packing.client_seed(seed, f"sinusoid/noise/{client_id}"))
    if isinstance(label_noise, tuple):
        sigma = float(rng.uniform(*label_noise))
    else:
        sigma = float(label_noise)
    return sigma, rng.normal(0.0, sigma, size=(count, 1))


def noise_sigma(client_id: str, label_noise: settings_lib.Noise, seed: int) -> float:
    """A client's noise standard deviation: `label_noise`, or its draw from U[lo, hi]."""
    return _noise(client_id, label_noise, seed, 0)[0]


def _client(
    client_id: str,
    *,
    shots: settings_lib.Shots,
    query_points: int,
    evenly_spaced: bool,
    label_noise: settings_lib.Noise,
    seed: int,
) -> collections.OrderedDict:
    amplitude, phase = wave(client_id, seed)
    num_support = support_size(client_id, shots, seed)
    rng = np.random.default_rng(packing.client_seed(seed, f"sinusoid/x/{client_id}"))
    support_x = rng.uniform(*INPUT_RANGE, size=num_support)
    if evenly_spaced:
        query_x = np.linspace(*INPUT_RANGE, num=query_points)
    else:
        query_x = rng.uniform(*INPUT_RANGE, size=query_points)
    x = np.concatenate([support_x, query_x]).astype(np.float32)[:, None]
    y = (amplitude * np.sin(x - phase)).astype(np.float32)
    if label_noise:
        # Held-out clients' (evenly spaced) query targets stay the true wave.
        observed = num_support if evenly_spaced else len(y)
        _, noise = _noise(client_id, label_noise, seed, observed)
        y[:observed] = (y[:observed] + noise).astype(np.float32)
    return collections.OrderedDict(x=x, y=y)


def build_sinusoid(
    *,
    shots: settings_lib.Shots = SETTINGS.shots,
    label_noise: settings_lib.Noise = 0.0,
    query_points: int = 10,
    eval_query_points: int = 100,
    num_train_clients: int = 100_000,
    num_eval_clients: int = 500,
    seed: int = 0,
    data_on_workers: bool = False,
) -> FederatedTask:
    """K-shot sinusoid regression with the papers' MLP (two hidden layers of 40 ReLU units).

    The task's settings are `SETTINGS` (the papers' protocol) with `shots`.

    Args:
      shots: Support points per client (K), or a range (lo, hi): each client draws its own K
        uniformly from lo..hi (from its id and `seed`). Support is packed into one batch of hi
        points; the padding is masked.
      label_noise: Standard deviation sigma of Gaussian noise on the targets a client observes
        (support, and training clients' query; held-out query targets are the true wave), or a
        range (lo, hi): each client draws its sigma from U[lo, hi]. 0: noise-free.
      query_points: Random query points per training client.
      eval_query_points: Evenly spaced query points per held-out client.
      num_train_clients: Size of the training population.
      num_eval_clients: Held-out clients.
      seed: Seed of the waves, the points, the packing and the initial model.
      data_on_workers: Generate the clients on the worker (`sinusoid_on_workers.SineSource`):
        the driver sends int32 codes of (client, point) and no targets. The same distribution
        and support sizes, but other waves and points than the default (TensorFlow's stream).
    """
    shots = settings_lib.check_shots(shots)
    label_noise = settings_lib.check_noise(label_noise)
    check_positive(
        query_points=query_points,
        eval_query_points=eval_query_points,
        num_train_clients=num_train_clients,
        num_eval_clients=num_eval_clients,
    )
    batch = settings_lib.max_shots(shots)
    source = None
    if data_on_workers:
        source = sinusoid_on_workers.SineSource(
            seed=seed,
            amplitude=AMPLITUDE,
            phase=PHASE,
            input_range=INPUT_RANGE,
            max_support=batch,
            query_points=query_points,
            eval_query_points=eval_query_points,
            label_noise=label_noise,
            num_train_clients=num_train_clients,
            num_eval_clients=num_eval_clients,
        )

        def make(client_id, query_points, evenly_spaced):
            del query_points, evenly_spaced  # the source's populations have them
            return source.client_arrays(client_id, support_size(client_id, shots, seed))

    else:
        make = functools.partial(_client, shots=shots, label_noise=label_noise, seed=seed)
    if isinstance(shots, tuple):
        # Every client's support is its first points, however many it drew; the query is the rest.
        train_split = packing.SplitSpec(query_size=query_points, shuffle=False)
        eval_split = packing.SplitSpec(query_size=eval_query_points, shuffle=False)
    else:
        train_split = eval_split = packing.SplitSpec(support_size=shots, shuffle=False)
    return FederatedTask(
        name="sinusoid",
        train_data=ArrayClientData(
            [f"train/{i:07d}" for i in range(num_train_clients)],
            functools.partial(make, query_points=query_points, evenly_spaced=False),
        ),
        eval_data=ArrayClientData(
            [f"eval/{i:07d}" for i in range(num_eval_clients)],
            functools.partial(make, query_points=eval_query_points, evenly_spaced=True),
        ),
        model_fn=functools.partial(
            functional.functional_model,
            functools.partial(keras_models.mlp, (1,), (40, 40), 1),
            x_shape=(1,),
            problem="regression",
            seed=seed,
        ),
        problem="regression",
        train_split=train_split,
        train_pack=packing.PackSpec(batch, 1, -(-query_points // batch)),
        eval_split=eval_split,
        eval_pack=packing.PackSpec(batch, 1, -(-eval_query_points // batch)),
        seed=seed,
        settings=dataclasses.replace(SETTINGS, shots=shots),
        example_source=source,
    )
