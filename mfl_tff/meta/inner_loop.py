"""Client-side SGD: plain local training and the differentiable inner loop of meta-learning."""

from __future__ import annotations

import tensorflow as tf

from mfl_tff.meta import losses


def batch_gradient(model, problem: str, trainable, non_trainable, batch):
    """Gradient of the masked mean batch loss w.r.t. `trainable`."""
    with tf.GradientTape() as tape:
        tape.watch(trainable)
        loss = losses.model_loss(
            model, problem, (trainable, non_trainable), batch["x"], batch["y"], batch["mask"]
        )
    return tape.gradient(loss, trainable)


def sgd_step(
    model, problem: str, trainable, non_trainable, batch, step_sizes, *, first_order: bool = False
):
    """One SGD step on a packed batch; `step_sizes` is a scalar or a structure like `trainable`.

    Differentiable in `trainable` and `step_sizes`, which is what exact second-order
    meta-gradients need; `first_order` stops the gradient through the batch gradient (FOMAML).
    """
    grads = batch_gradient(model, problem, trainable, non_trainable, batch)
    if first_order:
        grads = tf.nest.map_structure(tf.stop_gradient, grads)
    if not tf.nest.is_nested(step_sizes):
        step_sizes = tf.nest.map_structure(lambda _: step_sizes, trainable)
    return tf.nest.map_structure(lambda w, g, a: w - a * g, trainable, grads, step_sizes)


def concat_parts(data) -> dict:
    """Support and query batches of a packed client, one after the other ([S + Q, B, ...])."""
    return {
        k: tf.concat([data["support"][k], data["query"][k]], axis=0) for k in ("x", "y", "mask")
    }


def local_sgd(model, problem: str, weights, batches, step_sizes, epochs: int):
    """`epochs` passes of SGD over packed `batches`, skipping all-padding batches.

    Skipping (rather than taking a zero-gradient step) keeps the step count equal to that of TFF's
    dataset loop, which only sees real batches; it matters for optimizers with state.

    Returns:
      The trained trainable weights.
    """
    trainable, non_trainable = weights
    num_batches = tf.shape(batches["mask"])[0]

    def body(i, current):
        batch = {k: v[i % num_batches] for k, v in batches.items()}
        return i + 1, tf.cond(
            tf.reduce_sum(batch["mask"]) > 0,
            lambda: sgd_step(model, problem, current, non_trainable, batch, step_sizes),
            lambda: current,
        )

    _, trainable = tf.while_loop(
        lambda i, _: i < num_batches * epochs, body, (tf.constant(0), trainable)
    )
    return trainable
