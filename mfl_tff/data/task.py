"""`FederatedTask`: train clients, held-out clients, a model and a metric, packed on demand.

A task is what binaries and users pick by name. Its clients are `tff.simulation.datasets.ClientData`
(train and held-out evaluation clients, disjoint), each client is packed ONCE into the padded-tensor
format of `mfl_tff.data.packing`, and packed clients are cached so later rounds reuse them.

A task with an `example_source` has its data built on the workers: its clients' `x` are int32
codes (rows of a pool, of a file, or draws of a generator), packed like features, and the
computations built for it (`builders.build_algorithm`, the personalization evaluation) turn the
codes into examples on the worker (`mfl_tff.data.example_sources`), so the driver sends codes
instead of features every round.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
from collections.abc import Callable, Sequence
from typing import Optional

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from mfl_tff.data import client_data as client_data_lib
from mfl_tff.data import example_sources, packing
from mfl_tff.data.settings import TaskSettings

PROBLEMS = ("classification", "regression")


def check_positive(**values: int) -> None:
    """Raises ValueError naming the first option that is below 1."""
    for name, value in values.items():
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}.")


@dataclasses.dataclass
class FederatedTask:
    """A federated (meta-)learning task.

    Attributes:
      name: Registry name.
      train_data: Clients used in training.
      eval_data: Held-out clients, never seen in training.
      model_fn: No-argument callable returning a `tff.learning.models.FunctionalModel`.
      problem: 'classification' (metric: accuracy) or 'regression' (metric: mse).
      train_split: Support/query split of training clients.
      train_pack: Packed shapes of training clients.
      eval_split: Split of held-out clients (defaults to `train_split`).
      eval_pack: Packed shapes of held-out clients (defaults to `train_pack`).
      seed: Seed the data (and the packing) were drawn with.
      cache_size: Most packed clients kept in memory (unbounded generated tasks can have millions).
      settings: The hyperparameters the task's protocol trains with; binaries fill their unset
        flags from them.
      example_source: Data built on the workers (None: off): an
        `mfl_tff.data.example_sources.ExampleSource`, e.g. a `FeaturePool` of the features every
        client's examples are rows of. The clients' `x` are then integer codes, packed as int32
        [S, B] / [Q, B], and the client work builds the examples from them on the worker
        (`mfl_tff.data.example_sources.build_on_worker`).
    """

    name: str
    train_data: tff.simulation.datasets.ClientData
    eval_data: tff.simulation.datasets.ClientData
    model_fn: Callable[[], tff.learning.models.FunctionalModel]
    problem: str
    train_split: packing.SplitSpec
    train_pack: packing.PackSpec
    eval_split: Optional[packing.SplitSpec] = None
    eval_pack: Optional[packing.PackSpec] = None
    seed: int = 0
    cache_size: int = 50_000
    settings: TaskSettings = dataclasses.field(default_factory=TaskSettings)
    example_source: Optional[example_sources.ExampleSource] = dataclasses.field(
        default=None, repr=False, compare=False
    )
    _cache: collections.OrderedDict = dataclasses.field(
        default_factory=collections.OrderedDict, init=False, repr=False
    )
    # The round loop packs the next call's clients in a thread while evaluation packs held-out
    # clients in the main one; both go through `_cache`.
    _cache_lock: threading.Lock = dataclasses.field(
        default_factory=threading.Lock, init=False, repr=False, compare=False
    )

    def __post_init__(self):
        if not isinstance(self.settings, TaskSettings):
            raise TypeError(f"settings must be a TaskSettings, got {type(self.settings).__name__}.")
        if self.problem not in PROBLEMS:
            raise ValueError(f"problem must be one of {PROBLEMS}, got {self.problem!r}.")
        if self.example_source is not None:
            if not isinstance(self.example_source, example_sources.ExampleSource):
                raise TypeError(
                    "example_source must be an mfl_tff.data.example_sources.ExampleSource, got "
                    f"{type(self.example_source).__name__}."
                )
            for data in (self.train_data, self.eval_data):
                example_sources.check_codes(data.element_type_structure)
        self.eval_split = self.eval_split or self.train_split
        self.eval_pack = self.eval_pack or self.train_pack
        overlap = set(self.train_data.client_ids[:100_000]) & set(self.eval_data.client_ids)
        if overlap:
            raise ValueError(
                f"Held-out clients must not be training clients; {len(overlap)} ids are in both, "
                f"e.g. {sorted(overlap)[:3]}."
            )

    @property
    def data_on_workers(self) -> bool:
        """Whether the driver sends codes and the workers build the examples (`example_source`)."""
        return self.example_source is not None

    @property
    def metric(self) -> str:
        """'accuracy' for classification, 'mse' for regression."""
        return "accuracy" if self.problem == "classification" else "mse"

    @property
    def _x_dtype(self):
        return np.float32 if self.example_source is None else np.int32

    def _pack(
        self, which: str, client_id: str, round_num: Optional[int] = None
    ) -> collections.OrderedDict:
        # A round-dependent split only differs from the fixed one when the split shuffles.
        split = self.train_split if which == "train" else self.eval_split
        if round_num is not None and split.shuffle:
            tag = f"pack/{which}/{client_id}/round/{round_num}"
            arrays = client_data_lib.client_arrays(
                self.train_data if which == "train" else self.eval_data, client_id
            )
            pack = self.train_pack if which == "train" else self.eval_pack
            rng = np.random.default_rng(packing.client_seed(self.seed, tag))
            return packing.pack_client(arrays, split, pack, rng, self._x_dtype)
        key = (which, client_id)
        with self._cache_lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        data = self.train_data if which == "train" else self.eval_data
        split = self.train_split if which == "train" else self.eval_split
        pack = self.train_pack if which == "train" else self.eval_pack
        arrays = client_data_lib.client_arrays(data, client_id)
        rng = np.random.default_rng(packing.client_seed(self.seed, f"pack/{which}/{client_id}"))
        packed = packing.pack_client(arrays, split, pack, rng, self._x_dtype)
        with self._cache_lock:
            self._cache[key] = packed
            if len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return packed

    def train_clients(
        self, client_ids: Sequence[str], round_num: Optional[int] = None
    ) -> list[collections.OrderedDict]:
        """Packed training clients, in the order of `client_ids`.

        With `round_num`, each client's support/query split is drawn anew for that round (a
        function of seed, client and round, so resumed runs match). Meta-learners need this on a
        fixed pool of clients: with one split per client for the whole run, theta and alpha fit
        the training clients' query sets, and adaptation on new clients loses accuracy (the
        README's Dirichlet digits results measure it). Tasks that fix the split themselves
        (`shuffle=False`) are unaffected.
        """
        return [self._pack("train", cid, round_num) for cid in client_ids]

    def eval_clients(self, client_ids: Sequence[str]) -> list[collections.OrderedDict]:
        """Packed held-out clients, in the order of `client_ids`."""
        return [self._pack("eval", cid) for cid in client_ids]

    def sample_train_ids(self, num_clients: int, round_num: int) -> list[str]:
        """Clients of a round: a function of (seed, round_num) only, so resumed runs match."""
        ids = self.train_data.client_ids
        if not 1 <= num_clients <= len(ids):
            raise ValueError(
                f"Cannot sample {num_clients} clients per round from {len(ids)} training clients; "
                "lower clients_per_round or raise the number of training clients."
            )
        rng = np.random.default_rng(packing.client_seed(self.seed, f"round/{round_num}"))
        return [ids[i] for i in rng.choice(len(ids), size=num_clients, replace=False)]

    def client_data_type(self, which: str = "train") -> tff.Type:
        """The TFF type of one packed client (unplaced)."""
        sample = self.train_clients(self.train_data.client_ids[:1])[0]
        if which == "eval":
            sample = self.eval_clients(self.eval_data.client_ids[:1])[0]
        return tff.types.tensorflow_to_type(
            tf.nest.map_structure(lambda a: tf.TensorSpec(a.shape, tf.as_dtype(a.dtype)), sample)
        )
