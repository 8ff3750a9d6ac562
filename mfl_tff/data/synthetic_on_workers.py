"""Synthetic(alpha, beta) clients drawn on the worker: `build_synthetic(data_on_workers=True)`.

The driver draws only each client's size (numpy, LEAF's power law, exactly the default task's
sizes) and sends one int32 code per example, naming (client, example). `SyntheticSource.build`
draws with stateless TensorFlow ops on the worker the client's u ~ N(0, alpha), B ~ N(0, beta),
model W, b ~ N(u, 1) and input mean v ~ N(B, 1), then each example's x ~ N(v, diag(j^-1.2)) and
its label argmax(W x + b). Labels are made on the worker: the driver packs a zero-byte
placeholder `y`.

The clients have the default task's distribution but are other draws (TensorFlow's Philox
stream, not numpy's): `data_on_workers=True` gives different clients than the default.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence

import numpy as np
import tensorflow as tf

from mfl_tff.data import example_sources


class SyntheticSource(example_sources.GeneratedSource):
    """Synthetic(alpha, beta) clients from codes of (client, example).

    Args:
      seed: The task's seed.
      alpha, beta: The spreads of the clients' models and of their inputs.
      dim, num_classes: Input dimensions and classes.
      max_examples: Example slots per client (the cap on a client's size).
      num_train_clients, num_eval_clients: The populations (they bound the codes).
    """

    # Labels are drawn on the worker: the driver packs int32 of shape (0,), zero bytes.
    label_spec = (np.int32, (0,))

    def __init__(
        self,
        *,
        seed: int,
        alpha: float,
        beta: float,
        dim: int,
        num_classes: int,
        max_examples: int,
        num_train_clients: int,
        num_eval_clients: int,
    ):
        super().__init__(
            "synthetic",
            seed,
            {"train": (num_train_clients, max_examples), "eval": (num_eval_clients, max_examples)},
        )
        self.alpha, self.beta = float(alpha), float(beta)
        self.dim, self.num_classes = dim, num_classes
        # Standard deviations of the inputs around v: covariance diag(j^-1.2).
        self.scale = np.arange(1, dim + 1) ** -0.6
        self._client_spec = collections.OrderedDict(
            u=tf.TensorSpec([], tf.float64),
            b_mean=tf.TensorSpec([], tf.float64),
            w=tf.TensorSpec([dim, num_classes], tf.float64),
            bias=tf.TensorSpec([num_classes], tf.float64),
            v=tf.TensorSpec([dim], tf.float64),
        )
        self._block_spec = tf.TensorSpec([self.BLOCK, dim], tf.float64)

    def client_arrays(self, client_id: str, size: int) -> collections.OrderedDict:
        """The driver's side: the codes of the client's `size` examples and placeholder labels."""
        codes = self.encode(client_id, np.arange(size))
        return collections.OrderedDict(x=codes, y=self.placeholder_labels(size))

    def _draw_client(self, streams) -> collections.OrderedDict:
        u = streams.normal(0, [], 0.0, np.sqrt(self.alpha))
        b_mean = streams.normal(1, [], 0.0, np.sqrt(self.beta))
        return collections.OrderedDict(
            u=u,
            b_mean=b_mean,
            w=streams.normal(2, [self.dim, self.num_classes], u),
            bias=streams.normal(3, [self.num_classes], u),
            v=streams.normal(4, [self.dim], b_mean),
        )

    def _draw_block(self, streams) -> tf.Tensor:
        return streams.normal(0, [self.BLOCK, self.dim])

    def build_flat(self, codes):
        kind, number, slot = self.decode(codes)
        model = self.per_client(kind, number, self._draw_client, self._client_spec)
        noise = self.per_example(kind, number, slot, self._draw_block, self._block_spec)
        x = tf.cast(model["v"] + noise * tf.constant(self.scale), tf.float32)
        # The label of the float32 input, as the default task computes it.
        logits = tf.einsum("nd,ndk->nk", tf.cast(x, tf.float64), model["w"]) + model["bias"]
        return x, tf.argmax(logits, axis=-1, output_type=tf.int32)

    def client_models(self, client_ids: Sequence[str]) -> collections.OrderedDict:
        """The clients' u, b_mean, w [dim, classes], bias and v, stacked, as numpy float64, drawn
        by the same ops as `build` (on the driver, for inspection and tests)."""
        return self.drawn_on_driver(client_ids, self._draw_client, self._client_spec)

    def client_model(self, client_id: str) -> collections.OrderedDict:
        """One client's `client_models`."""
        return collections.OrderedDict(
            (k, v[0]) for k, v in self.client_models([client_id]).items()
        )
