"""Sine-wave clients drawn on the worker: `build_sinusoid(data_on_workers=True)`.

The driver draws only each client's support size (numpy, as the default task does, so the sizes
and the packing are the default's) and sends one int32 code per point: the code names (client,
slot), slots 0..hi-1 being support points and hi.. query points. `SineSource.build` draws, with
stateless TensorFlow ops on the worker, the client's amplitude ~ U[0.1, 5], phase ~ U[0, pi] and
noise level (`label_noise`, or U[lo, hi]), and each random point's x ~ U[-5, 5] and noise
N(0, sigma^2); held-out clients' query points are the evenly spaced grid, their targets the true
wave. Targets are made on the worker too: the driver packs a zero-byte placeholder `y`.

The clients have the default task's distribution but are other draws (TensorFlow's Philox
stream, not numpy's): `data_on_workers=True` gives different waves and points than the default.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence

import numpy as np
import tensorflow as tf

from mfl_tff.data import example_sources
from mfl_tff.data import settings as settings_lib

_CLIENT_SPEC = collections.OrderedDict(
    amplitude=tf.TensorSpec([], tf.float64),
    phase=tf.TensorSpec([], tf.float64),
    sigma=tf.TensorSpec([], tf.float64),
)
_BLOCK_SPEC = collections.OrderedDict(
    x=tf.TensorSpec([example_sources.GeneratedSource.BLOCK], tf.float64),
    noise=tf.TensorSpec([example_sources.GeneratedSource.BLOCK], tf.float64),
)


class SineSource(example_sources.GeneratedSource):
    """Sinusoid clients from codes of (client, point); see the module docstring.

    Args:
      seed: The task's seed.
      amplitude, phase, input_range: (lo, hi) of the uniform draws of a wave and of its inputs.
      max_support: Support slots per client (hi of the shots range, or the fixed shots).
      query_points: Random query points of a training client.
      eval_query_points: Evenly spaced query points of a held-out client.
      label_noise: Noise standard deviation, or the (lo, hi) range each client draws it from.
      num_train_clients, num_eval_clients: The populations (they bound the codes).
    """

    # Targets are drawn on the worker: the driver packs float32 of shape (0,), zero bytes.
    label_spec = (np.float32, (0,))

    def __init__(
        self,
        *,
        seed: int,
        amplitude: tuple[float, float],
        phase: tuple[float, float],
        input_range: tuple[float, float],
        max_support: int,
        query_points: int,
        eval_query_points: int,
        label_noise: settings_lib.Noise,
        num_train_clients: int,
        num_eval_clients: int,
    ):
        super().__init__(
            "sinusoid",
            seed,
            {
                "train": (num_train_clients, max_support + query_points),
                "eval": (num_eval_clients, max_support + eval_query_points),
            },
        )
        self.amplitude, self.phase, self.input_range = amplitude, phase, input_range
        self.max_support = max_support
        self.label_noise = label_noise
        # The held-out query inputs, exactly the default task's (`np.linspace`, then float32).
        self.grid = np.linspace(*input_range, num=eval_query_points).astype(np.float32)

    def client_arrays(self, client_id: str, num_support: int) -> collections.OrderedDict:
        """The driver's side: codes of the first `num_support` support slots and every query
        slot, support first, and the placeholder targets."""
        kind, _ = self.parse(client_id)
        query = self.populations[kind][1] - self.max_support
        slots = np.concatenate([np.arange(num_support), self.max_support + np.arange(query)])
        codes = self.encode(client_id, slots)
        return collections.OrderedDict(x=codes, y=self.placeholder_labels(len(codes)))

    def _draw_client(self, streams) -> collections.OrderedDict:
        if isinstance(self.label_noise, tuple):
            sigma = streams.uniform(2, [], self.label_noise)
        else:
            sigma = tf.constant(float(self.label_noise), tf.float64)
        return collections.OrderedDict(
            amplitude=streams.uniform(0, [], self.amplitude),
            phase=streams.uniform(1, [], self.phase),
            sigma=sigma,
        )

    def _draw_block(self, streams) -> collections.OrderedDict:
        return collections.OrderedDict(
            x=streams.uniform(0, [self.BLOCK], self.input_range),
            noise=streams.normal(1, [self.BLOCK]),
        )

    def build_flat(self, codes):
        kind, number, slot = self.decode(codes)
        wave = self.per_client(kind, number, self._draw_client, _CLIENT_SPEC)
        draws = self.per_example(kind, number, slot, self._draw_block, _BLOCK_SPEC)
        query = slot - self.max_support
        held_out_query = (kind == self._kinds.index("eval")) & (query >= 0)
        grid = tf.gather(tf.constant(self.grid), tf.clip_by_value(query, 0, len(self.grid) - 1))
        x = tf.where(held_out_query, grid, tf.cast(draws["x"], tf.float32))
        # The wave of the float32 input, as the default task computes it; held-out query targets
        # stay noise-free.
        clean = wave["amplitude"] * tf.sin(tf.cast(x, tf.float64) - wave["phase"])
        noise = tf.where(held_out_query, tf.zeros_like(clean), wave["sigma"] * draws["noise"])
        return x[:, tf.newaxis], tf.cast(clean + noise, tf.float32)[:, tf.newaxis]

    def waves(self, client_ids: Sequence[str]) -> np.ndarray:
        """[len(client_ids), 3] float64: each client's (amplitude, phase, sigma), drawn by the
        same ops as `build` (on the driver, for inspection and tests)."""
        wave = self.drawn_on_driver(client_ids, self._draw_client, _CLIENT_SPEC)
        return np.stack(list(wave.values()), axis=-1)

    def wave(self, client_id: str) -> tuple[float, float, float]:
        """A client's (amplitude, phase, sigma)."""
        return tuple(float(v) for v in self.waves([client_id])[0])
