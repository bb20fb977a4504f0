"""The NVAE training loop on tf.distribute: a custom loop on `strategy.run`.

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

Everything a step depends on derives from `(seed, step)`: the data pass and
the position in it (see `train_batches`), and the latent noise, which is the
replica's slice of one global-batch draw (`latent_noise`), so the update does
not depend on the number of replicas. A resumed run therefore repeats the
uninterrupted one exactly. After `nan_patience` consecutive non-finite steps
the last checkpoint is restored and the learning rate multiplied by
`nan_lr_factor` (persisted as the schedule's `lr_scale`).

Evaluations during the run (every `eval_every_epochs` epochs and after the
last step) are of the validation split when the data section has one, so
that choices made from them never see the test split; the test split is
evaluated once, after the last step (`final_test_eval`). Without a
validation split every evaluation is of the test split, as in the official
code.
"""

from __future__ import annotations

import os
import time

import numpy as np
import tensorflow as tf
from absl import logging

from nvae_tf.training import checkpoints
from nvae_tf import data as data_lib
from nvae_tf.fast import graph_options
from nvae_tf.training import log as train_log
from nvae_tf.model import NVAE
from nvae_tf.training.optimizers import Adamax, WarmupCosineSchedule
from nvae_tf.objectives import bits_per_dim, compute_loss

# The official float16 GradScaler: initial scale, growth interval.
LOSS_SCALE_INIT = 2.0 ** 10
LOSS_SCALE_GROWTH_STEPS = 2000
# Stream id folded into the run seed for the evaluation noise (the sample
# grids use 2 and 3, see `train_log`).
EVAL_NOISE_STREAM = 1
PHILOX_NORMALS_PER_COUNTER = 4  # float32 normals per Philox counter step


def pass_seed(seed: int, pass_index: int) -> int:
    """Data seed of training pass `pass_index` (independent per pass)."""
    return int(np.random.SeedSequence([seed, pass_index]).generate_state(1)[0])


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


class Trainer:
    """Builds the model, optimizer and state in `strategy` and trains.

    Args:
      experiment: the `ExperimentConfig`, resolved (its `run` set).
      strategy: the `tf.distribute.Strategy`.
    """

    def __init__(self, experiment, strategy):
        self.experiment = experiment
        self.model_config = model_config = experiment.model
        self.data_config = experiment.data
        self.objective = experiment.objective
        self.train = train = experiment.train
        self.runtime = runtime = experiment.runtime
        self.strategy = strategy
        self.length = length = experiment.run
        self.model_dir = runtime.model_dir
        # The split watched during the run (see the module docstring).
        self.monitor_split = (data_lib.VALIDATION_SPLIT
                              if self.data_config.validation_fraction
                              else data_lib.TEST_SPLIT)
        self.is_chief = bool(strategy.extended.should_checkpoint)
        self.num_replicas = strategy.num_replicas_in_sync
        self.float16 = runtime.mixed_precision == "float16"
        # Grappler passes of every function this thread calls from now on;
        # after the strategy's tf.config calls (which reset them), before
        # the first call (which optimises the graph).
        graph_options.set_grappler_options(graph_options.GRAPPLER[
            graph_options.resolve_grappler(runtime.grappler)])
        with strategy.scope():
            self.model = NVAE(model_config, seed=train.seed,
                              sync_batchnorm=runtime.sync_batchnorm)
            self.model.build()
            self.schedule = WarmupCosineSchedule(
                train.learning_rate, train.learning_rate_min,
                length.steps_per_epoch, length.schedule_epochs,
                train.warmup_epochs)
            self.optimizer = Adamax(self.schedule,
                                    l2_weight_decay=train.weight_decay)
            self.optimizer.build(self.model.trainable_variables)

            def counter(name, dtype=tf.int64, value=0):
                return tf.Variable(value, dtype=dtype, trainable=False,
                                   name=name)

            self.step = counter("step")
            self.skipped_steps = counter("skipped_steps")
            self.nonfinite_streak = counter("nonfinite_streak")
            self.nan_recoveries = counter("nan_recoveries")
            self.good_steps = counter("loss_scale_good_steps")
            self.loss_scale = counter(
                "loss_scale", tf.float32,
                LOSS_SCALE_INIT if self.float16 else 1.0)
        self.checkpoint = tf.train.Checkpoint(
            model=self.model, optimizer=self.optimizer, step=self.step,
            lr_scale=self.schedule.lr_scale,
            skipped_steps=self.skipped_steps,
            nonfinite_streak=self.nonfinite_streak,
            nan_recoveries=self.nan_recoveries, loss_scale=self.loss_scale,
            loss_scale_good_steps=self.good_steps)
        # Model Garden convention: only the chief writes to model_dir; the
        # other workers save (collectively) into a scratch folder.
        self._write_dir = self.model_dir if self.is_chief else os.path.join(
            self.model_dir, ".workers",
            f"worker_{strategy.cluster_resolver.task_id}")
        self.manager = checkpoints.checkpoint_manager(
            self.checkpoint, self._write_dir,
            max_to_keep=train.keep_checkpoints)
        replica_step = self._replica_step
        if runtime.jit_compile:
            replica_step = tf.function(replica_step, jit_compile=True)
        self._replica_fn = replica_step
        self.train_step = tf.function(self._distributed_train_step)
        self._eval_step = tf.function(self._distributed_eval_step)
        self.log = train_log.TrainLog(
            self.model, train, length, self.model_dir, self.is_chief,
            fixed_images=self._fixed_images,
            nan_recoveries=self.nan_recoveries)
        self._last_saved_step = None

    # ------------------------------------------------------------ the step
    def _replica_step(self, x, step, recoveries, loss_scale):
        ctx = tf.distribute.get_replica_context()
        num_replicas = ctx.num_replicas_in_sync
        batch = tf.shape(x)[0]
        seed = tf.stack([tf.constant(self.train.seed, tf.int64), step])
        eps = latent_noise(self.model.latent_shapes(batch), seed,
                           ctx.replica_id_in_sync_group, num_replicas)
        variables = self.model.trainable_variables
        with tf.GradientTape() as tape:
            result = compute_loss(self.model, x, step, self.objective,
                                  training=True, eps=eps)
            loss = result.loss
            inject_at = self.train.debug_inject_nan_at_step
            if inject_at >= 0:
                inject = ((step >= inject_at) & (recoveries == 0) &
                          (step < inject_at + self.train.nan_patience))
                loss += tf.where(inject, float("nan"), 0.0)
            scaled = loss * loss_scale / num_replicas
        grads = tape.gradient(scaled, variables)
        grads = [tf.zeros_like(v) if g is None else g
                 for g, v in zip(grads, variables)]
        grads = ctx.all_reduce(tf.distribute.ReduceOp.SUM, grads)
        if self.float16:
            grads = [g / loss_scale for g in grads]
        metrics = {k: v for k, v in result.metrics.items()}
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

    def _apply(self, grads, learning_rate):
        def update(variable, gradient):
            self.optimizer.update_step(gradient, variable, learning_rate)

        for grad, variable in zip(grads, self.model.trainable_variables):
            self.strategy.extended.update(variable.value, update,
                                          args=(grad,), group=False)
        self.optimizer.iterations.assign_add(1)
        return tf.constant(True)

    def _distributed_train_step(self, iterator):
        step = tf.convert_to_tensor(self.step)
        state = self.model.non_trainable_variables
        snapshot = [tf.identity(v.value) for v in state]
        outputs = self.strategy.run(self._replica_fn, args=(
            next(iterator), step, tf.convert_to_tensor(self.nan_recoveries),
            tf.convert_to_tensor(self.loss_scale)))

        def local(value):  # identical on every replica after all-reduce
            return self.strategy.experimental_local_results(value)[0]

        grads, metrics, loss_finite, grads_finite = outputs
        metrics = {k: local(v) for k, v in metrics.items()}
        loss_finite, grads_finite = local(loss_finite), local(grads_finite)
        finite = loss_finite & grads_finite
        learning_rate = self.schedule(step)

        def skip():
            for variable, value in zip(state, snapshot):
                variable.value.assign(value)
            return tf.constant(False)

        tf.cond(finite, lambda: self._apply(grads, learning_rate), skip)
        one, zero = tf.constant(1, tf.int64), tf.constant(0, tf.int64)
        # float16: a finite loss with overflowing gradients is a loss-scale
        # overflow (GradScaler skips it), not a divergence.
        overflow = loss_finite & ~grads_finite & self.float16
        self.skipped_steps.assign_add(tf.where(finite, zero, one))
        self.nonfinite_streak.assign(tf.where(
            finite | overflow, zero, self.nonfinite_streak + one))
        if self.float16:
            good = tf.where(finite, self.good_steps + one, zero)
            grow = good >= LOSS_SCALE_GROWTH_STEPS
            self.loss_scale.assign(self.loss_scale * tf.where(
                finite, tf.where(grow, 2.0, 1.0), 0.5))
            self.good_steps.assign(tf.where(grow, zero, good))
        self.step.assign_add(1)
        metrics.update(
            learning_rate=tf.cast(learning_rate, tf.float32),
            finite=finite,
            skipped_steps=tf.convert_to_tensor(self.skipped_steps),
            nonfinite_streak=tf.convert_to_tensor(self.nonfinite_streak),
            loss_scale=tf.convert_to_tensor(self.loss_scale))
        return metrics

    # ---------------------------------------------------------------- data
    def train_batches(self, step: int):
        """Distributed iterator positioned at global step `step`.

        Pass p = step // P reads the training split shuffled with
        `pass_seed(seed, p)`; the first `step % P` batches are skipped, so
        the batch of every step is a function of (seed, step).
        """
        pass_index, offset = divmod(step, self.length.batches_per_pass)
        train_ds, _, _ = data_lib.make_datasets(
            self.data_config, seed=pass_seed(self.train.seed, pass_index))
        if offset:
            train_ds = train_ds.skip(offset)
        return iter(self.strategy.experimental_distribute_dataset(train_ds))

    def _eval_dataset(self, split):
        # Rebuilt each time: the same images and binarisation every time.
        ds = data_lib.make_datasets(self.data_config, seed=self.train.seed,
                                    eval_split=split)[1]
        if self.train.max_eval_images:
            ds = ds.unbatch().take(self.train.max_eval_images).batch(
                self.data_config.batch_size)
        return ds

    def _fixed_images(self):
        """The first images of the watched split, shown with their
        reconstructions."""
        ds = self._eval_dataset(self.monitor_split).unbatch().take(
            self.train.num_summary_images)
        return np.stack(list(ds.as_numpy_iterator()))

    # ---------------------------------------------------------- evaluation
    def _replica_eval(self, x, batch_index):
        ctx = tf.distribute.get_replica_context()
        fold_in = tf.random.experimental.stateless_fold_in
        seed = tf.constant([self.train.seed, EVAL_NOISE_STREAM], tf.int64)
        seed = fold_in(fold_in(seed, batch_index),
                       ctx.replica_id_in_sync_group)

        def forward():
            out = self.model(x, training=False, seed=seed)
            return [tf.reduce_sum(out.nelbo), tf.reduce_sum(out.recon_loss),
                    tf.reduce_sum(tf.add_n(out.kl_per_group))]

        # The last batch may leave a replica without images.
        batch = tf.shape(x)[0]
        sums = tf.cond(batch > 0, forward, lambda: [tf.zeros([])] * 3)
        sums = ctx.all_reduce(tf.distribute.ReduceOp.SUM,
                              sums + [tf.cast(batch, tf.float32)])
        return dict(zip(("nelbo", "recon", "kl", "count"), sums))

    def _distributed_eval_step(self, iterator, batch_index):
        sums = self.strategy.run(self._replica_eval,
                                 args=(next(iterator), batch_index))
        return {name: self.strategy.experimental_local_results(value)[0]
                for name, value in sums.items()}

    def evaluate(self, split: str | None = None) -> dict:
        """Mean NELBO of `split` (default: the watched split; one posterior
        sample per image, beta = 1)."""
        split = split or self.monitor_split
        start = time.time()
        iterator = iter(self.strategy.experimental_distribute_dataset(
            self._eval_dataset(split)))
        totals = {}
        batch_index = 0
        while True:
            try:
                sums = self._eval_step(iterator,
                                       tf.constant(batch_index, tf.int64))
            except (tf.errors.OutOfRangeError, StopIteration):
                break
            for key, value in sums.items():
                totals[key] = totals.get(key, 0.0) + float(value)
            batch_index += 1
        count = totals.get("count", 0.0)
        if not count:
            raise ValueError("The evaluation split yielded no images.")
        nelbo = totals["nelbo"] / count
        return {"split": split, "nelbo": nelbo,
                "recon": totals["recon"] / count,
                "kl": totals["kl"] / count,
                "bpd": float(bits_per_dim(nelbo,
                                          self.model_config.num_pixels)),
                "num_images": int(count),
                "seconds": round(time.time() - start, 1)}

    # --------------------------------------------------------- checkpoints
    def restore_or_initialize(self) -> int:
        """Resumes from model_dir's latest checkpoint or saves step 0."""
        latest = checkpoints.latest_checkpoint(self.model_dir)
        if latest is None:
            if self.runtime.require_checkpoint:
                raise FileNotFoundError(
                    f"--cont_training: no checkpoint in {self.model_dir}/"
                    f"{checkpoints.CHECKPOINT_SUBDIR} to resume from.")
            self.save()
            return 0
        self._restore(latest)
        step = int(self.step.numpy())
        self._last_saved_step = step
        logging.info("Resumed from %s at step %d (lr scale %.4g, %d NaN "
                     "recoveries so far).", latest, step,
                     float(self.schedule.lr_scale.numpy()),
                     int(self.nan_recoveries.numpy()))
        return step

    def _restore(self, path):
        saved = {name.split("/")[0] for name, _ in tf.train.list_variables(path)}
        with self.strategy.scope():
            if "optimizer" in saved:
                self.checkpoint.restore(path).assert_existing_objects_matched()
                return
            # A model-only checkpoint (`nvae_tf.convert`, `save_model_dir`):
            # the weights continue, the optimizer and step start afresh.
            logging.info("%s holds model weights only: training continues "
                         "from them with a fresh optimizer at step 0.", path)
            tf.train.Checkpoint(model=self.model).restore(
                path).assert_existing_objects_matched()

    def save(self) -> None:
        step = int(self.step.numpy())
        if step == self._last_saved_step:
            return
        path = self.manager.save(checkpoint_number=step)
        self._last_saved_step = step
        if self.is_chief:
            logging.info("Saved checkpoint %s.", path)
        else:
            tf.io.gfile.rmtree(self._write_dir)

    def recover_from_nan(self) -> int:
        """Restores the last checkpoint with a lower LR; returns its step."""
        recoveries = int(self.nan_recoveries.numpy()) + 1
        streak = int(self.nonfinite_streak.numpy())
        if recoveries > self.train.max_nan_recoveries:
            raise FloatingPointError(
                f"{streak} consecutive non-finite steps after "
                f"{recoveries - 1} NaN recoveries (--max_nan_recoveries="
                f"{self.train.max_nan_recoveries}); lower --learning_rate "
                "or raise --weight_decay_norm.")
        lr_scale = float(self.schedule.lr_scale.numpy()) * \
            self.train.nan_lr_factor
        skipped = int(self.skipped_steps.numpy())
        failed_at = int(self.step.numpy())
        latest = checkpoints.latest_checkpoint(self.model_dir)
        self._restore(latest)
        with self.strategy.scope():
            self.nan_recoveries.assign(recoveries)
            self.schedule.lr_scale.assign(lr_scale)
            self.skipped_steps.assign(skipped)
            self.nonfinite_streak.assign(0)
        step = int(self.step.numpy())
        self._last_saved_step = None
        logging.warning(
            "NaN recovery %d: %d consecutive non-finite steps up to step %d; "
            "restored %s (step %d) and multiplied the learning rate by %g "
            "(lr scale now %.4g).", recoveries, streak, failed_at, latest,
            step, self.train.nan_lr_factor, lr_scale)
        return step

    # ---------------------------------------------------------------- loop
    def fit(self) -> dict:
        """Trains to `total_steps` (resuming), evaluates, returns the last
        evaluation (the test split's, unless `final_test_eval` is off)."""
        length, train = self.length, self.train
        step = self.restore_or_initialize()
        eval_every = train.eval_every_epochs_resolved()
        while step < length.total_steps:
            iterator = self.train_batches(step)
            pass_end = (step // length.batches_per_pass + 1) * \
                length.batches_per_pass
            while step < min(pass_end, length.total_steps):
                start = time.time()
                metrics = {k: v.numpy()
                           for k, v in self.train_step(iterator).items()}
                step += 1
                self.log.step_done(
                    step, metrics,
                    self.data_config.batch_size / (time.time() - start))
                streak = int(metrics["nonfinite_streak"])
                if streak >= train.nan_patience:
                    step = self.recover_from_nan()
                    self.log.reset_progress()
                    break  # a new iterator at the restored step
                epoch_end = step % length.steps_per_epoch == 0
                if epoch_end and (step // length.steps_per_epoch) % \
                        eval_every == 0:
                    self.log.record_eval(step, self.evaluate())
                every = train.checkpoint_every_steps
                if streak == 0 and ((every and step % every == 0) or
                                    (not every and epoch_end)):
                    self.save()
        self.save()
        logging.info("Final weights fingerprint %s at step %d.",
                     self.weights_fingerprint(), step)
        if self.log.last_eval is None or self.log.last_eval[0] != step:
            self.log.record_eval(step, self.evaluate())
        if self.monitor_split != data_lib.TEST_SPLIT and \
                train.final_test_eval:
            self.log.record_eval(step, self.evaluate(data_lib.TEST_SPLIT))
        return {"step": step, **self.log.last_eval[1]}

    def weights_fingerprint(self) -> str:
        """SHA-256 prefix of all model weights (equal on every worker)."""
        return checkpoints.weights_fingerprint(self.model.weights)[:16]
