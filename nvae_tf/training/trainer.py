"""The NVAE training loop on tf.distribute: a custom loop on `strategy.run`.

`Trainer` builds the model, the optimizer and the step's counters in the
strategy's scope and runs the step of `nvae_tf.training.step` (forward,
loss, all-reduce, finite check, apply or skip) over the data, with
checkpoints, evaluation and NaN recovery around it.

Everything a step depends on derives from `(seed, step)`: the data pass and
the position in it (see `train_batches`), and the latent noise, which is the
replica's slice of one global-batch draw (`step.seeded_latent_noise`), so
the update does not depend on the number of replicas. A resumed run therefore
repeats the uninterrupted one exactly. After `nan_patience` consecutive
non-finite steps the last checkpoint is restored and the learning rate
multiplied by `nan_lr_factor` (persisted as the schedule's `lr_scale`).

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
from nvae_tf.training import preemption
from nvae_tf.model import NVAE
from nvae_tf.objectives import bits_per_dim
from nvae_tf.training import step as step_lib

# Stream id folded into the run seed for the evaluation noise (the sample
# grids use 2 and 3, see `train_log`).
EVAL_NOISE_STREAM = 1


def pass_seed(seed: int, pass_index: int) -> int:
    """Data seed of training pass `pass_index` (independent per pass)."""
    return int(np.random.SeedSequence([seed, pass_index]).generate_state(1)[0])


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
        self.step_options = step_lib.StepOptions.from_configs(train, runtime)
        self.noise_fn = step_lib.seeded_latent_noise(train.seed)
        # Grappler passes of every function this thread calls from now on;
        # after the strategy's tf.config calls (which reset them), before
        # the first call (which optimises the graph).
        graph_options.set_grappler_options(graph_options.GRAPPLER[
            graph_options.resolve_grappler(runtime.grappler)])
        with strategy.scope():
            self.model = NVAE(model_config, seed=train.seed,
                              sync_batchnorm=runtime.sync_batchnorm,
                              remat=runtime.remat)
            self.model.build()
            self.schedule, self.optimizer = step_lib.make_optimizer(
                train, length, self.model.trainable_variables)
            self.counters = step_lib.StepCounters.create(
                self.step_options.float16)
        counters = self.counters
        self.step = counters.step
        self.skipped_steps = counters.skipped_steps
        self.nonfinite_streak = counters.nonfinite_streak
        self.nan_recoveries = counters.nan_recoveries
        self.good_steps = counters.good_steps
        self.loss_scale = counters.loss_scale
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
        self.train_step = step_lib.make_train_step(
            strategy, self.model, self.optimizer, self.schedule,
            self.objective, counters, self.noise_fn, self.step_options)
        self._eval_step = tf.function(self._distributed_eval_step)
        # Workers agree on a stop after every step (an all-reduce of the
        # signal flag); one process needs no agreement.
        self.multi_worker = len(strategy.extended.worker_devices) < \
            self.num_replicas
        self._stop_votes = tf.function(self._distributed_stop_votes)
        self.log = train_log.TrainLog(
            self.model, train, length, self.model_dir, self.is_chief,
            fixed_images=self._fixed_images,
            nan_recoveries=self.nan_recoveries)
        self._last_saved_step = None

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

    # ------------------------------------------------------------- signals
    def _distributed_stop_votes(self, vote):
        votes = self.strategy.run(lambda: tf.identity(vote))
        return self.strategy.reduce(tf.distribute.ReduceOp.SUM, votes,
                                    axis=None)

    def stop_agreed(self, stop) -> bool:
        """Whether any process received a stop signal (the same answer on
        every worker, so that all save and stop at the same step)."""
        local = stop is not None and stop.requested
        if not self.multi_worker:
            return local
        return float(self._stop_votes(tf.constant(float(local)))) > 0

    def _stop(self, stop, step):
        """Saves at `step` and raises `preemption.Interrupted`.

        Within a run of non-finite steps nothing is saved: NaN recovery
        restores the last checkpoint, which must stay the one an
        uninterrupted run would restore.
        """
        if int(self.nonfinite_streak.numpy()) == 0:
            self.save()
        else:
            latest = self.manager.latest_checkpoint
            logging.warning("Step %d follows %d non-finite step(s): not "
                            "saved, a rerun resumes from %s.", step,
                            int(self.nonfinite_streak.numpy()), latest)
            step = int(latest.rsplit("-", 1)[-1]) if latest else 0
        raise preemption.Interrupted(stop.signum if stop else None, step)

    # --------------------------------------------------------- checkpoints
    def restore_or_initialize(self) -> int:
        """Resumes from model_dir's newest readable checkpoint or saves
        step 0.

        A damaged newer checkpoint is named in a warning and its files are
        moved (by the chief) to `checkpoints/damaged/`, so that the save at
        its step cannot overwrite them.

        Raises:
          FileNotFoundError: `--cont_training` and no checkpoint.
          checkpoints.NoReadableCheckpoint: checkpoints are listed but none
            can be read (training never restarts from scratch over them).
        """
        damaged = checkpoints.checkpoints_newest_first(self.model_dir)
        latest = checkpoints.restore_newest_readable(self.model_dir,
                                                     self._restore)
        if latest is None:
            if self.runtime.require_checkpoint:
                raise FileNotFoundError(
                    f"--cont_training: no checkpoint in {self.model_dir}/"
                    f"{checkpoints.CHECKPOINT_SUBDIR} to resume from.")
            self.save()
            return 0
        damaged = damaged[:damaged.index(latest)]
        if damaged and self.is_chief:
            logging.warning("Moved the files of the damaged checkpoint(s) %s "
                            "to %s.", ", ".join(damaged),
                            checkpoints.set_damaged_aside(self.model_dir,
                                                          damaged))
        if damaged:  # the manager's list without them
            self.manager = checkpoints.checkpoint_manager(
                self.checkpoint, self._write_dir,
                max_to_keep=self.train.keep_checkpoints)
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
    def fit(self, stop=None) -> dict:
        """Trains to `total_steps` (resuming), evaluates, returns the last
        evaluation (the test split's, unless `final_test_eval` is off).

        Args:
          stop: a `preemption.StopRequest`; once it is requested (on any
            worker) the trainer saves at the current step and raises
            `preemption.Interrupted`.
        """
        length, train = self.length, self.train
        step = self.restore_or_initialize()
        eval_every = train.eval_every_epochs_resolved()
        if step < length.total_steps and self.stop_agreed(stop):
            self._stop(stop, step)  # signalled during start-up
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
                if self.stop_agreed(stop):
                    self._stop(stop, step)
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
