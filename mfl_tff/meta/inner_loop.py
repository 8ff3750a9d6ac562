"""Client-side SGD: plain local training and the differentiable inner loop of meta-learning."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import tensorflow as tf

from mfl_tff.meta import losses

_tracing = threading.local()


@contextlib.contextmanager
def vectorized_clients() -> Iterator[None]:
    """Marks client functions traced inside it as run under `tf.vectorized_map` (cohorts)."""
    _tracing.vectorized = getattr(_tracing, "vectorized", 0) + 1
    try:
        yield
    finally:
        _tracing.vectorized -= 1


def _vectorized() -> bool:
    return getattr(_tracing, "vectorized", 0) > 0


def batch_gradient(model, trainable, non_trainable, batch):
    """Gradient of the masked mean batch loss w.r.t. `trainable`."""
    with tf.GradientTape() as tape:
        tape.watch(trainable)
        loss = losses.model_loss(
            model, (trainable, non_trainable), batch["x"], batch["y"], batch["mask"]
        )
    return tape.gradient(loss, trainable)


def sgd_step(model, trainable, non_trainable, batch, step_sizes, *, first_order: bool = False):
    """One SGD step on a packed batch; `step_sizes` is a scalar or a structure like `trainable`.

    Differentiable in `trainable` and `step_sizes`, which is what exact second-order
    meta-gradients need; `first_order` stops the gradient through the batch gradient (FOMAML).
    """
    grads = batch_gradient(model, trainable, non_trainable, batch)
    if first_order:
        grads = tf.nest.map_structure(tf.stop_gradient, grads)
    if not tf.nest.is_nested(step_sizes):
        step_sizes = tf.nest.map_structure(lambda _: step_sizes, trainable)
    return tf.nest.map_structure(lambda w, g, a: w - a * g, trainable, grads, step_sizes)


def support_batch(support, k: int):
    """The k-th inner step's batch: the non-empty batches are used in turn.

    Packing fills batches front to back, so the non-empty ones come first; cycling over them
    only (not over all-padding batches, which would be steps that do nothing) gives small
    clients as many real steps as large ones.
    """
    non_empty = tf.reduce_sum(tf.cast(tf.reduce_sum(support["mask"], axis=1) > 0, tf.int32))
    index = tf.math.floormod(k, tf.maximum(non_empty, 1))
    return {key: tf.gather(value, index) for key, value in support.items()}


def concat_parts(data) -> dict:
    """Support and query batches of a packed client, one after the other ([S + Q, B, ...])."""
    return {
        k: tf.concat([data["support"][k], data["query"][k]], axis=0) for k in ("x", "y", "mask")
    }


def local_sgd(model, weights, batches, step_sizes, epochs: int, *, proximal_strength: float = 0.0):
    """`epochs` passes of SGD over packed `batches`, skipping all-padding batches.

    Skipping (rather than taking a zero-gradient step) keeps the step count equal to that of TFF's
    dataset loop, which only sees real batches; it matters for optimizers with state.

    With `proximal_strength` mu > 0 each step descends f(w) + mu/2 ||w - w_0||^2 from the
    starting weights w_0 (FedProx, arXiv 1812.06127), as TFF's FedProx client does.

    Returns:
      The trained trainable weights.
    """
    trainable, non_trainable = weights
    start = tuple(trainable)
    num_batches = tf.shape(batches["mask"])[0]

    def step(current, batch):
        if not proximal_strength:
            return sgd_step(model, current, non_trainable, batch, step_sizes)
        grads = batch_gradient(model, current, non_trainable, batch)
        rates = step_sizes if tf.nest.is_nested(step_sizes) else [step_sizes] * len(current)
        return tuple(
            w - a * (g + proximal_strength * (w - w0))
            for w, g, w0, a in zip(current, grads, start, rates)
        )

    def body(i, current):
        batch = {k: v[i % num_batches] for k, v in batches.items()}
        real = tf.reduce_sum(batch["mask"]) > 0
        if _vectorized():
            # Under tf.vectorized_map a cond runs each branch on the clients that take it, and
            # when no client of the cohort takes the step (a batch index all of them pad), pfor's
            # fallback for ops it cannot vectorize (convolution gradients) fails on the empty
            # set. Stepping every client and keeping the old weights where the batch is padding
            # gives the same weights.
            stepped = step(current, batch)
            return i + 1, tuple(tf.where(real, s, c) for s, c in zip(stepped, current))
        return i + 1, tf.cond(real, lambda: step(current, batch), lambda: current)

    _, trainable = tf.while_loop(
        lambda i, _: i < num_batches * epochs, body, (tf.constant(0), trainable)
    )
    return trainable
