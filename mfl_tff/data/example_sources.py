"""Example sources: a task's examples built on the worker from the integer codes the driver sends.

A task with an `ExampleSource` (`FederatedTask.example_source`, `data_on_workers=True` on the
built-in tasks that have one) packs each client's examples as int32 codes instead of features:
the same split, shuffling, batching and padding (`mfl_tff.data.packing`), done on the driver over
codes. Inside the client computation, before any algorithm's code runs, `build_on_worker` turns
the codes into the features (and, for generated tasks, the labels) with TensorFlow ops, so the
work happens wherever the computation runs, on the worker, and the driver sends a few bytes per
example each round instead of the features.

A source is anything TensorFlow can rebuild on the worker from a code:

- `FeaturePool`: a shared array of examples (the digits tasks): the code is a row, and the pool
  is a constant of the computation, shipped to the worker once with it.
- a file that exists on each worker (`mfl_tff.data.emnist`: TFF's EMNIST SQLite file, read by
  row id with `tf.data.experimental.SqlDataset`);
- a generator (`GeneratedSource`: `mfl_tff.data.sinusoid`, `mfl_tff.data.synthetic`): the code
  names a client and an example, and stateless random ops draw it. The draws are TensorFlow's,
  not the numpy stream the default task generates on the driver: the same distribution, other
  clients.
"""

from __future__ import annotations

import abc
import collections
import re
import zlib
from collections.abc import Mapping, Sequence
from typing import Optional

import numpy as np
import tensorflow as tf


class ExampleSource(abc.ABC):
    """Builds packed examples from int32 codes, in TensorFlow, on the worker.

    Subclasses implement `build`. `label_spec` says what the driver packs as `y`: None (the
    default) when the driver knows the labels and sends them; a (dtype, shape) placeholder when
    the source makes the labels too, so that `y` costs (almost) nothing on the wire.
    """

    #: (numpy dtype, per-example shape) of the placeholder `y` the driver packs, or None.
    label_spec = None

    @abc.abstractmethod
    def build(self, codes: tf.Tensor, y: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """Returns (features, labels) for `codes` of any shape (leading axes, then examples).

        Args:
          codes: int32 codes, shape [..., B].
          y: What the driver packed as labels, shape [..., B, ...]: the labels, or the
            placeholder of `label_spec`.
        """

    def placeholder_labels(self, count: int) -> np.ndarray:
        """The `y` the driver packs for `count` examples when the source makes the labels."""
        dtype, shape = self.label_spec
        return np.zeros((count, *shape), dtype)


class FeaturePool(ExampleSource):
    """Examples that are rows of one array: the code is the row, the label is the driver's.

    Inside a `tff.tensorflow.computation` the pool is one of its constants, so it reaches the
    worker once, with the computation.
    """

    def __init__(self, pool: np.ndarray):
        # float32, as packing makes features (`packing.pack_examples`).
        self.pool = np.asarray(pool, np.float32)
        if self.pool.ndim < 1 or not len(self.pool):
            raise ValueError(
                f"A feature pool must hold at least one row, got shape {self.pool.shape}."
            )

    def build(self, codes, y):
        return tf.gather(tf.constant(self.pool), codes), y


# Codes are int32 and never negative: at most 2^31 of them.
MAX_CODES = 2**31
# Stateless draws are pinned to Philox (`tf.random.Algorithm.PHILOX`), so every device and
# worker draws the same examples.
_PHILOX = tf.random.Algorithm.PHILOX.value
# Streams of a client's own values, then of its blocks of examples (see `Streams`).
_CLIENT_STREAMS, _EXAMPLE_STREAMS = 0, 16


class Streams:
    """The stateless random streams of one client (or one block of a client's examples).

    A draw is TensorFlow's stateless Philox op (`StatelessRandomUniformV2`/`NormalV2`, what
    `tf.random.stateless_uniform` runs) with the task's key, a function of (seed, source name),
    and the 128-bit counter (low word stream << 32, high word position), where `position` names
    the client or block. Philox maps distinct counters to independent draws, and a draw of fewer
    than 2^32 x 4 words never reaches the next stream's counter, so every (stream, position) is
    its own stream.
    """

    def __init__(self, key: tf.Tensor, position: tf.Tensor, first: int):
        self._key, self._position, self._first = key, tf.cast(position, tf.uint64), first

    def _counter(self, stream: int) -> tf.Tensor:
        if not 0 <= stream < 16:
            raise ValueError(f"A client or a block has 16 streams, got stream {stream}.")
        # Philox counts up from the low word (the first): a draw stays in its stream's 2^32.
        start = tf.constant((self._first + stream) << 32, tf.uint64)
        return tf.stack([start, self._position])

    def uniform(self, stream: int, shape, bounds=(0.0, 1.0)) -> tf.Tensor:
        """float64 draws of U[lo, hi)."""
        draw = tf.raw_ops.StatelessRandomUniformV2(
            shape=shape, key=self._key, counter=self._counter(stream), alg=_PHILOX, dtype=tf.float64
        )
        return bounds[0] + (bounds[1] - bounds[0]) * draw

    def normal(self, stream: int, shape, mean=0.0, stddev=1.0) -> tf.Tensor:
        """float64 draws of N(mean, stddev^2)."""
        draw = tf.raw_ops.StatelessRandomNormalV2(
            shape=shape, key=self._key, counter=self._counter(stream), alg=_PHILOX, dtype=tf.float64
        )
        return mean + stddev * draw


class GeneratedSource(ExampleSource):
    """Examples drawn with stateless random ops from (task seed, population, client, example).

    The driver keeps only the clients' sizes; a code names one example slot of one client of one
    population (e.g. "train", "eval"): `base(population) + number * slots + slot`, where
    `number` is the client's number in its id (`train/0000123` is 123) and each population has a
    fixed number of `slots` per client. `decode` inverts it on the worker. The draws (`Streams`)
    are keyed by (seed, name) and counted by (population, client number, stream) or (population,
    client number, block of slots, stream), so an example is a function of (seed, population,
    client, slot) only: not of which clients a round sends, of their order, of how they are
    packed or of the population sizes.

    Subclasses implement `build_flat` with `decode`, `per_client` (values of a whole client: its
    wave, its model) and `per_example` (draws of a block of `BLOCK` consecutive slots, so a
    client's examples cost the draws of the blocks its codes touch, not of all its slots).
    """

    BLOCK = 64

    def __init__(self, name: str, seed: int, populations: Mapping[str, tuple[int, int]]):
        """`populations`: {name: (number of clients, example slots per client)}, in code order."""
        self.populations = collections.OrderedDict(populations)
        self._kinds = list(self.populations)
        bases, total = [], 0
        for kind, (clients, slots) in self.populations.items():
            if clients < 1 or slots < 1:
                raise ValueError(f"Population {kind!r} needs clients and slots >= 1.")
            bases.append(total)
            total += clients * slots
        if total > MAX_CODES:
            sizes = " + ".join(
                f"{n:,} {kind} clients x {s:,}" for kind, (n, s) in populations.items()
            )
            raise ValueError(
                f"With data_on_workers, every example slot needs its own int32 code, and {sizes} "
                f"example slots = {total:,} exceed 2^31; use fewer clients or examples per client."
            )
        self._bases = np.array(bases, np.int64)
        self._slots = np.array([s for _, s in self.populations.values()], np.int64)
        self._key = np.array(
            [(int(seed) & 0xFFFFFFFF) << 32 | zlib.crc32(name.encode())], np.uint64
        )
        self._on_driver = {}

    @staticmethod
    def parse(client_id: str) -> tuple[str, int]:
        """(population, client number) of an id such as 'train/0000123'."""
        kind, _, number = client_id.rpartition("/")
        return kind, int(number)

    def encode(self, client_id: str, slots) -> np.ndarray:
        """The int32 codes of a client's example `slots` (each in 0..slots per client - 1)."""
        kind, number = self.parse(client_id)
        k = self._kinds.index(kind)
        slots = np.asarray(slots, np.int64)
        if number >= self.populations[kind][0] or np.any((slots < 0) | (slots >= self._slots[k])):
            raise ValueError(f"Client {client_id!r} or its slots are outside the code layout.")
        return (self._bases[k] + number * self._slots[k] + slots).astype(np.int32)

    def decode(self, codes) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        """int64 (population index, client number, slot) of int32 `codes` of any shape."""
        codes = tf.cast(codes, tf.int64)
        kind = tf.zeros_like(codes)
        for base in self._bases[1:]:
            kind += tf.cast(codes >= base, tf.int64)
        local = codes - tf.gather(tf.constant(self._bases), kind)
        slots = tf.gather(tf.constant(self._slots), kind)
        return kind, local // slots, local % slots

    def per_client(self, kind, number, draw, signature):
        """`draw(streams)` of every client named by `kind`, `number` (same shape), gathered back.

        `draw` maps the client's `Streams` to a structure of tensors of `signature` (a structure
        of `tf.TensorSpec`); each distinct client is drawn once. Returns the structure with the
        leading axes of `kind`.
        """
        key = tf.constant(self._key)
        client = kind * 2**31 + number
        return _per_key(client, lambda c: draw(Streams(key, c, _CLIENT_STREAMS)), signature)

    def drawn_on_driver(self, client_ids: Sequence[str], draw, signature):
        """`per_client(draw)` of the clients named by `client_ids`, as numpy, run on the driver
        by the same ops as on the worker (to inspect a client's wave or model, and in tests)."""
        if draw.__name__ not in self._on_driver:

            @tf.function(input_signature=[tf.TensorSpec([None], tf.int64)] * 2)
            def values(kind, number):
                return self.per_client(kind, number, draw, signature)

            self._on_driver[draw.__name__] = values
        kinds, numbers = zip(*(self.parse(c) for c in client_ids))
        kinds = np.array([self._kinds.index(k) for k in kinds], np.int64)
        values = self._on_driver[draw.__name__](
            tf.constant(kinds), tf.constant(np.array(numbers, np.int64))
        )
        return tf.nest.map_structure(lambda v: v.numpy(), values)

    def per_example(self, kind, number, slot, draw, signature):
        """Per-example draws: `draw(streams)` gives a block of `BLOCK` slots (leading axis), and
        each code gets its slot's row. Returns the structure with the leading axes of `slot`."""
        key = tf.constant(self._key)
        # Under 2^26 blocks of a client (its slots are codes), under 2^32 clients.
        block = (kind * 2**31 + number) * 2**26 + slot // self.BLOCK
        blocks = _per_key(block, lambda b: draw(Streams(key, b, _EXAMPLE_STREAMS)), signature)
        row = slot % self.BLOCK
        return tf.nest.map_structure(
            lambda v: tf.gather(v, row, axis=row.shape.rank, batch_dims=row.shape.rank), blocks
        )

    @abc.abstractmethod
    def build_flat(self, codes: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """(features, labels) of a vector of codes."""

    def build(self, codes, y):
        del y  # the placeholder of `label_spec`
        return self.build_parts([codes])[0]

    def build_parts(self, codes):
        """`build` of several tensors of codes at once: one draw per distinct client or block."""
        flat = [tf.reshape(c, [-1]) for c in codes]
        x, y = self.build_flat(tf.concat(flat, 0))
        sizes = [tf.size(c) for c in flat]
        return [
            tuple(tf.reshape(v, tf.concat([tf.shape(c), tf.shape(v)[1:]], 0)) for v in (xs, ys))
            for c, xs, ys in zip(codes, tf.split(x, sizes), tf.split(y, sizes))
        ]


def _per_key(keys, draw, signature):
    """`draw(key)` once per distinct int64 key, the results gathered to `keys`' shape."""
    unique, index = tf.unique(tf.reshape(keys, [-1]))
    values = tf.map_fn(draw, unique, fn_output_signature=signature)

    def gathered(v):
        return tf.reshape(tf.gather(v, index), tf.concat([tf.shape(keys), tf.shape(v)[1:]], 0))

    return tf.nest.map_structure(gathered, values)


# What every source's check on the worker says first (`worker_data_problem` finds it).
WORKER_CHECK = "data on the workers:"


def worker_data_problem(error: BaseException) -> Optional[str]:
    """The message of a source's check that failed on a worker (e.g. a missing file), found in
    the error a TFF call raised (the worker's gRPC status carries it), or None."""
    details = getattr(error, "details", None)
    text = details() if callable(details) else str(error)
    found = re.search(r"\[([^\[\]]*" + re.escape(WORKER_CHECK) + r"[^\]]*)\]", text or "")
    if not found:
        return None
    # The status message escapes quotes.
    return " ".join(found.group(1).replace("\\'", "'").replace('\\"', '"').split())


def check_codes(element_spec: Mapping) -> None:
    """Raises ValueError unless each example's `x` is one integer code (what sources take)."""
    x = element_spec.get("x") if isinstance(element_spec, Mapping) else None
    if x is None or not x.dtype.is_integer or x.shape.rank != 0:
        raise ValueError(
            "With data built on the workers (an example source), each client example's 'x' must "
            f"be one integer code (e.g. a row index into the pool), got {x}."
        )


def build_on_worker(data, source):
    """A packed client value (or a stack of them) with its codes replaced by the examples.

    `data` is `OrderedDict(support=OrderedDict(x, y, mask), query=...)` whose `x` are int32 codes,
    with any leading axes (cohorts, rounds). The result is the same structure with the source's
    features and labels, padding (mask 0) zeroed: exactly the tensors the task packs when the
    driver builds the examples. With no source (a `np.ndarray` is taken as a `FeaturePool`),
    `data` is returned as it is.
    """
    if source is None:
        return data
    if isinstance(source, np.ndarray):
        source = FeaturePool(source)

    if isinstance(source, GeneratedSource):
        # All parts in one call: each client and block is drawn once for support and query.
        examples = source.build_parts([part["x"] for part in data.values()])
    else:
        examples = [source.build(part["x"], part["y"]) for part in data.values()]
    built = collections.OrderedDict()
    for (name, part), (x, y) in zip(data.items(), examples):
        part = collections.OrderedDict(part.items())
        part["x"] = _zero_padding(x, part["mask"])
        part["y"] = _zero_padding(y, part["mask"])
        built[name] = part
    return built


def _zero_padding(values: tf.Tensor, mask: tf.Tensor) -> tf.Tensor:
    values, mask = tf.convert_to_tensor(values), tf.convert_to_tensor(mask)
    real = mask[(Ellipsis, *(tf.newaxis,) * (values.shape.rank - mask.shape.rank))] > 0
    return tf.where(real, values, tf.zeros_like(values))
