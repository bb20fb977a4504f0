"""Evaluates a trained NVAE: likelihood, samples, reconstructions, latents.

    python -m nvae_tf.evaluate --model_dir=DIR --mode=nll \
        [--num_iw_samples=1000 --max_images=N --batch_size=B --restart]
    python -m nvae_tf.evaluate --saved_model=EXPORT_DIR --mode=nll \
        --output=RESULT.json [same options]
    python -m nvae_tf.evaluate --model_dir=DIR --mode=sample \
        [--num_samples=64 --temperature=0.7 --readjust_bn --output=grid.png \
         --output_npy=samples.npy]
    python -m nvae_tf.evaluate --model_dir=DIR --mode=reconstruct
    python -m nvae_tf.evaluate --model_dir=DIR --mode=interpolate

Long loops show a progress bar; the last line on stdout is a JSON object
with the results (`nll` also writes it to --output, default
MODEL_DIR/eval/nll.json). The
data modes read the test split, or the validation split with
`--split=validation`. On a CPU, `nll` and `sample` cut every batch into one part
per core (`--inference_shards`, `nvae_tf.fast.inference_shards`): the same
numbers, faster than TensorFlow's default threading (docs/performance.md).
Both trace
their function with the loaded weights as constants
(`nvae_tf.fast.constant_weights`): weight-only tensors are computed once.

- `nll` (the official `--eval_mode=evaluate`): on the evaluation split,
  for each batch K posterior samples (fresh noise each), log w_k =
  log p(x|z_k) + log p(z_k) - log q(z_k|x), then
  -log p(x) ~ -(logsumexp_k log w_k - log K) per image,
  averaged over images; also the NELBO (unbalanced KL) averaged over the same
  samples. BatchNorm in inference mode. `--iw_samples_per_pass` runs several
  samples in one forward of the tiled batch (same function, more memory).
  Pass p of batch b draws its noise from `inference.sample_seed(seed,
  b * passes + p)` alone.
- `nll --saved_model=DIR`: the same estimate through the export's
  `log_weights` signature (same noise, same numbers), on the dataset and
  data settings recorded in its metadata; the result goes to --output.
  Its batch shards were fixed at export (`inference_shards` in its
  metadata); the process takes the threads that pair with them.
- `nll` survives interruptions: after every batch, its float64 running sums
  and the settings that pin its numbers (weights or export fingerprint,
  dataset, split, seed, K, samples per pass, batch size, --max_images) are
  written atomically to `<output>.progress.json` (nll.progress.json beside
  nll.json). Rerunning the same command resumes after the last finished
  batch and ends with the figures of an uninterrupted run; other settings
  are refused naming the first difference (--restart starts over). SIGINT
  or SIGTERM exit with status 128 + signal number and a line saying how to
  resume. The file is removed once the result is written.
- `sample`: a PNG grid of `--num_samples` images at `--temperature`, with the
  official BatchNorm re-estimation under `--readjust_bn` (cached per
  temperature in MODEL_DIR/bn_stats, see `bn_readjust`).
- `reconstruct`: evaluation images (odd rows) above their reconstructions
  from the posterior means (even rows).
- `interpolate`: one row per pair of evaluation images: image A, decodes of
  linear interpolations of the per-group posterior means, image B.

Bits per dimension follow the official convention: nats / (ln 2 * D) with
D = the stored pixels (28 * 28 for MNIST-like data), for data at the model's
`num_x_bits` (no correction: 5-bit CelebA-HQ is bits/dim of 5-bit data).
For bit-reduced data `*_bpd_8bit` adds 8 - num_x_bits: the same model as a
density of 8-bit pixels, each bin's mass spread evenly over its 8-bit values.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import signal
import sys
import time

import keras
import numpy as np
import tensorflow as tf
from absl import flags, logging

from nvae_tf import cli as cli_lib
from nvae_tf import data
from nvae_tf import flagfiles
from nvae_tf.fast import inference_shards as batch_shards

from nvae_tf.serving import bn_readjust

from nvae_tf.serving import images

from nvae_tf.serving import inference
from nvae_tf.fast.constant_weights import with_constant_weights
from nvae_tf.config import ConfigError
from nvae_tf.experiment import ExperimentConfig
from nvae_tf.training import checkpoints
from nvae_tf.datasets import SOURCE_BITS
from nvae_tf.objectives import bits_per_dim

# Modes whose batches run as batch shards (`--inference_shards`).
SHARDED_MODES = ("nll", "sample")

MODES = ("nll", "sample", "reconstruct", "interpolate")
NLL_FILE = "nll.json"  # `nll` results, in MODEL_DIR/eval/
# The progress of an `nll` run, beside its result (nll.progress.json).
PROGRESS_SUFFIX = ".progress.json"
SAVED_MODEL_FILE = "saved_model.pb"  # what marks a SavedModel directory


# ------------------------------------------------------------------ metrics
def likelihood_report(nll_nats: float, nelbo_nats: float, config) -> dict:
    """NLL and NELBO per image in nats and bits/dim (module docstring)."""
    pixels = config.num_pixels
    report = {"nll_nats": float(nll_nats),
              "nll_bpd": float(bits_per_dim(nll_nats, pixels)),
              "nelbo_nats": float(nelbo_nats),
              "nelbo_bpd": float(bits_per_dim(nelbo_nats, pixels)),
              "num_pixels": pixels, "num_x_bits": config.num_x_bits}
    if config.is_binary:
        report["bpd_convention"] = (
            f"binary pixels; bpd = nats / (ln 2 * {pixels}) (the official "
            "code reports nats for binary data)")
        return report
    bits = config.num_x_bits
    report["bpd_convention"] = (
        f"bits/dim of the {bits}-bit data, nats / (ln 2 * {pixels}), as "
        "the official code")
    if bits < SOURCE_BITS:
        for name in ("nll", "nelbo"):
            report[f"{name}_bpd_8bit"] = report[f"{name}_bpd"] + (
                SOURCE_BITS - bits)
        report["bpd_convention"] += (
            f"; *_bpd_8bit adds {SOURCE_BITS - bits} (each {bits}-bit bin "
            "spread evenly over its 8-bit values)")
    return report


class Interrupted(Exception):
    """An `nll` evaluation stopped by SIGINT or SIGTERM; its progress file
    holds every finished batch."""

    def __init__(self, message: str, signum: int = signal.SIGINT):
        super().__init__(message)
        self.exit_code = 128 + int(signum)  # the shell's convention


class _StopSignal(KeyboardInterrupt):
    """SIGTERM, raised where Python code runs, like SIGINT's
    KeyboardInterrupt."""

    signum = signal.SIGTERM


@contextlib.contextmanager
def stop_on_signals():
    """SIGTERM raises like SIGINT inside the block, so that an interrupted
    evaluation unwinds through its handlers (main thread only)."""
    def handler(signum, frame):  # pylint: disable=unused-argument
        raise _StopSignal()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def progress_path(output: str) -> str:
    """The progress file of the `nll` result `output` (beside it)."""
    return os.path.splitext(output)[0] + PROGRESS_SUFFIX


def _write_atomically(path: str, text: str) -> None:
    """Writes `path` via a temporary file and a rename: a reader (or a
    resumed run) sees the old or the new content, never half of one."""
    tf.io.gfile.makedirs(os.path.dirname(path) or ".")
    tmp = f"{path}.tmp-{os.getpid()}"
    with tf.io.gfile.GFile(tmp, "w") as f:
        f.write(text)
    tf.io.gfile.rename(tmp, path, overwrite=True)


@dataclasses.dataclass
class NllProgress:
    """What a resumed `nll` evaluation needs: the settings that fix its
    numbers and the float64 running sums of the finished batches."""

    settings: dict
    batches: int = 0
    num_images: int = 0
    nll_sum: float = 0.0
    nelbo_sum: float = 0.0

    def save(self, path: str) -> None:
        # json writes a float64 as its shortest exact repr: a resumed run
        # continues from the very same sums.
        _write_atomically(path, json.dumps(
            {**dataclasses.asdict(self), "updated": time.time()}, indent=2))

    @classmethod
    def resume(cls, path: str | None, settings: dict,
               restart: bool = False) -> "NllProgress":
        """The progress in `path` if it has `settings`, else a fresh one.

        Raises:
          cli.UserError: `path` holds progress under other settings (and
            `restart` is False), or cannot be read.
        """
        if path is None or restart or not tf.io.gfile.exists(path):
            return cls(settings=dict(settings))
        with tf.io.gfile.GFile(path) as f:
            text = f.read()
        try:
            saved = json.loads(text)
            saved.pop("updated", None)
            progress = cls(**saved)
        except (ValueError, TypeError) as err:
            raise cli_lib.UserError(
                f"{path} is not a readable progress file ({err}); delete it "
                "or pass --restart.") from err
        for key in sorted(set(settings) | set(progress.settings)):
            old, new = progress.settings.get(key), settings.get(key)
            if old != new:
                raise cli_lib.UserError(
                    f"{path} holds progress of an evaluation with "
                    f"{key}={old!r}, this one has {key}={new!r}: rerun with "
                    "the same settings to resume, or pass --restart to "
                    "start over.")
        return progress


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class _ProgressLine:
    """Images done / total (across resumes), the running NLL and an ETA
    from this process's pace; one line rewritten on a terminal, a line per
    batch otherwise."""

    def __init__(self, target, passes, images_done, batch_size):
        self.target, self.passes = target, passes
        self.batch_size = batch_size
        self.total_passes = math.ceil(target / batch_size) * passes
        self.start_passes = math.ceil(images_done / batch_size) * passes
        self.start = time.time()
        self.tty = sys.stdout.isatty()

    def show(self, images_done, batch, pass_in_batch, nll, final=False):
        done = batch * self.passes + pass_in_batch
        if not (self.tty or final or pass_in_batch == 0):
            return
        elapsed = time.time() - self.start
        rate = (done - self.start_passes) / elapsed if elapsed > 0 else 0
        eta = _duration((self.total_passes - done) / rate) if rate else "?"
        line = (f"nll: {images_done}/{self.target} images, pass "
                f"{pass_in_batch}/{self.passes} of batch {batch + 1}/"
                f"{self.total_passes // self.passes}"
                + (f", nll {nll:.3f} nats" if nll is not None else "")
                + f", {_duration(elapsed)} elapsed, ETA {eta}")
        sys.stdout.write(("\r" + line + "\x1b[K") if self.tty
                         else line + "\n")
        sys.stdout.flush()


def iw_nll_loop(log_weights_fn, dataset, num_iw_samples: int,
                iw_samples_per_pass: int = 1,
                max_images: int | None = None, seed: int = 1,
                total_images: int | None = None, progress: bool = True,
                progress_file: str | None = None,
                settings: dict | None = None, restart: bool = False,
                batch_size: int | None = None) -> dict:
    """Importance-weighted NLL and NELBO with any log-weight function.

    Pass p of batch b uses the sample seed `inference.sample_seed(seed,
    b * passes + p)`: the noise of a batch depends only on the seed and its
    index, so a resumed evaluation draws what an uninterrupted one draws.

    Args:
      log_weights_fn: (x float [B, H, W, C], seed int64 []) -> (log_w,
        nelbo), both [iw_samples_per_pass, B] (`inference.log_weights`
        with `inference.stateless_seed(seed)`).
      dataset: batches of float images [B, H, W, C] in [0, 1], in the same
        order at every run.
      num_iw_samples, iw_samples_per_pass, max_images, seed, total_images:
        as `importance_weighted_nll`.
      progress: print images done / total and an ETA.
      progress_file: where the finished batches' sums are kept (rewritten
        atomically after every batch); an existing file with the same
        `settings` is resumed. None: nothing kept.
      settings: what pins the numbers (K, seed, split, model fingerprint,
        ...); a progress file with other settings is refused.
      restart: ignore an existing progress file.
      batch_size: images per full batch (progress total); default the
        first batch's.

    Returns:
      {"num_images", "num_iw_samples", "nll_nats", "nelbo_nats",
      "resumed_images"}: per-image means in nats, and the images done
      before this call.

    Raises:
      Interrupted: SIGINT (or SIGTERM under `stop_on_signals`); the
        progress file holds the finished batches.
    """
    if num_iw_samples < 1 or iw_samples_per_pass < 1:
        raise ValueError(f"num_iw_samples={num_iw_samples} and "
                         f"iw_samples_per_pass={iw_samples_per_pass} must be "
                         ">= 1.")
    per_pass = min(iw_samples_per_pass, num_iw_samples)
    passes = math.ceil(num_iw_samples / per_pass)
    state = NllProgress.resume(progress_file, settings or {}, restart)
    resumed = state.num_images
    target = total_images if max_images is None else (
        min(max_images, total_images) if total_images else max_images)
    bar = None
    try:
        for batch, x in enumerate(dataset):
            if batch < state.batches:  # finished before a resume
                continue
            if max_images is not None and state.num_images >= max_images:
                break
            if max_images is not None:
                x = x[:max_images - state.num_images]
            if bar is None and progress and target:
                bar = _ProgressLine(target, passes, state.num_images,
                                    batch_size or int(tf.shape(x)[0]))
            log_w, nelbo = [], []
            for i in range(passes):
                if bar is not None:
                    bar.show(state.num_images, batch, i, state.nll_sum /
                             state.num_images if state.num_images else None)
                w, n = log_weights_fn(x, tf.constant(inference.sample_seed(
                    seed, batch * passes + i), tf.int64))
                log_w.append(w)
                nelbo.append(n)
            log_w = tf.concat(log_w, axis=0)[:num_iw_samples]  # [K, B]
            nelbo = tf.concat(nelbo, axis=0)[:num_iw_samples]
            log_px = inference.importance_weighted_log_likelihood(log_w)
            state.num_images += int(log_px.shape[0])
            state.nll_sum -= float(tf.reduce_sum(tf.cast(log_px,
                                                         tf.float64)))
            state.nelbo_sum += float(tf.reduce_sum(
                tf.reduce_mean(tf.cast(nelbo, tf.float64), axis=0)))
            state.batches = batch + 1
            if progress_file is not None:
                state.save(progress_file)
    except KeyboardInterrupt as err:
        signum = getattr(err, "signum", signal.SIGINT)
        where = (f"; the progress is kept in {progress_file}: rerun the "
                 "same command to resume") if progress_file else ""
        raise Interrupted(
            f"stopped by {signal.Signals(signum).name} after "
            f"{state.num_images}/{target or '?'} images{where}.",
            signum) from None
    if state.num_images == 0:
        raise ValueError("The evaluation dataset yielded no images.")
    if bar is not None:
        bar.show(state.num_images, state.batches - 1, passes,
                 state.nll_sum / state.num_images, final=True)
        sys.stdout.write("\n")
    return {"num_images": state.num_images, "num_iw_samples": num_iw_samples,
            "nll_nats": state.nll_sum / state.num_images,
            "nelbo_nats": state.nelbo_sum / state.num_images,
            "resumed_images": resumed}


def model_log_weights(model, iw_samples_per_pass: int = 1, shards: int = 1,
                      constant_weights: bool = True):
    """`iw_nll_loop`'s log-weight function of an `NVAE` (a `tf.function`).

    `shards`: batch shards of each forward (`inference_shards`; same
    result); `constant_weights`: trace with the weights as constants
    (`constant_weights`; same result, faster per pass).
    """
    spec = tf.TensorSpec([None, *model.config.data_shape], tf.float32)

    def log_weights(x, sample_seed):
        return inference.log_weights(model, x, iw_samples_per_pass,
                                     inference.stateless_seed(sample_seed),
                                     shards=shards)

    return tf.function(
        with_constant_weights(model, log_weights) if constant_weights
        else log_weights,
        input_signature=[spec, tf.TensorSpec([], tf.int64)], autograph=False)


def saved_model_log_weights(signature, iw_samples_per_pass: int = 1):
    """`iw_nll_loop`'s log-weight function of an exported `log_weights`
    signature: the batch tiled as `inference.log_weights` tiles it, so the
    noise (and the numbers) are those of `model_log_weights`."""

    def log_weights(x, sample_seed):
        images = tf.tile(inference.images_to_uint8(x),
                         [iw_samples_per_pass, 1, 1, 1])
        out = signature(images=images, seed=sample_seed)
        shape = [iw_samples_per_pass, -1]
        return (tf.reshape(out["log_weights"], shape),
                tf.reshape(out["nelbo_nats"], shape))

    return log_weights


def importance_weighted_nll(model, dataset, num_iw_samples: int,
                            iw_samples_per_pass: int = 1,
                            max_images: int | None = None, seed: int = 1,
                            total_images: int | None = None,
                            progress: bool = True, shards: int = 1,
                            constant_weights: bool = True,
                            **resume) -> dict:
    """Importance-weighted NLL and NELBO over a dataset.

    Args:
      model: an `NVAE`.
      dataset: batches of float images [B, H, W, C] in [0, 1] (bit-reduced /
        binarised as in training).
      num_iw_samples: K posterior samples per image.
      iw_samples_per_pass: samples per forward pass (the batch is tiled).
      max_images: stop after this many images (None: the whole dataset).
      seed: seed of the posterior noise, in [0, 2^32).
      total_images: size of the dataset, for the progress bar.
      progress: show images done / total and an ETA.
      shards: batch shards of each forward (`inference_shards`; same result).
      constant_weights: trace with the weights as constants
        (`constant_weights`; same result, faster per pass).
      **resume: `progress_file`, `settings`, `restart`, `batch_size` of
        `iw_nll_loop`.

    Returns:
      {"num_images", "num_iw_samples", "nll_nats", "nelbo_nats",
      "resumed_images"}, per-image means in nats.
    """
    per_pass = max(1, min(iw_samples_per_pass, num_iw_samples))
    return iw_nll_loop(
        model_log_weights(model, per_pass, shards, constant_weights),
        dataset, num_iw_samples, iw_samples_per_pass, max_images=max_images,
        seed=seed, total_images=total_images, progress=progress, **resume)


# ------------------------------------------------------------------ images
def generate_samples(model, num_samples: int, temperature: float,
                     batch_size: int = 100, seed: int = 1,
                     progress: bool = False, shards: int = 1,
                     constant_weights: bool = True) -> np.ndarray:
    """`num_samples` images [N, H, W, C] in [0, 1], drawn in batches.

    Latents at `temperature`, pixels from the image distribution at t = 1
    (official `evaluate.py`), stateless noise from `seed`; `shards`: batch
    shards of each draw (`inference_shards`; same images);
    `constant_weights`: the model's current weights as constants
    (`constant_weights`; same images).
    """

    def sample_images(n, draw_seed):
        return batch_shards.sample(model, n, shards, temperature,
                                   seed=draw_seed).images

    draw = tf.function(
        with_constant_weights(model, sample_images) if constant_weights
        else sample_images, autograph=False)

    out = []
    batches = math.ceil(num_samples / batch_size)
    bar = keras.utils.Progbar(batches, unit_name="batch") \
        if progress and batches > 1 else None
    for i in range(batches):
        n = min(batch_size, num_samples - i * batch_size)
        out.append(draw(tf.constant(n), tf.constant([seed, i], tf.int64)))
        if bar is not None:
            bar.update(i + 1)
    return np.concatenate([o.numpy() for o in out])


def take_images(dataset, num_images: int) -> np.ndarray:
    """The first `num_images` images of a batched dataset, [N, H, W, C]."""
    taken, count = [], 0
    for x in dataset:
        taken.append(x.numpy()[:num_images - count])
        count += len(taken[-1])
        if count >= num_images:
            break
    if count < num_images:
        raise ValueError(f"Asked for {num_images} images; the evaluation "
                         f"split has only {count}.")
    return np.concatenate(taken)


def reconstruction_grid(x, reconstructions, columns: int) -> np.ndarray:
    """Rows of `columns` inputs, each followed by a row of reconstructions."""
    n = len(x)
    tiles = []
    for start in range(0, n, columns):
        for part in (x, reconstructions):
            row = list(part[start:start + columns])
            row += [np.ones_like(part[0])] * (columns - len(row))
            tiles += row
    return images.make_grid(np.stack(tiles), columns=columns)


# --------------------------------------------------------------------- CLI
FLAGS = flags.FLAGS


def define_flags():
    flags.DEFINE_string("model_dir", None, "nvae_tf model directory.")
    flags.DEFINE_string("saved_model", None,
                        "nll only: evaluate this exported SavedModel (its "
                        "`log_weights` signature) instead of a model "
                        "directory; needs --output.")
    flags.DEFINE_bool("restart", False,
                      "nll: discard the progress file of an earlier, "
                      "unfinished run instead of resuming it.")
    flags.DEFINE_enum("mode", "nll", MODES, "What to evaluate.")
    flags.DEFINE_string("checkpoint", None,
                        "Checkpoint path; default: the latest in model_dir.")
    flags.DEFINE_string("data_dir", None,
                        "Data location; default: config.json's, else the "
                        "dataset's default.")
    flags.DEFINE_enum("image_check", None, list(data.IMAGE_CHECKS),
                      "image_folder files that cannot be decoded: scan stops "
                      "naming them, skip leaves them out with a warning; "
                      "default: config.json's, else scan.")
    flags.DEFINE_integer("batch_size", 0,
                         "Images per batch; 0: config.json's batch size "
                         "(the data section's default for a converted "
                         "official checkpoint).",
                         lower_bound=0)
    flags.DEFINE_integer("seed", bn_readjust.READJUST_SEED,
                         "Seed of every random draw (the default is "
                         "`export`'s, so --readjust_bn statistics cached by "
                         "one command are reused by the other).")
    flags.DEFINE_enum("split", data.TEST_SPLIT, list(data.EVAL_SPLITS),
                      "nll/reconstruct/interpolate: the split to read; "
                      "validation needs the model directory's "
                      "validation_fraction > 0.")
    flags.DEFINE_integer("num_iw_samples", 1000,
                         "nll: importance samples per image (official 1000).",
                         lower_bound=1)
    flags.DEFINE_integer("iw_samples_per_pass", 1,
                         "nll: samples per forward pass (tiles the batch).",
                         lower_bound=1)
    flags.DEFINE_integer("max_images", 0,
                         "nll: evaluate at most this many images (0: all).",
                         lower_bound=0)
    flags.DEFINE_integer(
        "inference_shards", batch_shards.AUTO,
        "nll/sample: cut every batch into this many parts that run on their "
        "own core (1 intra-op thread, this many inter-op threads; same "
        "results). 0: one per CPU core on a CPU-only host, 1 where a GPU or "
        "TPU is visible; 1: off (TensorFlow's threads). With --saved_model: "
        "the shards it was exported with (fixed in its graph).",
        lower_bound=0)
    flags.DEFINE_bool(
        "constant_weights", True,
        "nll/sample: trace with the weights as graph constants, so that "
        "weight-only tensors (weight-normalised kernels, folded batch norms) "
        "are computed once instead of every batch (same results, 7-11% "
        "faster per batch; a few copies of the weights more memory). Turn "
        "off for models with more than 1 GB of weights.")
    flags.DEFINE_integer("num_samples", 64, "sample: number of images.",
                         lower_bound=1)
    flags.DEFINE_float("temperature", 0.7,
                       "sample: latent temperature (official --temp).",
                       lower_bound=0.0)
    flags.DEFINE_bool("readjust_bn", False,
                      "sample: re-estimate BN statistics at --temperature "
                      "(official --readjust_bn); cached in MODEL_DIR/bn_stats.")
    flags.DEFINE_integer("bn_passes", bn_readjust.READJUST_PASSES,
                         "sample: sampling passes of the BN re-estimation.",
                         lower_bound=1)
    flags.DEFINE_integer("bn_batch_size", bn_readjust.READJUST_BATCH_SIZE,
                         "sample: batch size of the BN re-estimation.",
                         lower_bound=1)
    flags.DEFINE_string("output", None,
                        "PNG to write, default MODEL_DIR/eval/<mode>.png; "
                        "nll: the JSON result, default MODEL_DIR/eval/"
                        "nll.json (its progress file goes beside it).")
    flags.DEFINE_string("output_npy", None,
                        "sample: also save the float images [N, H, W, C] in "
                        "[0, 1] as .npy.")
    flags.DEFINE_integer("grid_columns", 0,
                         "Images per grid row; 0: ceil(sqrt(N)) for samples, "
                         "8 for reconstructions.", lower_bound=0)
    flags.DEFINE_integer("num_images", 8, "reconstruct: number of images.",
                         lower_bound=1)
    flags.DEFINE_integer("num_pairs", 4, "interpolate: pairs of images.",
                         lower_bound=1)
    flags.DEFINE_integer("num_steps", 8,
                         "interpolate: decoded points per pair, endpoints "
                         "included.", lower_bound=2)
    flags.register_multi_flags_validator(
        ["model_dir", "saved_model"],
        lambda v: (v["model_dir"] is None) != (v["saved_model"] is None),
        message="pass --model_dir=DIR (a model directory) or "
                "--saved_model=DIR (an export, --mode=nll only), not both.")


def _source():
    return FLAGS.model_dir or FLAGS.saved_model


def _eval_dataset(experiment):
    """The --split of the model directory's (or export's) data section,
    with --batch_size, --data_dir and --image_check if given."""
    data_config = experiment.data
    if FLAGS.split != data.TEST_SPLIT and \
            not data_config.validation_fraction:
        raise cli_lib.UserError(
            f"--split={FLAGS.split}: {_source()} was trained without "
            "a validation split (validation_fraction 0); use --split=test.")
    try:
        data_config = dataclasses.replace(
            data_config, batch_size=FLAGS.batch_size or data_config.batch_size,
            data_dir=FLAGS.data_dir or data_config.data_dir,
            image_check=FLAGS.image_check or data_config.image_check)
        _, eval_ds, info = data.make_datasets(data_config, seed=FLAGS.seed,
                                              eval_split=FLAGS.split)
    except ConfigError as err:
        raise cli_lib.UserError(
            f"{err} (the data settings come from --data_dir, --batch_size "
            f"and {_source()}'s config)") from err
    return eval_ds, info, data_config


def write_json(path: str, result: dict) -> str:
    """Writes `result` (with `output`: `path`) as JSON; returns `path`."""
    tf.io.gfile.makedirs(os.path.dirname(path))
    with tf.io.gfile.GFile(path, "w") as f:
        f.write(json.dumps({**result, "output": path}, indent=2) + "\n")
    return path


def _output(default_name):
    path = FLAGS.output or os.path.join(FLAGS.model_dir, "eval",
                                        default_name)
    return path


def run_nll(loaded):
    model = loaded.model
    per_pass = min(FLAGS.iw_samples_per_pass, FLAGS.num_iw_samples)
    return _nll_report(
        loaded.experiment, model_log_weights(
            model, per_pass, FLAGS.inference_shards, FLAGS.constant_weights),
        {"source": "model_dir", "weights_sha256":
             checkpoints.weights_fingerprint(model.weights)})


def _file_digest(path):
    digest = hashlib.sha256()
    with tf.io.gfile.GFile(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def saved_model_fingerprint(export_dir: str) -> str:
    """SHA-256 of an export's graph and variable index: changes with its
    weights (the index holds a checksum of every variable)."""
    digest = hashlib.sha256()
    for name in (SAVED_MODEL_FILE, os.path.join("variables",
                                                "variables.index")):
        path = os.path.join(export_dir, name)
        if tf.io.gfile.exists(path):
            digest.update(_file_digest(path).encode())
    return digest.hexdigest()


def saved_model_metadata(export_dir: str) -> dict:
    """The export record (`assets.extra/nvae_tf_export.json`) of an nvae_tf
    SavedModel. Reads a file only, so it may run before TensorFlow's runtime
    starts (while its threads can still be set)."""
    from nvae_tf.serving import export  # pylint: disable=import-outside-toplevel
    meta_path = os.path.join(export_dir, export.METADATA_FILE)
    if not tf.io.gfile.exists(meta_path):
        raise cli_lib.UserError(
            f"{meta_path} is missing: --saved_model must be an nvae_tf "
            "export (`python -m nvae_tf.export`).")
    with tf.io.gfile.GFile(meta_path) as f:
        return json.loads(f.read())


def saved_model_shards(metadata: dict) -> int:
    """The batch shards traced into an export's signatures (1 for exports
    that do not record them). They are fixed at export: the evaluating
    process only picks the threads that pair with them."""
    shards = int(metadata.get("inference_shards", 1))
    if FLAGS["inference_shards"].present and \
            FLAGS.inference_shards != shards:
        raise cli_lib.UserError(
            f"--inference_shards={FLAGS.inference_shards}: the signatures of "
            f"--saved_model={FLAGS.saved_model} were exported with "
            f"{shards} shard(s), fixed in its graph; drop the flag, or export "
            "again with `python -m nvae_tf.export "
            f"--inference_shards={FLAGS.inference_shards}`.")
    return shards


def load_saved_model(export_dir: str):
    """(`log_weights` signature, export metadata, `ExperimentConfig` of
    the model and data recorded in it) of an nvae_tf SavedModel."""
    metadata = saved_model_metadata(export_dir)
    if "log_weights" not in metadata.get("signatures", []):
        raise cli_lib.UserError(
            f"{export_dir} has no `log_weights` signature (exported by an "
            "older nvae_tf): export it again with `python -m nvae_tf.export`"
            " to evaluate its NLL.")
    experiment = ExperimentConfig.from_dict(
        {"model": metadata["config"], "data": metadata.get("data") or {}})
    signature = tf.saved_model.load(export_dir).signatures["log_weights"]
    return signature, metadata, experiment


def run_nll_saved_model():
    """`nll` through the `log_weights` signature of --saved_model."""
    signature, metadata, experiment = load_saved_model(FLAGS.saved_model)
    per_pass = min(FLAGS.iw_samples_per_pass, FLAGS.num_iw_samples)
    result = _nll_report(
        experiment, saved_model_log_weights(signature, per_pass),
        {"source": "saved_model",
         "saved_model_sha256": saved_model_fingerprint(FLAGS.saved_model)})
    return {"checkpoint": metadata.get("checkpoint"), **result}


def _nll_output():
    return FLAGS.output or os.path.join(FLAGS.model_dir, "eval", NLL_FILE)


def _nll_report(experiment, log_weights_fn, fingerprint):
    """Runs `iw_nll_loop` with a progress file beside the output and
    the settings that pin its numbers."""
    eval_ds, info, data_config = _eval_dataset(experiment)
    total = (info.num_validation if FLAGS.split != data.TEST_SPLIT
             else info.num_eval)
    settings = {**fingerprint, "dataset": data_config.dataset,
                "split": FLAGS.split, "seed": FLAGS.seed,
                "num_iw_samples": FLAGS.num_iw_samples,
                "iw_samples_per_pass": min(FLAGS.iw_samples_per_pass,
                                           FLAGS.num_iw_samples),
                "batch_size": data_config.batch_size,
                "max_images": FLAGS.max_images}
    try:
        inference.sample_seed(FLAGS.seed, 0)
    except ValueError as err:
        raise cli_lib.UserError(f"--seed: {err}") from err
    with stop_on_signals():
        result = iw_nll_loop(
            log_weights_fn, eval_ds, FLAGS.num_iw_samples,
            FLAGS.iw_samples_per_pass, max_images=FLAGS.max_images or None,
            seed=FLAGS.seed, total_images=total,
            progress_file=progress_path(_nll_output()), settings=settings,
            restart=FLAGS.restart, batch_size=data_config.batch_size)
    return {"split": FLAGS.split, **result,
            **likelihood_report(result["nll_nats"], result["nelbo_nats"],
                                experiment.model)}


def run_sample(loaded):
    model, t = loaded.model, FLAGS.temperature
    result = {"num_samples": FLAGS.num_samples, "temperature": t,
              "readjust_bn": FLAGS.readjust_bn}
    if FLAGS.readjust_bn:
        readjust = bn_readjust.readjust_batchnorm(
            model, t, model_dir=FLAGS.model_dir,
            checkpoint_id=loaded.checkpoint_id, num_passes=FLAGS.bn_passes,
            batch_size=FLAGS.bn_batch_size, seed=FLAGS.seed, progress=True)
        result.update(bn_stats=readjust.cache_path,
                      bn_stats_from_cache=readjust.from_cache)
    samples = generate_samples(model, FLAGS.num_samples, t,
                               batch_size=FLAGS.batch_size or 100,
                               seed=FLAGS.seed, progress=True,
                               shards=FLAGS.inference_shards,
                               constant_weights=FLAGS.constant_weights)
    grid = images.make_grid(samples, columns=FLAGS.grid_columns or None)
    result["output"] = images.write_png(
        _output(f"sample_t{bn_readjust.temperature_tag(t)}.png"), grid)
    result["grid"] = list(images.grid_layout(
        FLAGS.num_samples, FLAGS.grid_columns or None))
    result["png_size"] = list(grid.shape[:2])
    if FLAGS.output_npy:
        with tf.io.gfile.GFile(FLAGS.output_npy, "wb") as f:
            np.save(f, samples)
        result["output_npy"] = FLAGS.output_npy
    return result


def run_reconstruct(loaded):
    model = loaded.model
    eval_ds, _, _ = _eval_dataset(loaded.experiment)
    x = take_images(eval_ds, FLAGS.num_images)
    recon = inference.reconstruct(model, x).numpy()
    columns = FLAGS.grid_columns or min(8, len(x))
    output = images.write_png(_output("reconstruct.png"),
                              reconstruction_grid(x, recon, columns))
    return {"num_images": len(x), "output": output,
            "mean_squared_error": float(np.mean((x - recon) ** 2))}


def run_interpolate(loaded):
    model = loaded.model
    eval_ds, _, _ = _eval_dataset(loaded.experiment)
    x = take_images(eval_ds, 2 * FLAGS.num_pairs)
    x_start, x_end = x[0::2], x[1::2]
    paths = inference.interpolate(model, x_start, x_end,
                                  FLAGS.num_steps).numpy()
    rows = np.concatenate([x_start[:, None], paths, x_end[:, None]], axis=1)
    columns = FLAGS.num_steps + 2
    output = images.write_png(
        _output("interpolate.png"),
        images.make_grid(rows.reshape(-1, *rows.shape[2:]), columns=columns))
    return {"num_pairs": FLAGS.num_pairs, "num_steps": FLAGS.num_steps,
            "output": output}


def _check_source():
    """One-line errors for a SavedModel given as --model_dir and back, and
    for what a SavedModel cannot do."""
    if FLAGS.model_dir and tf.io.gfile.exists(
            os.path.join(FLAGS.model_dir, SAVED_MODEL_FILE)):
        raise cli_lib.UserError(
            f"--model_dir={FLAGS.model_dir} is a SavedModel; evaluate it "
            f"with --saved_model={FLAGS.model_dir} --mode=nll "
            "--output=RESULT.json.")
    if not FLAGS.saved_model:
        return
    if not tf.io.gfile.exists(os.path.join(FLAGS.saved_model,
                                           SAVED_MODEL_FILE)):
        raise cli_lib.UserError(
            f"--saved_model={FLAGS.saved_model} holds no {SAVED_MODEL_FILE}"
            "; pass a model directory as --model_dir.")
    if FLAGS.mode != "nll":
        raise cli_lib.UserError(
            f"--mode={FLAGS.mode} needs --model_dir; with --saved_model only "
            "--mode=nll runs (the export serves the rest as signatures).")
    if not FLAGS.output:
        raise cli_lib.UserError(
            "--saved_model needs --output=PATH.json for the result (its "
            "progress file goes beside it), outside the SavedModel.")
    inside = os.path.relpath(os.path.abspath(FLAGS.output),
                             os.path.abspath(FLAGS.saved_model))
    if not inside.startswith(os.pardir):
        raise cli_lib.UserError(
            f"--output={FLAGS.output} is inside the SavedModel; write the "
            "result elsewhere (a SavedModel stays as exported).")
    if FLAGS.checkpoint:
        raise cli_lib.UserError("--checkpoint is for --model_dir; a "
                                "SavedModel holds one set of weights.")


def main(argv):
    if len(argv) > 1:
        raise cli_lib.UserError(f"Unexpected arguments {argv[1:]}; pass "
                                "--model_dir=... --mode=...")
    _check_source()
    try:
        return _evaluate()
    except Interrupted as err:
        sys.stderr.write(f"Interrupted: {err}\n")
        return err.exit_code


def _evaluate():
    start = time.time()
    # Before the first op: threads are fixed when TensorFlow starts. Only
    # the modes that shard their batches get the shards' threads; a
    # SavedModel's shards are those it was exported with (an unsharded
    # export on one intra-op thread would leave cores idle).
    if FLAGS.saved_model:
        FLAGS.inference_shards = saved_model_shards(
            saved_model_metadata(FLAGS.saved_model))
    else:
        FLAGS.inference_shards = batch_shards.resolve_shards(
            FLAGS.inference_shards) if FLAGS.mode in SHARDED_MODES else 1
    batch_shards.configure_shard_threads(FLAGS.inference_shards)
    if FLAGS.saved_model:
        logging.info("Evaluating the SavedModel %s (nll).", FLAGS.saved_model)
        result = {"mode": FLAGS.mode, "saved_model": FLAGS.saved_model,
                  **run_nll_saved_model()}
        return _finish(result, start)
    loaded = inference.load_model(FLAGS.model_dir, FLAGS.checkpoint)
    logging.info("Evaluating %s (%s).", loaded.checkpoint_path, FLAGS.mode)
    runner = {"nll": run_nll, "sample": run_sample,
              "reconstruct": run_reconstruct,
              "interpolate": run_interpolate}[FLAGS.mode]
    result = {"mode": FLAGS.mode, "model_dir": FLAGS.model_dir,
              "checkpoint": loaded.checkpoint_id, **runner(loaded)}
    return _finish(result, start)


def _finish(result, start):
    """Adds the time and skipped files, writes the nll JSON (and drops its
    progress file), prints the result as the last line."""
    result["seconds"] = round(time.time() - start, 2)
    # What the time ran on (0: TensorFlow's default, one thread per core).
    result["threads"] = {
        "inference_shards": FLAGS.inference_shards,
        "intra_op": tf.config.threading.get_intra_op_parallelism_threads(),
        "inter_op": tf.config.threading.get_inter_op_parallelism_threads()}
    skipped = data.skipped_image_files()
    if skipped:
        result["skipped_images"] = len(skipped)
        logging.warning("%d image file(s) could not be decoded and were left "
                        "out (remove or fix them): %s", len(skipped),
                        ", ".join(skipped))
    if FLAGS.mode == "nll":  # the figures stay with the model
        result["output"] = write_json(_nll_output(), result)
        progress = progress_path(result["output"])
        if tf.io.gfile.exists(progress):
            tf.io.gfile.remove(progress)
    sys.stdout.write("\n" + json.dumps(result) + "\n")
    return 0


def cli():
    """Entry point of `python -m nvae_tf.evaluate`."""
    define_flags()
    cli_lib.run(main, argv=flagfiles.command_line(__name__))


if __name__ == "__main__":
    cli()
