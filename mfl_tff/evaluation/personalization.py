"""Personalization evaluation: adapt each held-out client on its support set, score its query set.

A `tff.federated_computation` takes the model weights and the adaptation rates at SERVER and the
held-out clients' packed data at CLIENTS, and returns, per client, the query loss and metric after
0, 1, ..., `max_steps` adaptation steps under two rules:

* `own`: the algorithm's own rule: its learned alpha (mfl, meta_sgd), or fixed-rate fine-tuning;
* `fine_tune`: fixed-rate SGD fine-tuning with the same step budget, the same for every algorithm,
  so that algorithms are compared on equal terms.

Per-client values come back to the driver (`CLIENTS`-placed results), where `summaries` reports
mean, p10, median and p90. Learned rates are trained for K steps and can diverge when run longer,
so beyond `guard_after` steps a step of the `own` rule that raises the support loss (or makes it
non-finite) is rejected.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from typing import Optional

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from mfl_tff.algorithms import checks, client_work, composer
from mfl_tff.data import example_sources
from mfl_tff.meta import inner_loop, losses, meta_model


def _curve(model, trainable, non_trainable, data, meta, loop, max_steps, guard_after):
    """Query loss/metric after 0..max_steps steps of `loop` with meta-parameters `meta`, and the
    effective rates of its first `guard_after` steps; steps past `guard_after` are guarded."""
    loss_curve, metric_curve, rates_curve = [], [], []
    support_all = losses.flatten_batches(data["support"])

    def support_loss(weights):
        return losses.model_loss(
            model,
            (weights, non_trainable),
            support_all["x"],
            support_all["y"],
            support_all["mask"],
        )

    velocity = None
    for step in range(max_steps + 1):
        loss, metric = losses.part_loss_and_metric(model, (trainable, non_trainable), data["query"])
        loss_curve.append(loss)
        metric_curve.append(metric)
        if step == max_steps:
            break
        stepped, new_velocity, rates = meta_model.inner_step(
            model,
            trainable,
            non_trainable,
            inner_loop.support_batch(data["support"], step),
            meta,
            loop,
            step,
            velocity,
        )
        if step < guard_after:
            rates_curve.append(rates)
        else:
            before, after = support_loss(trainable), support_loss(stepped)
            accept = tf.logical_and(
                tf.logical_and(tf.math.is_finite(after), after <= before),
                client_work.all_finite(stepped),
            )
            stepped = tuple(tf.where(accept, s, t) for s, t in zip(stepped, trainable))
            if new_velocity is not None and velocity is not None:
                new_velocity = tuple(tf.where(accept, n, v) for n, v in zip(new_velocity, velocity))
        trainable, velocity = tuple(stepped), new_velocity
    return tf.stack(loss_curve), tf.stack(metric_curve), tf.stack(rates_curve)


def build_personalization_eval(
    model_fn: Callable[[], tff.learning.models.FunctionalModel],
    client_data_type: tff.Type,
    alpha_type: tff.Type,
    *,
    max_steps: int,
    fine_tune_lr: float,
    guard_after: int,
    loop: Optional[meta_model.InnerLoop] = None,
    example_source: Optional[example_sources.ExampleSource] = None,
) -> tff.Computation:
    """Builds the personalization evaluation computation.

    Args:
      model_fn: No-argument callable returning the `tff.learning.models.FunctionalModel`; its own
        loss and metric are what the curves report.
      client_data_type: TFF type of one packed held-out client.
      alpha_type: TFF type of the `own` rule's meta-parameters: alpha's tuple (see
        `mfl_tff.meta.hparams`; `fixed_rate_alpha(lr)` for algorithms that fine-tune at a
        fixed rate), or a meta-model's structure (`mfl_tff.meta.meta_model`) with `loop`.
      max_steps: Adaptation steps S of the curve (0..S).
      fine_tune_lr: Rate of the shared fine-tuning baseline.
      guard_after: Steps of the `own` rule after which divergence is guarded (its trained K).
      loop: The `own` rule's inner loop (meta-model, client optimizer, clipping) as trained;
        None: plain SGD with the rates.
      example_source: The task's `example_source` when its data is built on the workers
        (clients' `x` are codes, built into examples on the worker by
        `example_sources.build_on_worker`), or None.

    Returns:
      A computation `(model_weights@SERVER, alpha@SERVER, data@{CLIENTS}) ->
      OrderedDict(own_loss, own_metric, fine_tune_loss, fine_tune_metric, own_step_sizes)
      @CLIENTS`: the curves are float32 vectors of length max_steps + 1 per client;
      `own_step_sizes` is [guard_after, L], the rate each of the own rule's first steps used
      on each weight tensor (alpha times the meta-model's multiplier, averaged over the
      tensor's coordinates): what the meta-model chose for that client.
    """
    checks.check_positive_int("max_steps", max_steps)
    checks.check_positive_rate("fine_tune_lr", fine_tune_lr)
    checks.check_positive_int("guard_after", guard_after)
    model = model_fn()
    weights_type = client_work.model_weights_type(model)
    own_loop = loop or meta_model.InnerLoop(num_steps=guard_after)
    fine_tune_loop = meta_model.InnerLoop(num_steps=max_steps)

    @tff.tensorflow.computation(weights_type, alpha_type, client_data_type)
    def client_eval(weights, alpha, data):
        trainable, non_trainable = tuple(weights.trainable), tuple(weights.non_trainable)
        data = example_sources.build_on_worker(data, example_source)
        own_loss, own_metric, own_rates = _curve(
            model,
            trainable,
            non_trainable,
            data,
            composer.python_meta(alpha),
            own_loop,
            max_steps,
            guard_after,
        )
        ft_loss, ft_metric, _ = _curve(
            model,
            trainable,
            non_trainable,
            data,
            (tf.constant(fine_tune_lr, tf.float32),),
            fine_tune_loop,
            max_steps,
            max_steps,
        )
        return collections.OrderedDict(
            own_loss=own_loss,
            own_metric=own_metric,
            fine_tune_loss=ft_loss,
            fine_tune_metric=ft_metric,
            own_step_sizes=own_rates,
        )

    @tff.federated_computation(
        tff.FederatedType(weights_type, tff.SERVER),
        tff.FederatedType(alpha_type, tff.SERVER),
        tff.FederatedType(client_data_type, tff.CLIENTS),
    )
    def evaluate(weights, alpha, data):
        return tff.federated_map(
            client_eval,
            tff.federated_zip(
                (tff.federated_broadcast(weights), tff.federated_broadcast(alpha), data)
            ),
        )

    return evaluate


def fixed_rate_alpha(lr: float) -> tuple[np.ndarray]:
    """The `own` rule's rates for algorithms without learned rates: a scalar fine-tuning rate."""
    return (np.float32(lr),)
