"""Evaluates a trained NVAE: likelihood, samples, reconstructions, latents.

    python -m nvae_tf.evaluate --model_dir=DIR --mode=nll \
        [--num_iw_samples=1000 --max_images=N --batch_size=B]
    python -m nvae_tf.evaluate --model_dir=DIR --mode=sample \
        [--num_samples=64 --temperature=0.7 --readjust_bn --output=grid.png \
         --output_npy=samples.npy]
    python -m nvae_tf.evaluate --model_dir=DIR --mode=reconstruct
    python -m nvae_tf.evaluate --model_dir=DIR --mode=interpolate

Long loops show a progress bar; the last line on stdout is a JSON object
with the results (`nll` also writes it to MODEL_DIR/eval/nll.json). The
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

import dataclasses
import json
import math
import os
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
from nvae_tf.datasets import SOURCE_BITS
from nvae_tf.objectives import bits_per_dim

# Modes whose batches run as batch shards (`--inference_shards`).
SHARDED_MODES = ("nll", "sample")

MODES = ("nll", "sample", "reconstruct", "interpolate")
NLL_FILE = "nll.json"  # `nll` results, in MODEL_DIR/eval/


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


def importance_weighted_nll(model, dataset, num_iw_samples: int,
                            iw_samples_per_pass: int = 1,
                            max_images: int | None = None, seed: int = 1,
                            total_images: int | None = None,
                            progress: bool = True, shards: int = 1,
                            constant_weights: bool = True) -> dict:
    """Importance-weighted NLL and NELBO over a dataset.

    Args:
      model: an `NVAE`.
      dataset: batches of float images [B, H, W, C] in [0, 1] (bit-reduced /
        binarised as in training).
      num_iw_samples: K posterior samples per image.
      iw_samples_per_pass: samples per forward pass (the batch is tiled).
      max_images: stop after this many images (None: the whole dataset).
      seed: seed of the posterior noise.
      total_images: size of the dataset, for the progress bar.
      progress: show a progress bar (counts forward passes).
      shards: batch shards of each forward (`inference_shards`; same result).
      constant_weights: trace with the weights as constants
        (`constant_weights`; same result, faster per pass).

    Returns:
      {"num_images", "num_iw_samples", "nll_nats", "nelbo_nats"}, per-image
      means in nats.
    """
    if num_iw_samples < 1 or iw_samples_per_pass < 1:
        raise ValueError(f"num_iw_samples={num_iw_samples} and "
                         f"iw_samples_per_pass={iw_samples_per_pass} must be "
                         ">= 1.")
    per_pass = min(iw_samples_per_pass, num_iw_samples)
    passes = math.ceil(num_iw_samples / per_pass)
    spec = tf.TensorSpec([None, *model.config.data_shape], tf.float32)

    def log_weights(x, pass_seed):
        return inference.log_weights(model, x, per_pass, pass_seed,
                                     shards=shards)

    iw_pass = tf.function(
        with_constant_weights(model, log_weights) if constant_weights
        else log_weights,
        input_signature=[spec, tf.TensorSpec([2], tf.int64)], autograph=False)

    target = total_images if max_images is None else (
        min(max_images, total_images) if total_images else max_images)
    bar = None
    count, nll_sum, nelbo_sum, pass_index = 0, 0.0, 0.0, 0
    for x in dataset:
        if max_images is not None and count >= max_images:
            break
        if max_images is not None:
            x = x[:max_images - count]
        if bar is None and progress and target:
            batches = math.ceil(target / int(tf.shape(x)[0]))
            bar = keras.utils.Progbar(batches * passes, unit_name="pass",
                                      stateful_metrics=["nll", "nelbo"])
        log_w, nelbo = [], []
        for i in range(passes):
            w, n = iw_pass(x, tf.constant([seed, pass_index], tf.int64))
            log_w.append(w)
            nelbo.append(n)
            pass_index += 1
            if bar is not None and i < passes - 1:
                bar.add(1)
        log_w = tf.concat(log_w, axis=0)[:num_iw_samples]  # [K, B]
        nelbo = tf.concat(nelbo, axis=0)[:num_iw_samples]
        log_px = inference.importance_weighted_log_likelihood(log_w)
        count += int(log_px.shape[0])
        nll_sum -= float(tf.reduce_sum(tf.cast(log_px, tf.float64)))
        nelbo_sum += float(tf.reduce_sum(
            tf.reduce_mean(tf.cast(nelbo, tf.float64), axis=0)))
        if bar is not None:
            bar.add(1, [("nll", nll_sum / count), ("nelbo", nelbo_sum / count)])
    if count == 0:
        raise ValueError("The evaluation dataset yielded no images.")
    return {"num_images": count, "num_iw_samples": num_iw_samples,
            "nll_nats": nll_sum / count, "nelbo_nats": nelbo_sum / count}


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
        "TPU is visible; 1: off (TensorFlow's threads).",
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
                        "PNG to write; default MODEL_DIR/eval/<mode>.png.")
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
    flags.mark_flag_as_required("model_dir")


def _eval_dataset(experiment):
    """The --split of the model directory's data section, with
    --batch_size, --data_dir and --image_check if given."""
    data_config = experiment.data
    if FLAGS.split != data.TEST_SPLIT and \
            not data_config.validation_fraction:
        raise cli_lib.UserError(
            f"--split={FLAGS.split}: {FLAGS.model_dir} was trained without "
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
            f"and {FLAGS.model_dir}/config.json)") from err
    return eval_ds, info


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
    eval_ds, info = _eval_dataset(loaded.experiment)
    result = importance_weighted_nll(
        model, eval_ds, FLAGS.num_iw_samples, FLAGS.iw_samples_per_pass,
        max_images=FLAGS.max_images or None, seed=FLAGS.seed,
        total_images=(info.num_validation if FLAGS.split != data.TEST_SPLIT
                      else info.num_eval), shards=FLAGS.inference_shards,
        constant_weights=FLAGS.constant_weights)
    return {"split": FLAGS.split, **result,
            **likelihood_report(result["nll_nats"], result["nelbo_nats"],
                                model.config)}


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
    eval_ds, _ = _eval_dataset(loaded.experiment)
    x = take_images(eval_ds, FLAGS.num_images)
    recon = inference.reconstruct(model, x).numpy()
    columns = FLAGS.grid_columns or min(8, len(x))
    output = images.write_png(_output("reconstruct.png"),
                              reconstruction_grid(x, recon, columns))
    return {"num_images": len(x), "output": output,
            "mean_squared_error": float(np.mean((x - recon) ** 2))}


def run_interpolate(loaded):
    model = loaded.model
    eval_ds, _ = _eval_dataset(loaded.experiment)
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


def main(argv):
    if len(argv) > 1:
        raise cli_lib.UserError(f"Unexpected arguments {argv[1:]}; pass "
                                "--model_dir=... --mode=...")
    start = time.time()
    # Before the first op: threads are fixed when TensorFlow starts. Only
    # the modes that shard their batches get the shards' threads.
    FLAGS.inference_shards = batch_shards.resolve_shards(
        FLAGS.inference_shards) if FLAGS.mode in SHARDED_MODES else 1
    batch_shards.configure_shard_threads(FLAGS.inference_shards)
    loaded = inference.load_model(FLAGS.model_dir, FLAGS.checkpoint)
    logging.info("Evaluating %s (%s).", loaded.checkpoint_path, FLAGS.mode)
    runner = {"nll": run_nll, "sample": run_sample,
              "reconstruct": run_reconstruct,
              "interpolate": run_interpolate}[FLAGS.mode]
    result = {"mode": FLAGS.mode, "model_dir": FLAGS.model_dir,
              "checkpoint": loaded.checkpoint_id, **runner(loaded),
              "seconds": round(time.time() - start, 2)}
    skipped = data.skipped_image_files()
    if skipped:
        result["skipped_images"] = len(skipped)
        logging.warning("%d image file(s) could not be decoded and were left "
                        "out (remove or fix them): %s", len(skipped),
                        ", ".join(skipped))
    if FLAGS.mode == "nll":  # the figures stay with the model
        result["output"] = write_json(
            os.path.join(FLAGS.model_dir, "eval", NLL_FILE), result)
    sys.stdout.write("\n" + json.dumps(result) + "\n")


def cli():
    """Entry point of `python -m nvae_tf.evaluate`."""
    define_flags()
    cli_lib.run(main, argv=flagfiles.command_line(__name__))


if __name__ == "__main__":
    cli()
