"""What a training run shows: progress bar, TensorBoard, evaluation history.

`TrainLog` receives every step's metrics from `nvae_tf.training.trainer.Trainer` and

- on a terminal, redraws one progress line per epoch (loss, NELBO, KL
  coefficient, learning rate, images/s, the epoch's and the whole run's
  ETA); when stdout is not a terminal (a file, a pipe, a job log) it draws
  nothing, so the log has no carriage returns, colour codes or lines merged
  with the progress bar's;
- every `summary_every_steps` steps logs a line (with the run's ETA) and
  writes TensorBoard
  scalars to MODEL_DIR/train (running means since the last summary of the
  loss, NELBO, reconstruction, KL, bits/dim, active latent units, gradient
  norm, regularisers; the current learning rate, KL coefficient, skipped
  steps, loss scale; KL and balancing coefficient per group) and images:
  samples at t = 0.7 and 1.0 from fixed noise, and fixed images of the
  watched split (validation, else test) next to their reconstructions;
- records every evaluation in MODEL_DIR/eval (TensorBoard: `nelbo`, `bpd`,
  ... for the test split, `val/nelbo`, ... for the validation split) and
  MODEL_DIR/eval_history.jsonl (one JSON object per line, its `split` named).

Only the chief writes; the other workers only keep the running sums.
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np
import tensorflow as tf
from absl import logging

from nvae_tf.serving import images as images_lib
from nvae_tf.serving import inference

EVAL_HISTORY_FILE = "eval_history.jsonl"
VALIDATION_TAG_PREFIX = "val/"  # TensorBoard tags of validation evaluations
# Stream ids folded into the run seed for the fixed-noise sample grids.
SAMPLE_NOISE_STREAMS = {0.7: 2, 1.0: 3}
PROGRESS_REDRAW_SECONDS = 0.1  # terminal progress line refresh
PROGRESS_BAR_WIDTH = 20
RECONSTRUCTION_COLUMNS = 8  # 4 (input, reconstruction) pairs per row
# Step outputs that are states, not per-step measurements to average; all
# but `finite` are written as their latest value.
_STATES = ("learning_rate", "kl_coeff", "skipped_steps", "nonfinite_streak",
           "loss_scale")
_INSTANTANEOUS = _STATES + ("finite",)


def format_duration(seconds: float) -> str:
    """`1:02:03`, `2:05` or `45s`."""
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}:{minutes:02d}:{secs:02d}"
    return f"{minutes}:{secs:02d}" if minutes else f"{secs}s"


class RunProgress:
    """The epoch's progress line on a terminal and the run's ETA.

    The ETA extrapolates the wall time per step since the first step this
    process ran (tracing excluded; evaluations and checkpoints included as
    they happen) over the steps left.

    Args:
      length: the run's `RunLength`.
      stream: where the progress line goes (default `sys.stdout`).
      interactive: draw the line; default: whether `stream` is a terminal.
      clock: returns seconds (default `time.monotonic`).
    """

    def __init__(self, length, stream=None, interactive: bool | None = None,
                 clock=None):
        self.length = length
        self.stream = sys.stdout if stream is None else stream
        self.interactive = (self.stream.isatty() if interactive is None
                            else interactive)
        self._clock = clock or time.monotonic
        self._origin = None  # (time, step) of the first step seen
        self._epoch_origin = None
        self._last_draw = -float("inf")
        self._width = 0

    def restart(self) -> None:
        """Measures anew from the next step (after a restore)."""
        self.end_line()
        self._origin, self._epoch_origin = None, None

    def run_eta(self, step: int) -> float | None:
        """Seconds until `total_steps`, or None before a rate is known."""
        return self._eta(self._origin, step, self.length.total_steps)

    def _eta(self, origin, step, target):
        if origin is None or step <= origin[1]:
            return None
        per_step = (self._clock() - origin[0]) / (step - origin[1])
        return per_step * (target - step)

    def update(self, step: int, fields: dict, images_per_second: float):
        """Records that `step` is done; redraws the line on a terminal."""
        now = self._clock()
        per_epoch = self.length.steps_per_epoch
        epoch = (step - 1) // per_epoch
        if self._origin is None:
            self._origin = (now, step)
        if self._epoch_origin is None or self._epoch_origin[2] != epoch:
            self.end_line()
            self._epoch_origin = (now, step, epoch)
        if not self.interactive:
            return
        epoch_end = min((epoch + 1) * per_epoch, self.length.total_steps)
        done = step == epoch_end
        if not done and now - self._last_draw < PROGRESS_REDRAW_SECONDS:
            return
        self._last_draw = now
        current, target = step - epoch * per_epoch, epoch_end - epoch * \
            per_epoch
        filled = PROGRESS_BAR_WIDTH * current // target
        bar = "=" * filled + "." * (PROGRESS_BAR_WIDTH - filled)
        values = " ".join(f"{k} {v:.4g}" for k, v in fields.items())
        etas = []
        for name, origin, end in (("epoch", self._epoch_origin, epoch_end),
                                  ("run", self._origin,
                                   self.length.total_steps)):
            eta = self._eta(origin, step, end)
            if eta is not None and step < end:
                etas.append(f"{name} {format_duration(eta)}")
        line = (f"epoch {epoch + 1}/{self.length.num_epochs} "
                f"{current}/{target} [{bar}] {values} "
                f"{images_per_second:.1f} img/s")
        if etas:
            line += " - ETA " + ", ".join(etas)
        self.stream.write("\r" + line.ljust(self._width))
        self._width = len(line)
        if done:
            self.end_line()
        self.stream.flush()

    def end_line(self) -> None:
        """Ends a drawn progress line, so that the next output starts on a
        line of its own."""
        if self._width:
            self.stream.write("\n")
            self.stream.flush()
            self._width = 0


def read_eval_history(model_dir: str) -> list[dict]:
    """The evaluations recorded in MODEL_DIR/eval_history.jsonl, by step.

    A run resumed after an evaluation but before its checkpoint repeats that
    evaluation; the later record of a (split, step) wins.
    """
    path = os.path.join(model_dir, EVAL_HISTORY_FILE)
    if not tf.io.gfile.exists(path):
        return []
    records = {}
    with tf.io.gfile.GFile(path) as f:
        for line in f:
            if line.strip():
                record = json.loads(line)
                records[(record["split"], record["step"])] = record
    return sorted(records.values(), key=lambda r: (r["step"], r["split"]))


class TrainLog:
    """Progress, TensorBoard summaries and evaluation records of a run.

    Args:
      model: the `NVAE` (for the sample and reconstruction images).
      train: the `TrainConfig`.
      length: the run's `RunLength`.
      model_dir: where to write.
      is_chief: whether this worker writes.
      fixed_images: callable returning the images [N, H, W, C] shown with
        their reconstructions (called once, at the first summary).
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
        self.progress = RunProgress(length, interactive=None if is_chief
                                    else False)
        self._epoch = None
        self._sums, self._count = {}, 0
        self.last_eval = None  # (step, result) of the latest evaluation

    # ------------------------------------------------------------ per step
    def reset_progress(self) -> None:
        """Starts a new progress line at the next step (after a restore)."""
        self._epoch = None
        self.progress.restart()

    def step_done(self, step: int, metrics: dict,
                  images_per_second: float) -> None:
        """Records the metrics (numpy) of the step that made `step`."""
        per_epoch = self.length.steps_per_epoch
        epoch = (step - 1) // per_epoch
        if epoch != self._epoch:
            self._epoch = epoch
            self.progress.end_line()
            logging.info("Epoch %d/%d", epoch + 1, self.length.num_epochs)
        self.progress.update(step, {
            "loss": float(metrics["loss"]),
            "nelbo": float(metrics["nelbo"]),
            "kl_coeff": float(metrics["kl_coeff"]),
            "lr": float(metrics["learning_rate"])}, images_per_second)
        for key, value in metrics.items():
            if np.ndim(value) == 0 and key not in _INSTANTANEOUS:
                self._sums[key] = self._sums.get(key, 0.0) + float(value)
        self._count += 1
        if step % self.train.summary_every_steps == 0:
            means = {k: v / self._count for k, v in self._sums.items()}
            self._sums, self._count = {}, 0
            eta = self.progress.run_eta(step)
            self.progress.end_line()
            logging.info("step %d/%d: %s, lr %.3g, kl_coeff %.3g, %.1f img/s"
                         "%s", step, self.length.total_steps, ", ".join(
                             f"{k} {v:.4g}" for k, v in sorted(
                                 means.items())),
                         metrics["learning_rate"], metrics["kl_coeff"],
                         images_per_second, "" if eta is None or step >=
                         self.length.total_steps else
                         f", run ETA {format_duration(eta)}")
            if self.is_chief:
                self._write_summaries(step, means, metrics)

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
        """Logs an evaluation (`result["split"]`: `test` or `validation`);
        the chief also writes TensorBoard and the JSON-lines history."""
        epoch = step / self.length.steps_per_epoch
        split = result["split"]
        logging.info("Evaluation at step %d (epoch %.2f): %s NELBO %.3f "
                     "nats, %.4f bits/dim (recon %.3f, KL %.3f; %d images, "
                     "%.1f s).", step, epoch, split, result["nelbo"],
                     result["bpd"], result["recon"], result["kl"],
                     result["num_images"], result["seconds"])
        self.last_eval = (step, result)
        if not self.is_chief:
            return
        prefix = VALIDATION_TAG_PREFIX if split == "validation" else ""
        with self._writer("eval").as_default(step=step):
            for name in ("nelbo", "recon", "kl", "bpd"):
                tf.summary.scalar(prefix + name, result[name])
        self._writer("eval").flush()
        with tf.io.gfile.GFile(os.path.join(
                self.model_dir, EVAL_HISTORY_FILE), "a") as f:
            f.write(json.dumps({"step": step, "epoch": round(epoch, 4),
                                **result}) + "\n")
