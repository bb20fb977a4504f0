"""SavedModel export of a trained NVAE for TF Serving.

    python -m nvae_tf.export --model_dir=DIR \
        --export_dir=saved_models/<name>/<version> [--temperature=0.7 \
        --readjust_bn --inference_shards=N --constant_weights]

The SavedModel (built with `keras.export.ExportArchive`) has six
signatures. H, W, C are the stored image size (28x28x1 for MNIST-like data);
pixels are uint8 0..255:

- `sample` (also `serving_default`): `num_samples` int32 [],
  `temperature` float32 [], `seed` int64 [] -> `images` uint8 [N, H, W, C];
- `reconstruct`: `images` uint8 [B, H, W, C] -> `images` uint8 [B, H, W, C];
- `log_likelihood`: `images` uint8 [B, H, W, C] -> `nelbo_nats` and
  `bits_per_dim`, float32 [B];
- `log_weights`: `images` uint8 [B, H, W, C], `seed` int64 [] ->
  `log_weights` and `nelbo_nats`, float32 [B];
- `encode`: `images` uint8 [B, H, W, C] -> `latent_000`, `latent_001`, ...
  float32 [B, h_k, w_k, L] (posterior means of the groups, top-down) and
  `scale_000`, ... (posterior standard deviations);
- `decode`: `latent_000`, ... float32 [B, h_k, w_k, L] -> `images` uint8.

- `sample` draws the latents at `temperature` and the pixels from the image
  distribution with stateless random ops seeded by `seed`: the same inputs
  give the same images, in any process. With `readjust_bn` its BatchNorm
  layers use statistics re-estimated at the export temperature
  (`bn_readjust`); the other signatures keep the training statistics, which
  belong to posterior latents.
- `reconstruct` and `decode` show the image distribution's mean;
  `reconstruct` and `encode` use the posterior means (zero noise).
- `log_likelihood` is a one-sample NELBO estimate with fixed noise (its
  expectation bounds -log p(x) from above). Non-binary images are reduced
  to the model's `num_x_bits` as in training; binary models threshold at
  128.
- `log_weights` is one importance sample per image: log p(x|z) + log p(z) -
  log q(z|x) for z ~ q(z|x) drawn with the stateless seed of `seed`'s two
  32-bit halves (`inference.stateless_seed`), and that sample's NELBO. The
  importance-weighted NLL is -(logsumexp over K seeds - log K), in any
  runtime; `python -m nvae_tf.evaluate --mode=nll --saved_model=DIR` runs
  it with the noise of `--model_dir` evaluation (`inference.sample_seed`).
- Inputs are checked inside the graph, so a wrong size or a non-finite
  latent fails with a message that names the input in every runtime (TF
  Serving included); dtype and rank are fixed by the signature.

`--inference_shards` and `--constant_weights` make `sample`,
`log_likelihood` and `log_weights` faster on a CPU with the same outputs
(docs/serving.md).

The directory is written next to its final place and renamed into it, so TF
Serving, which polls `<name>/` for numeric version folders, never sees a
half-written version. `assets.extra/nvae_tf_export.json` records the
config, the model directory's data section (what `evaluate --saved_model`
reads), the checkpoint and the settings.
"""

from __future__ import annotations

import json
import os
import sys
import time

import keras
import tensorflow as tf
from absl import flags, logging

from nvae_tf import cli as cli_lib
from nvae_tf import flagfiles
from nvae_tf.serving import bn_readjust
from nvae_tf.training import checkpoints

from nvae_tf.serving import inference
from nvae_tf.fast import inference_shards
from nvae_tf.fast.constant_weights import (with_constant_weights,
                                          with_substituted_weights)
from nvae_tf.objectives import bits_per_dim

DEFAULT_TEMPERATURE = 0.7  # official evaluate.py --temp
MAX_SAMPLES = 1024  # largest `num_samples` one `sample` request may ask for
METADATA_FILE = os.path.join("assets.extra", "nvae_tf_export.json")
SIGNATURES = ("sample", "reconstruct", "log_likelihood", "encode", "decode",
              "log_weights")
# The signatures that `inference_shards` and `constant_weights` speed up:
# the ones that run whole forwards per request (`log_weights` K times per
# image for an importance-weighted NLL).
FAST_SIGNATURES = ("sample", "log_likelihood", "log_weights")
# Argument names of the weights a signature captures (see `_traced`).
CAPTURED_INPUT_PREFIX = "captured_"


def latent_name(k: int) -> str:
    return f"latent_{k:03d}"


def scale_name(k: int) -> str:
    return f"scale_{k:03d}"


def _check_shape(tensor, expected, what):
    """Asserts tensor's [B, ...] dims == expected and B >= 1, then sets the
    static shape. The message names the expected shape."""
    shape_text = ", ".join(["batch"] + [str(d) for d in expected])
    message = (f"{what} must have shape [{shape_text}] with batch >= 1; got "
               "shape")
    actual = tf.shape(tensor)
    rank = len(expected) + 1
    # Padded to the expected rank first, so that a wrong rank (possible when
    # a server skips the signature's rank check) fails here as well.
    dims = tf.pad(actual, [[0, rank]])[:rank]
    ok = tf.reduce_all([
        tf.equal(tf.size(actual), rank),
        tf.reduce_all(tf.equal(dims[1:], tf.constant(expected, tf.int32))),
        dims[0] >= 1])
    check = tf.debugging.Assert(ok, [message, actual], summarize=8,
                                name="check_shape")
    with tf.control_dependencies([check]):
        return tf.ensure_shape(tf.identity(tensor), [None, *expected])


class _Signatures:
    """The exported functions of one model (see the module docstring)."""

    def __init__(self, model, max_samples: int, shards: int = 1):
        self.model = model
        self.shards = shards
        self.config = model.config
        self.max_samples = max_samples
        self.image_shape = list(model.config.data_shape)
        self.latent_shapes = [list(s[1:]) for s in model.latent_shapes()]

    def _images(self, images):
        images = _check_shape(images, self.image_shape, "`images` (uint8)")
        return inference.images_from_uint8(images, self.config)

    def sample(self, num_samples, temperature, seed):
        checks = [
            tf.debugging.Assert(
                tf.logical_and(num_samples >= 1,
                               num_samples <= self.max_samples),
                [f"`num_samples` must be in [1, {self.max_samples}]; got",
                 num_samples]),
            tf.debugging.Assert(
                tf.logical_and(temperature >= 0.0,
                               tf.math.is_finite(temperature)),
                ["`temperature` must be finite and >= 0; got", temperature]),
        ]
        with tf.control_dependencies(checks):
            num_samples = tf.identity(num_samples)
        # The int64 seed's two 32-bit halves form the stateless seed.
        out = inference_shards.sample(self.model, num_samples, self.shards,
                                      temperature,
                                      seed=tf.bitcast(seed, tf.int32))
        return {"images": inference.images_to_uint8(out.images)}

    def reconstruct(self, images):
        x = self._images(images)
        return {"images": inference.images_to_uint8(
            inference.reconstruct(self.model, x))}

    def log_likelihood(self, images):
        x = self._images(images)
        out = inference_shards.forward(
            self.model, x, self.shards,
            seed=tf.constant(inference.FIXED_NOISE_SEED))
        return {"nelbo_nats": out.nelbo,
                "bits_per_dim": bits_per_dim(out.nelbo,
                                             self.config.num_pixels)}

    def log_weights(self, images, seed):
        # The same maths and noise as `evaluate` on a model directory: one
        # sample of `inference.log_weights`.
        log_w, nelbo = inference.log_weights(
            self.model, self._images(images), 1,
            inference.stateless_seed(seed), shards=self.shards)
        return {"log_weights": log_w[0], "nelbo_nats": nelbo[0]}

    def encode(self, images):
        means, scales = self.model.encode(self._images(images))
        outputs = {latent_name(k): z for k, z in enumerate(means)}
        outputs.update({scale_name(k): s for k, s in enumerate(scales)})
        return outputs

    def decode(self, *latents):
        checked = [_check_shape(z, shape, f"`{latent_name(k)}` (float32)")
                   for k, (z, shape) in enumerate(zip(latents,
                                                      self.latent_shapes))]
        batch = tf.shape(checked[0])[0]
        same = tf.debugging.Assert(
            tf.reduce_all(tf.stack([tf.shape(z)[0] for z in checked])
                          == batch),
            ["every latent_NNN must have the same batch size"])
        # A NaN or inf latent would decode to an image of clipped garbage.
        finite = [tf.debugging.Assert(
            tf.reduce_all(tf.math.is_finite(z)),
            [f"`{latent_name(k)}` (float32) must be finite; it holds NaN "
             "or inf values"], name="check_finite")
            for k, z in enumerate(checked)]
        with tf.control_dependencies([same, *finite]):
            checked = [tf.identity(z) for z in checked]
        return {"images": inference.images_to_uint8(
            inference.decode_mean(self.model, checked))}

    def input_signatures(self):
        """The signatures' input specs: the batch is free, the image and
        latent shapes are declared (`saved_model_cli show` and TF Serving
        clients see them); the in-graph checks stay for servers that do
        not enforce them."""
        images = [tf.TensorSpec([None, *self.image_shape], tf.uint8,
                                name="images")]
        return {
            "sample": [tf.TensorSpec([], tf.int32, name="num_samples"),
                       tf.TensorSpec([], tf.float32, name="temperature"),
                       tf.TensorSpec([], tf.int64, name="seed")],
            "reconstruct": images,
            "log_likelihood": images,
            "log_weights": images + [tf.TensorSpec([], tf.int64,
                                                   name="seed")],
            "encode": images,
            "decode": [tf.TensorSpec([None, *shape], tf.float32,
                                     name=latent_name(k))
                       for k, shape in enumerate(self.latent_shapes)],
        }


def _traced(fn, input_signature):
    """A `tf.function` endpoint for `fn`, traced now and only now.

    `tf.saved_model.save` traces endpoints again. The endpoint therefore
    only calls the concrete function traced here: its retrace re-emits that
    call instead of re-running the model code, which keeps the export fast
    and keeps what was traced with substituted weights
    (`with_substituted_weights`).

    The wrapper captures the traced function's weights (its captured
    inputs) under valid argument names, `captured_NNNN`. Left to itself, a
    call of a traced function inside another captures them under numeric
    ids, which SavedModel signatures cannot use: the save then renames every
    one of them and logs each renaming (thousands of names per signature).
    """
    concrete = tf.function(fn, input_signature=input_signature,
                           autograph=False).get_concrete_function()

    def call_traced(*args):
        graph = tf.compat.v1.get_default_graph()
        for k, value in enumerate(concrete.captured_inputs):
            graph.capture(value, name=f"{CAPTURED_INPUT_PREFIX}{k:04d}")
        return concrete(*args)

    function = tf.function(call_traced, input_signature=input_signature,
                           autograph=False)
    function.get_concrete_function()
    return function


def _check_new_version(export_dir):
    """Refuses to replace an existing export version."""
    if tf.io.gfile.exists(export_dir):
        raise FileExistsError(f"{export_dir} exists; pick a new version "
                              "number, or pass --overwrite (overwrite=True) "
                              "to replace it.")


def _data_settings(model_dir):
    """The data section of `model_dir`'s config.json (what evaluation of
    the export reads), or None without a readable one."""
    if model_dir is None:
        return None
    try:
        return checkpoints.read_config(model_dir).to_dict()["data"]
    except (FileNotFoundError, ValueError) as err:
        logging.warning("No data settings recorded in the export (%s); "
                        "evaluation will use the dataset's defaults.", err)
        return None


def _directory_size(path):
    total = 0
    for root, _, files in tf.io.gfile.walk(path):
        for name in files:
            total += tf.io.gfile.stat(os.path.join(root, name)).length
    return total


def export_saved_model(model, export_dir: str,
                       temperature: float = DEFAULT_TEMPERATURE,
                       readjust_bn: bool = False,
                       model_dir: str | None = None,
                       checkpoint_id: str | None = None,
                       bn_passes: int = bn_readjust.READJUST_PASSES,
                       bn_batch_size: int = bn_readjust.READJUST_BATCH_SIZE,
                       bn_seed: int = bn_readjust.READJUST_SEED,
                       max_samples: int = MAX_SAMPLES,
                       overwrite: bool = False,
                       inference_shards: int = 1,
                       constant_weights: bool = False) -> dict:
    """Writes the serving SavedModel of `model` to `export_dir`.

    Args:
      model: a built `NVAE` with trained weights (not modified).
      export_dir: `saved_models/<name>/<version>`; TF Serving needs the last
        component to be an integer version.
      temperature: temperature of the BN re-estimation, recorded as the
        recommended `sample` temperature.
      readjust_bn: bake BN statistics re-estimated at `temperature` into
        `sample` (cached in `model_dir/bn_stats/` when `model_dir` is set).
      model_dir: the model directory (for the BN cache and the metadata,
        which records its data section).
      checkpoint_id: the checkpoint the weights come from (metadata).
      bn_passes, bn_batch_size: the re-estimation (official 500, 16).
      bn_seed: seed of the re-estimation's sampling passes; the default is
        `evaluate --readjust_bn`'s, so both reuse one cached file.
      max_samples: largest `num_samples` the `sample` signature accepts.
      overwrite: replace an existing `export_dir`.
      inference_shards: `FAST_SIGNATURES` cut a request's batch
        into this many parts (`inference_shards`; same outputs). Faster when
        the server runs 1 intra-op thread and this many inter-op threads
        (docs/serving.md); with the server's default threads it gains
        nothing.
      constant_weights: `FAST_SIGNATURES` hold the weights as graph
        constants (`constant_weights`): weight-only tensors are computed
        once when the server loads the model, not per request (same
        outputs). Each of their graphs then carries a copy of the weights.

    Returns:
      The metadata written to `assets.extra/nvae_tf_export.json` (with the
      final `export_dir` and its size in bytes).

    Raises:
      FileExistsError: `export_dir` exists and `overwrite` is False.
    """
    export_dir = os.fspath(export_dir).rstrip("/")
    if not overwrite:
        _check_new_version(export_dir)
    if not os.path.basename(export_dir).isdigit():
        logging.warning("%s: TF Serving only loads numeric version folders "
                        "(saved_models/<name>/<version>).", export_dir)
    start = time.time()
    if inference_shards < 1:
        raise ValueError(f"inference_shards must be >= 1, got "
                         f"{inference_shards}.")
    signatures = _Signatures(model, max_samples, inference_shards)
    specs = signatures.input_signatures()
    # The endpoints' variables are tracked by the archive; tracking the
    # whole Keras model as well would make the save trace its layers again.
    archive = keras.export.ExportArchive()
    bn_info = None
    for name in SIGNATURES:
        fn = getattr(signatures, name)
        substitutes = []
        if name == "sample" and readjust_bn:
            result = bn_readjust.readjusted_statistics(
                model, temperature, model_dir=model_dir,
                checkpoint_id=checkpoint_id, num_passes=bn_passes,
                batch_size=bn_batch_size, seed=bn_seed)
            substitutes = bn_readjust.statistics_substitutes(
                model, result.statistics)
            bn_info = {"cache_path": result.cache_path,
                       "from_cache": result.from_cache, **result.metadata}
        if constant_weights and name in FAST_SIGNATURES:
            fn = with_constant_weights(model, fn, substitutes)
        elif substitutes:
            fn = with_substituted_weights(fn, substitutes)
        function = _traced(fn, specs[name])
        archive.add_endpoint(name, function)  # first one: serving_default

    parent = os.path.dirname(export_dir) or "."
    tf.io.gfile.makedirs(parent)
    tmp_dir = os.path.join(parent, f".{os.path.basename(export_dir)}"
                                   f".tmp-{os.getpid()}")
    if tf.io.gfile.exists(tmp_dir):
        tf.io.gfile.rmtree(tmp_dir)
    archive.write_out(tmp_dir, verbose=False)
    metadata = {
        "format": "nvae_tf SavedModel for TF Serving",
        "signatures": list(SIGNATURES), "serving_default": SIGNATURES[0],
        "image_shape": signatures.image_shape,
        "latent_shapes": signatures.latent_shapes,
        "temperature": float(temperature), "readjust_bn": bool(readjust_bn),
        "bn_statistics": bn_info, "max_samples": int(max_samples),
        "inference_shards": int(inference_shards),
        "constant_weights": bool(constant_weights),
        "model_dir": model_dir, "checkpoint": checkpoint_id,
        "config": model.config.to_dict(), "data": _data_settings(model_dir),
        "tensorflow_version": tf.__version__,
    }
    meta_path = os.path.join(tmp_dir, METADATA_FILE)
    tf.io.gfile.makedirs(os.path.dirname(meta_path))
    with tf.io.gfile.GFile(meta_path, "w") as f:
        f.write(json.dumps(metadata, indent=2, sort_keys=True))
    if tf.io.gfile.exists(export_dir):  # overwrite=True
        tf.io.gfile.rmtree(export_dir)
    tf.io.gfile.rename(tmp_dir, export_dir)
    metadata.update(export_dir=export_dir,
                    size_bytes=_directory_size(export_dir),
                    seconds=round(time.time() - start, 2))
    logging.info("Exported %s (%d bytes, signatures %s) in %.1f s.",
                 export_dir, metadata["size_bytes"], ", ".join(SIGNATURES),
                 metadata["seconds"])
    return metadata


# --------------------------------------------------------------------- CLI
FLAGS = flags.FLAGS


def define_flags():
    flags.DEFINE_string("model_dir", None, "nvae_tf model directory.")
    flags.DEFINE_string("export_dir", None,
                        "Output: saved_models/<name>/<version>.")
    flags.DEFINE_string("checkpoint", None,
                        "Checkpoint path; default: the latest in model_dir.")
    flags.DEFINE_float("temperature", DEFAULT_TEMPERATURE,
                       "Temperature of the BN re-estimation (recorded as the "
                       "recommended sampling temperature).")
    flags.DEFINE_bool("readjust_bn", False,
                      "Bake BN statistics re-estimated at --temperature into "
                      "the `sample` signature (cached in MODEL_DIR/bn_stats).")
    flags.DEFINE_integer("bn_passes", bn_readjust.READJUST_PASSES,
                         "Sampling passes of the BN re-estimation.")
    flags.DEFINE_integer("bn_batch_size", bn_readjust.READJUST_BATCH_SIZE,
                         "Batch size of the BN re-estimation.")
    flags.DEFINE_integer("seed", bn_readjust.READJUST_SEED,
                         "Seed of the BN re-estimation's sampling passes; "
                         "the default is `evaluate`'s --seed default, so "
                         "both commands reuse one cached file.")
    flags.DEFINE_integer("max_samples", MAX_SAMPLES,
                         "Largest num_samples a `sample` request may ask.")
    flags.DEFINE_bool("overwrite", False, "Replace an existing export_dir.")
    flags.DEFINE_integer(
        "inference_shards", 1,
        "`sample`, `log_likelihood` and `log_weights` cut each request's "
        "batch into this many parts (same outputs); pair with TF Serving's "
        "--tensorflow_intra_op_parallelism=1 "
        "--tensorflow_inter_op_parallelism=<this> (docs/serving.md).",
        lower_bound=1)
    flags.DEFINE_bool(
        "constant_weights", False,
        "`sample`, `log_likelihood` and `log_weights` hold the weights as "
        "graph constants, so that the weight-only tensors (weight-normalised "
        "kernels, folded batch norms) are computed once at load time instead of per request "
        "(same outputs, faster per request on a CPU: docs/performance.md; "
        "the SavedModel grows by three copies of the weights).")
    flags.mark_flags_as_required(["model_dir", "export_dir"])


def main(argv):
    if len(argv) > 1:
        raise cli_lib.UserError(f"Unexpected arguments {argv[1:]}; pass "
                                "--model_dir=... --export_dir=...")
    if not FLAGS.overwrite:  # before the model is loaded
        _check_new_version(FLAGS.export_dir.rstrip("/"))
    loaded = inference.load_model(FLAGS.model_dir, FLAGS.checkpoint)
    metadata = export_saved_model(
        loaded.model, FLAGS.export_dir, temperature=FLAGS.temperature,
        readjust_bn=FLAGS.readjust_bn, model_dir=FLAGS.model_dir,
        checkpoint_id=loaded.checkpoint_id, bn_passes=FLAGS.bn_passes,
        bn_batch_size=FLAGS.bn_batch_size, bn_seed=FLAGS.seed,
        max_samples=FLAGS.max_samples,
        overwrite=FLAGS.overwrite,
        inference_shards=FLAGS.inference_shards,
        constant_weights=FLAGS.constant_weights)
    summary = {k: metadata[k] for k in (
        "export_dir", "size_bytes", "seconds", "signatures",
        "serving_default", "temperature", "readjust_bn", "checkpoint",
        "inference_shards", "constant_weights")}
    if metadata["bn_statistics"]:
        summary["bn_statistics_from_cache"] = \
            metadata["bn_statistics"]["from_cache"]
    sys.stdout.write(json.dumps(summary) + "\n")


def cli():
    """Entry point of `python -m nvae_tf.export`."""
    define_flags()
    cli_lib.run(main, argv=flagfiles.command_line(__name__))


if __name__ == "__main__":
    cli()
