"""What a training run shows: progress bar, TensorBoard, evaluation history.

`TrainLog` receives every step's metrics from `nvae_tf.training.trainer.Trainer` and

- updates a Keras progress bar per epoch (loss, NELBO, KL coefficient,
  learning rate, images/s, ETA);
- every `summary_every_steps` steps logs a line and writes TensorBoard
  scalars to MODEL_DIR/train (running means since the last summary of the
  loss, NELBO, reconstruction, KL, bits/dim, active latent units, gradient
  norm, regularisers; the current learning rate, KL coefficient, skipped
  steps, loss scale; KL and balancing coefficient per group) and images:
  samples at t = 0.7 and 1.0 from fixed noise, and fixed test images next to
  their reconstructions;
- records every evaluation in MODEL_DIR/eval (TensorBoard) and
  MODEL_DIR/eval_history.jsonl (one JSON object per line).

Only the chief writes; the other workers only keep the running sums.
"""

from __future__ import annotations

import json
import os
import sys

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from nvae_tf.serving import images as images_lib
from nvae_tf.serving import inference

EVAL_HISTORY_FILE = "eval_history.jsonl"
# Stream ids folded into the run seed for the fixed-noise sample grids.
SAMPLE_NOISE_STREAMS = {0.7: 2, 1.0: 3}
NON_INTERACTIVE_PROGBAR_SECONDS = 30.0
RECONSTRUCTION_COLUMNS = 8  # 4 (input, reconstruction) pairs per row
# Step outputs that are states, not per-step measurements to average; all
# but `finite` are written as their latest value.
_STATES = ("learning_rate", "kl_coeff", "skipped_steps", "nonfinite_streak",
           "loss_scale")
_INSTANTANEOUS = _STATES + ("finite",)


class TrainLog:
    """Progress, TensorBoard summaries and evaluation records of a run.

    Args:
      model: the `NVAE` (for the sample and reconstruction images).
      train: the `TrainConfig`.
      length: the run's `RunLength`.
      model_dir: where to write.
      is_chief: whether this worker writes.
      fixed_images: callable returning the test images [N, H, W, C] shown
        with their reconstructions (called once, at the first summary).
      nan_recoveries: the trainer's NaN-recovery counter (a variable, read
        only when summaries are written).
    """

    def __init__(self, model, train, length, model_dir: str, is_chief: bool,
                 fixed_images, nan_recoveries):
        self.model = model
        self.train = train
        self.length = length
        self.model_dir = model_dir
        self.is_chief = is_chief
        self._fixed_images_fn = fixed_images
        self._fixed_images = None
        self._nan_recoveries = nan_recoveries
        self._image_fn = tf.function(self._summary_images)
        self._writers = {}
        self._progbar, self._epoch = None, None
        self._sums, self._count = {}, 0
        self.last_eval = None  # (step, result) of the latest evaluation

    # ------------------------------------------------------------ per step
    def reset_progress(self) -> None:
        """Starts a new progress bar at the next step (after a restore)."""
        self._progbar, self._epoch = None, None

    def step_done(self, step: int, metrics: dict,
                  images_per_second: float) -> None:
        """Records the metrics (numpy) of the step that made `step`."""
        per_epoch = self.length.steps_per_epoch
        epoch = (step - 1) // per_epoch
        if epoch != self._epoch:
            self._epoch = epoch
            self._progbar = self._new_progbar(epoch)
        self._progbar.update(step - epoch * per_epoch, [
            ("loss", float(metrics["loss"])),
            ("nelbo", float(metrics["nelbo"])),
            ("kl_coeff", float(metrics["kl_coeff"])),
            ("lr", float(metrics["learning_rate"])),
            ("img/s", images_per_second)])
        for key, value in metrics.items():
            if np.ndim(value) == 0 and key not in _INSTANTANEOUS:
                self._sums[key] = self._sums.get(key, 0.0) + float(value)
        self._count += 1
        if step % self.train.summary_every_steps == 0:
            means = {k: v / self._count for k, v in self._sums.items()}
            self._sums, self._count = {}, 0
            logging.info("step %d/%d: %s, lr %.3g, kl_coeff %.3g, %.1f img/s",
                         step, self.length.total_steps, ", ".join(
                             f"{k} {v:.4g}" for k, v in sorted(
                                 means.items())),
                         metrics["learning_rate"], metrics["kl_coeff"],
                         images_per_second)
            if self.is_chief:
                self._write_summaries(step, means, metrics)

    def _new_progbar(self, epoch: int):
        per_epoch = self.length.steps_per_epoch
        target = min(per_epoch, self.length.total_steps - epoch * per_epoch)
        logging.info("Epoch %d/%d", epoch + 1, self.length.num_epochs)
        interval = 0.05 if sys.stdout.isatty() else \
            NON_INTERACTIVE_PROGBAR_SECONDS
        return keras.utils.Progbar(
            target, verbose=1 if self.is_chief else 0, interval=interval,
            stateful_metrics=["img/s", "lr", "kl_coeff"])

    # ----------------------------------------------------------- summaries
    def _writer(self, name):
        if name not in self._writers:
            self._writers[name] = tf.summary.create_file_writer(
                os.path.join(self.model_dir, name))
        return self._writers[name]

    def _summary_images(self, x):
        samples = {}
        for temperature, stream in SAMPLE_NOISE_STREAMS.items():
            seed = tf.constant([self.train.seed, stream], tf.int64)
            samples[temperature] = self.model.sample(
                self.train.num_summary_images, temperature,
                seed=seed).images
        return samples, inference.reconstruct(self.model, x)

    def _write_summaries(self, step, means, last):
        with self._writer("train").as_default(step=step):
            for name, value in means.items():
                tf.summary.scalar(name, value)
            for name in _STATES:
                tf.summary.scalar(name, last[name])
            tf.summary.scalar("nan_recoveries",
                              int(self._nan_recoveries.numpy()))
            for k, value in enumerate(last["kl_per_group"]):
                tf.summary.scalar(f"kl_per_group/{k:03d}", value)
                tf.summary.scalar(f"kl_gamma/{k:03d}", last["kl_gamma"][k])
            if self._fixed_images is None:
                self._fixed_images = self._fixed_images_fn()
            samples, recon = self._image_fn(self._fixed_images)
            for temperature, images in samples.items():
                tf.summary.image(f"samples/t={temperature}",
                                 images_lib.make_grid(images.numpy())[None])
            pairs = np.stack([self._fixed_images, recon.numpy()], axis=1)
            tf.summary.image(
                "reconstructions/input_then_reconstruction",
                images_lib.make_grid(pairs.reshape((-1,) + pairs.shape[2:]),
                                     columns=RECONSTRUCTION_COLUMNS)[None])
        self._writer("train").flush()

    # ---------------------------------------------------------- evaluation
    def record_eval(self, step: int, result: dict) -> None:
        """Logs an evaluation; the chief also writes TensorBoard and the
        JSON-lines history."""
        epoch = step / self.length.steps_per_epoch
        logging.info("Evaluation at step %d (epoch %.2f): test NELBO %.3f "
                     "nats, %.4f bits/dim (recon %.3f, KL %.3f; %d images, "
                     "%.1f s).", step, epoch, result["nelbo"], result["bpd"],
                     result["recon"], result["kl"], result["num_images"],
                     result["seconds"])
        self.last_eval = (step, result)
        if not self.is_chief:
            return
        with self._writer("eval").as_default(step=step):
            for name in ("nelbo", "recon", "kl", "bpd"):
                tf.summary.scalar(name, result[name])
        self._writer("eval").flush()
        with tf.io.gfile.GFile(os.path.join(
                self.model_dir, EVAL_HISTORY_FILE), "a") as f:
            f.write(json.dumps({"step": step, "epoch": round(epoch, 4),
                                **result}) + "\n")
