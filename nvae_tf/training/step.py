"""The NVAE training step, as `python -m nvae_tf.train` runs it.

One step, inside a `tf.function`, in the TF Model Garden style:

1. replica context (`strategy.run`): forward and loss (`compute_loss`, the
   official objective) on the replica's share of the global batch, loss
   divided by the number of replicas, gradients, then one batched
   `all_reduce(SUM)` of the gradients and the logged metrics; every replica
   then holds the global-batch gradient and knows whether it is finite;
2. cross-replica context: `tf.cond(finite, apply, skip)`. `apply` runs the
   official Adamax `update_step` on every variable copy
   (`strategy.extended.update`, as Keras' own distributed apply does);
   `skip` restores the model's non-trainable state (BN statistics, power
   iteration vectors) captured before the forward. The step counter always
   advances; skipped and consecutive non-finite steps are counted.

The latent noise comes from a `noise_fn(latent_shapes, step, replica_id,
num_replicas)`: the trainer's (`seeded_latent_noise`) is the replica's slice
of one global-batch draw keyed by `(seed, step)`, so the update does not
depend on the number of replicas; a test can feed recorded noise instead.
The trainer (`nvae_tf.training.trainer`), the benchmark and the official
lockstep test all build their step with `make_train_step`; Keras' `fit`
(`NVAE.train_step`, `nvae_tf.training.fit`) runs the same two parts,
`make_replica_step` and `finish_step`.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow as tf

from nvae_tf.objectives import compute_loss
from nvae_tf.training.optimizers import Adamax, WarmupCosineSchedule

# Official GradScaler for float16: initial scale and the finite steps after
# which it doubles.
LOSS_SCALE_INIT = 2.0 ** 10
LOSS_SCALE_GROWTH_STEPS = 2000
PHILOX_NORMALS_PER_COUNTER = 4  # float32 normals per Philox counter step


def latent_noise(latent_shapes, seed, replica_id, num_replicas):
    """This replica's slice of the global-batch standard-normal latents.

    Equals `stateless_normal([B_global, h, w, L], fold_in(seed, k))` rows
    `[r b, (r + 1) b)` for group k, computed at the cost of the slice only:
    stateless Philox normals fill element j from counter `c0 + j / 4`, so the
    slice starts at counter offset `r b n / 4` (n = h w L).

    Args:
      latent_shapes: per group `(b, h, w, L)` with b the replica batch.
      seed: int64 [2] stateless seed of the step.
      replica_id, num_replicas: replica position in the sync group.

    Returns:
      A list of float32 [b, h, w, L] tensors.
    """
    noise = []
    for k, shape in enumerate(latent_shapes):
        b = shape[0]
        per_example = int(np.prod(shape[1:]))
        group_seed = tf.random.experimental.stateless_fold_in(seed, k)
        if per_example % PHILOX_NORMALS_PER_COUNTER:
            full = tf.random.stateless_normal(
                tf.stack([b * num_replicas, *shape[1:]]), group_seed)
            noise.append(full[replica_id * b:(replica_id + 1) * b])
            continue
        key, counter, alg = tf.raw_ops.StatelessRandomGetKeyCounterAlg(
            seed=group_seed)
        offset = tf.cast(replica_id * b, tf.int64) * (
            per_example // PHILOX_NORMALS_PER_COUNTER)
        counter = tf.bitcast(tf.bitcast(counter, tf.int64) + tf.stack(
            [offset, tf.constant(0, tf.int64)]), tf.uint64)
        noise.append(tf.raw_ops.StatelessRandomNormalV2(
            shape=tf.stack([b, *shape[1:]]), key=key, counter=counter,
            alg=alg))
    return noise


def seeded_latent_noise(seed: int):
    """The trainer's `noise_fn`: `latent_noise` keyed by `(seed, step)`."""

    def noise_fn(latent_shapes, step, replica_id, num_replicas):
        step_seed = tf.stack([tf.constant(seed, tf.int64), step])
        return latent_noise(latent_shapes, step_seed, replica_id,
                            num_replicas)

    return noise_fn


@dataclasses.dataclass(frozen=True)
class StepOptions:
    """How the step runs, beyond the model and the objective.

    Attributes:
      float16: scale the loss with the dynamic loss scale (official
        GradScaler) and unscale the gradients.
      jit_compile: compile the per-replica step with XLA.
      run_eagerly: run the step as Python, op by op, instead of tracing it
        into a `tf.function`: no graph is built or held, which for a huge
        model costs less host memory than the traced graph (same math).
      debug_inject_nan_at_step: test hook; if >= 0 the loss is NaN at steps
        [N, N + nan_patience) until the first NaN recovery.
      nan_patience: see `debug_inject_nan_at_step`.
    """

    float16: bool = False
    jit_compile: bool = False
    run_eagerly: bool = False
    debug_inject_nan_at_step: int = -1
    nan_patience: int = 10

    @classmethod
    def from_configs(cls, train, runtime) -> "StepOptions":
        """The options of a `TrainConfig` and a `RuntimeConfig`."""
        return cls(float16=runtime.mixed_precision == "float16",
                   jit_compile=runtime.jit_compile,
                   run_eagerly=runtime.run_eagerly,
                   debug_inject_nan_at_step=train.debug_inject_nan_at_step,
                   nan_patience=train.nan_patience)


@dataclasses.dataclass(frozen=True)
class StepCounters:
    """The step's state besides model and optimizer (all `tf.Variable`s).

    Attributes:
      step: global step, the next step's index (drives every schedule).
      skipped_steps: steps skipped for a non-finite loss or gradient.
      nonfinite_streak: consecutive non-finite steps (loss-scale overflows
        excepted).
      nan_recoveries: NaN recoveries so far (set by the trainer).
      good_steps: finite steps since the loss scale last changed.
      loss_scale: the float16 loss scale (1 otherwise).
    """

    step: tf.Variable
    skipped_steps: tf.Variable
    nonfinite_streak: tf.Variable
    nan_recoveries: tf.Variable
    good_steps: tf.Variable
    loss_scale: tf.Variable

    @classmethod
    def create(cls, float16: bool = False) -> "StepCounters":
        """Fresh counters; call inside the strategy's scope."""

        def counter(name, dtype=tf.int64, value=0):
            return tf.Variable(value, dtype=dtype, trainable=False,
                               name=name)

        return cls(step=counter("step"),
                   skipped_steps=counter("skipped_steps"),
                   nonfinite_streak=counter("nonfinite_streak"),
                   nan_recoveries=counter("nan_recoveries"),
                   good_steps=counter("loss_scale_good_steps"),
                   loss_scale=counter("loss_scale", tf.float32,
                                      LOSS_SCALE_INIT if float16 else 1.0))


def make_optimizer(train, length, variables):
    """The official schedule and Adamax of a run, built for `variables`.

    Call inside the strategy's scope.

    Args:
      train: the `TrainConfig` (learning rates, warm-up, weight decay).
      length: the run's `RunLength` (steps per epoch, schedule epochs).
      variables: the model's trainable variables.

    Returns:
      (WarmupCosineSchedule, Adamax).
    """
    schedule = WarmupCosineSchedule(
        train.learning_rate, train.learning_rate_min,
        length.steps_per_epoch, length.schedule_epochs, train.warmup_epochs)
    optimizer = Adamax(schedule, l2_weight_decay=train.weight_decay)
    optimizer.build(variables)
    return schedule, optimizer


def make_replica_step(model, objective, noise_fn,
                      options: StepOptions = StepOptions()):
    """The per-replica part of the step (call it in `strategy.run`).

    Returns:
      `replica_step(x, step, recoveries, loss_scale)` -> (all-reduced
      gradients, all-reduced metrics, loss finite, gradients finite); with
      `options.jit_compile` an XLA-compiled `tf.function`.
    """

    def replica_step(x, step, recoveries, loss_scale):
        ctx = tf.distribute.get_replica_context()
        num_replicas = ctx.num_replicas_in_sync
        batch = tf.shape(x)[0]
        eps = noise_fn(model.latent_shapes(batch), step,
                       ctx.replica_id_in_sync_group, num_replicas)
        variables = model.trainable_variables
        with tf.GradientTape() as tape:
            result = compute_loss(model, x, step, objective, training=True,
                                  eps=eps)
            loss = result.loss
            inject_at = options.debug_inject_nan_at_step
            if inject_at >= 0:
                inject = ((step >= inject_at) & (recoveries == 0) &
                          (step < inject_at + options.nan_patience))
                loss += tf.where(inject, float("nan"), 0.0)
            scaled = loss * loss_scale / num_replicas
        grads = tape.gradient(scaled, variables)
        grads = [tf.zeros_like(v) if g is None else g
                 for g, v in zip(grads, variables)]
        grads = ctx.all_reduce(tf.distribute.ReduceOp.SUM, grads)
        if options.float16:
            grads = [g / loss_scale for g in grads]
        metrics = dict(result.metrics)
        metrics["loss"] = loss
        names = sorted(metrics)
        reduced = ctx.all_reduce(
            tf.distribute.ReduceOp.SUM,
            [tf.cast(metrics[k], tf.float32) / num_replicas for k in names])
        metrics = dict(zip(names, reduced))
        grads_finite = tf.reduce_all(
            [tf.reduce_all(tf.math.is_finite(g)) for g in grads])
        metrics["grad_norm"] = tf.linalg.global_norm(grads)
        return grads, metrics, tf.math.is_finite(metrics["loss"]), \
            grads_finite

    if options.jit_compile:
        return tf.function(replica_step, jit_compile=True)
    return replica_step


def make_train_step(strategy, model, optimizer, schedule, objective,
                    counters: StepCounters, noise_fn,
                    options: StepOptions = StepOptions()):
    """The distributed training step of `python -m nvae_tf.train`.

    Args:
      strategy: the `tf.distribute.Strategy` holding the variables.
      model: a built `NVAE`.
      optimizer: its `Adamax` (built), `schedule` its learning rate.
      objective: the `ObjectiveConfig` (`total_steps` resolved).
      counters: the `StepCounters`; `counters.step` is the step's index.
      noise_fn: `noise_fn(latent_shapes, step, replica_id, num_replicas)`
        -> per-group standard normals of the replica's batch
        (`seeded_latent_noise` in training).
      options: the `StepOptions`.

    Returns:
      A `tf.function` `train_step(iterator)` (the plain Python function with
      `options.run_eagerly`) that takes the next (global, distributed) batch
      of `iterator`, runs one step and returns a dict of scalar metrics
      (loss, its parts, learning_rate, finite, counters).
    """
    replica_step = make_replica_step(model, objective, noise_fn, options)
    c = counters

    def train_step(iterator):
        step = tf.convert_to_tensor(c.step)
        state = model.non_trainable_variables
        snapshot = [tf.identity(v.value) for v in state]
        outputs = strategy.run(replica_step, args=(
            next(iterator), step, tf.convert_to_tensor(c.nan_recoveries),
            tf.convert_to_tensor(c.loss_scale)))

        def restore():
            for variable, value in zip(state, snapshot):
                variable.value.assign(value)

        metrics = finish_step(strategy, model, optimizer, schedule, c,
                              options, step, outputs, restore)
        c.step.assign_add(1)
        return metrics

    if options.run_eagerly:
        return train_step
    return tf.function(train_step)


def finish_step(strategy, model, optimizer, schedule, counters: StepCounters,
                options: StepOptions, step, outputs, restore):
    """The cross-replica part of the step: apply or skip, update counters.

    Shared by the trainer's step (after `strategy.run`) and `NVAE.train_step`
    (in a `merge_call`). Does not advance `counters.step`; the optimizer's
    `iterations` advance when the step is applied.

    Args:
      strategy: the `tf.distribute.Strategy` holding the variables.
      model, optimizer, schedule: as for `make_train_step`.
      counters: the `StepCounters` (`step` excepted).
      options: the `StepOptions`.
      step: the step's index (drives the learning rate).
      outputs: what `make_replica_step`'s function returned, per replica.
      restore: callable restoring the model's non-trainable state captured
        before the forward (the skip of a non-finite step).

    Returns:
      The step's metrics: loss, its parts, learning_rate, finite, counters.
    """
    c = counters
    float16 = options.float16

    def local(value):  # identical on every replica after all-reduce
        return strategy.experimental_local_results(value)[0]

    grads, metrics, loss_finite, grads_finite = outputs
    metrics = {k: local(v) for k, v in metrics.items()}
    loss_finite, grads_finite = local(loss_finite), local(grads_finite)
    finite = loss_finite & grads_finite
    learning_rate = schedule(step)

    def apply():
        def update(variable, gradient):
            optimizer.update_step(gradient, variable, learning_rate)

        for grad, variable in zip(grads, model.trainable_variables):
            strategy.extended.update(variable.value, update, args=(grad,),
                                     group=False)
        optimizer.iterations.assign_add(1)
        return tf.constant(True)

    def skip():
        restore()
        return tf.constant(False)

    tf.cond(finite, apply, skip)
    one, zero = tf.constant(1, tf.int64), tf.constant(0, tf.int64)
    # float16: a finite loss with overflowing gradients is a loss-scale
    # overflow (GradScaler skips it), not a divergence.
    overflow = loss_finite & ~grads_finite & float16
    c.skipped_steps.assign_add(tf.where(finite, zero, one))
    c.nonfinite_streak.assign(tf.where(
        finite | overflow, zero, c.nonfinite_streak + one))
    if float16:
        good = tf.where(finite, c.good_steps + one, zero)
        grow = good >= LOSS_SCALE_GROWTH_STEPS
        c.loss_scale.assign(c.loss_scale * tf.where(
            finite, tf.where(grow, 2.0, 1.0), 0.5))
        c.good_steps.assign(tf.where(grow, zero, good))
    metrics.update(
        learning_rate=tf.cast(learning_rate, tf.float32),
        finite=finite,
        skipped_steps=tf.convert_to_tensor(c.skipped_steps),
        nonfinite_streak=tf.convert_to_tensor(c.nonfinite_streak),
        loss_scale=tf.convert_to_tensor(c.loss_scale))
    return metrics
