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
- a generator (`mfl_tff.data.sinusoid`, `mfl_tff.data.synthetic`): the code names a client and
  an example, and stateless random ops draw it.
"""

from __future__ import annotations

import abc
import collections
from collections.abc import Mapping

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

    def built(part):
        part = collections.OrderedDict(part.items())
        x, y = source.build(part["x"], part["y"])
        mask = part["mask"]
        part["x"] = _zero_padding(x, mask)
        part["y"] = _zero_padding(y, mask)
        return part

    return collections.OrderedDict((name, built(part)) for name, part in data.items())


def _zero_padding(values: tf.Tensor, mask: tf.Tensor) -> tf.Tensor:
    values, mask = tf.convert_to_tensor(values), tf.convert_to_tensor(mask)
    real = mask[(Ellipsis, *(tf.newaxis,) * (values.shape.rank - mask.shape.rank))] > 0
    return tf.where(real, values, tf.zeros_like(values))
