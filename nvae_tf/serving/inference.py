"""Inference with a trained NVAE, shared by `evaluate` and `export`.

Everything here is tensor code that runs eagerly, in a `tf.function` and in
an exported SavedModel: BatchNorm in inference mode, noise only from
stateless seeds (or none at all), so the same inputs give the same outputs.

- `log_weights`: importance weights log p(x|z) + log p(z) - log q(z|x) of
  k posterior samples per image, and their NELBOs; `sample_seed` and
  `stateless_seed` name the noise of one importance sample by an int64, the
  same way in `evaluate` and in the exported `log_weights` signature.
- `reconstruct`: decode the posterior means (the mean of every group given
  the means of the groups above), shown as the image distribution's mean.
- `interpolate`: decode linear interpolations of two images' per-group
  posterior means, as the authors recommend for latent traversals.
- `images_from_uint8` / `images_to_uint8`: the pixel conventions of the
  exported signatures and of the PNG writers.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import tensorflow as tf

from nvae_tf import cli
from nvae_tf import data
from nvae_tf.datasets import MAX_PIXEL
from nvae_tf.fast import inference_shards

from nvae_tf.training import checkpoints

# Binary models (MNIST, Omniglot) see {0, 1} pixels. Training binarises
# stochastically; inference on given uint8 images thresholds at mid-grey so
# that the same image always gets the same score.
BINARY_THRESHOLD = 0.5
# Stateless seed of the posterior noise of exported single-sample NELBOs.
FIXED_NOISE_SEED = (0, 0)


class LoadedModel(NamedTuple):
    """A model directory's model and where its weights came from."""

    model: object  # nvae_tf.model.NVAE
    experiment: object  # nvae_tf.experiment.ExperimentConfig of config.json
    checkpoint_path: str

    @property
    def checkpoint_id(self) -> str:
        """Basename of the checkpoint, e.g. `ckpt-12`."""
        return os.path.basename(self.checkpoint_path)


def load_model(model_dir: str, checkpoint: str | None = None) -> LoadedModel:
    """Rebuilds the model of `model_dir` from `checkpoint` (default the
    newest readable one; a damaged newer one is named in a warning).

    Raises:
      FileNotFoundError: not a model directory, or no checkpoint in it.
      cli.UserError: config.json or the checkpoint cannot be read into a
        model (the cause is chained), or no listed checkpoint is readable.
    """
    try:
        experiment = checkpoints.read_config(model_dir)
    except ValueError as err:  # unreadable JSON or an invalid config
        raise cli.UserError(f"{err} Fix or replace it (it is written by "
                            "`python -m nvae_tf.train`).") from err
    if checkpoint is None and not checkpoints.checkpoints_newest_first(
            model_dir):
        raise FileNotFoundError(
            f"No checkpoint in {model_dir}/{checkpoints.CHECKPOINT_SUBDIR}: "
            "train this model first (`python -m nvae_tf.train "
            f"--model_dir={model_dir}`) or pass --checkpoint.")
    try:  # by default the newest readable checkpoint (warns of damage)
        model, path = checkpoints.load_model_and_path(
            model_dir, checkpoint_path=checkpoint)
    except checkpoints.NoReadableCheckpoint as err:  # all damaged
        raise cli.UserError(f"{err} Pass another --checkpoint.") from err
    except ValueError as err:  # a corrupt or mismatched checkpoint
        raise cli.UserError(f"{err} Pass another --checkpoint.") from err
    return LoadedModel(model=model, experiment=experiment,
                       checkpoint_path=path)


# ------------------------------------------------------------------ pixels
def images_from_uint8(images, config) -> tf.Tensor:
    """uint8 [B, H, W, C] 0..255 -> the float pixels the model scores.

    Non-binary data are reduced to `config.num_x_bits` bits exactly as the
    data pipeline does; binary data are thresholded at `BINARY_THRESHOLD`.
    """
    x = tf.cast(images, tf.float32) / MAX_PIXEL
    if config.is_binary:
        return tf.cast(x >= BINARY_THRESHOLD, tf.float32)
    return data.quantize(x, config.num_x_bits)


def images_to_uint8(images) -> tf.Tensor:
    """Float pixels in [0, 1] (clipped) -> uint8 0..255, rounded."""
    x = tf.clip_by_value(tf.cast(images, tf.float32), 0.0, 1.0)
    return tf.cast(tf.round(x * MAX_PIXEL), tf.uint8)


def mean_images(model, logits) -> tf.Tensor:
    """The image distribution's mean for decoder `logits`, cropped to the
    data size: [B, H, W, C] in [0, 1] (for the logistic mixture the
    official `mean()`, as its FID code uses)."""
    # pylint: disable-next=protected-access
    return model._crop(model.image_distribution(logits).mean())


# ----------------------------------------------------------------- latents
def _zero_noise(model, batch_size):
    return [tf.zeros(tf.stack([batch_size] + list(shape[1:])))
            for shape in model.latent_shapes()]


def reconstruct(model, x) -> tf.Tensor:
    """Mean images decoded from the posterior means of x.

    Args:
      model: an `NVAE`.
      x: float images [B, H, W, C] in [0, 1] at the data size.

    Returns:
      [B, H, W, C] in [0, 1]; identical to decoding `model.encode(x)`.
    """
    x = tf.convert_to_tensor(x, tf.float32)
    out = model(x, training=False, eps=_zero_noise(model, tf.shape(x)[0]))
    return mean_images(model, out.logits)


def decode_mean(model, latents) -> tf.Tensor:
    """Mean images [B, H, W, C] from a full list of per-group latents."""
    # No group is drawn, but `sample` makes noise for every group: a fixed
    # stateless seed keeps the model's noise counter untouched.
    out = model.decode(list(latents), seed=tf.constant(FIXED_NOISE_SEED))
    return mean_images(model, out.logits)


def interpolate(model, x_start, x_end, num_steps: int) -> tf.Tensor:
    """Decodes linear interpolations of per-group posterior means.

    Args:
      model: an `NVAE`.
      x_start, x_end: float images [P, H, W, C] in [0, 1] (P pairs).
      num_steps: points on each path, endpoints included (>= 2).

    Returns:
      [P, num_steps, H, W, C] mean images in [0, 1]; step 0 decodes x_start's
      posterior means (= `reconstruct(x_start)`), the last x_end's.
    """
    if num_steps < 2:
        raise ValueError(f"num_steps={num_steps}; expected >= 2 (the two "
                         "endpoints are included).")
    start, _ = model.encode(x_start)
    end, _ = model.encode(x_end)
    pairs = tf.shape(start[0])[0]
    weights = tf.linspace(0.0, 1.0, num_steps)[:, None, None, None, None]
    # Per group: [S, P, h, w, L] -> [S * P, h, w, L], step-major.
    latents = [tf.reshape((1.0 - weights) * a[None] + weights * b[None],
                          tf.concat([[-1], tf.shape(a)[1:]], axis=0))
               for a, b in zip(start, end)]
    images = decode_mean(model, latents)  # [S * P, H, W, C]
    images = tf.reshape(images, tf.concat(
        [[num_steps, pairs], tf.shape(images)[1:]], axis=0))
    return tf.transpose(images, [1, 0, 2, 3, 4])


# -------------------------------------------------------------- likelihood
def log_weights(model, x, num_samples: int, seed, shards: int = 1):
    """Importance weights of `num_samples` posterior samples per image.

    One eval-mode forward of the batch tiled `num_samples` times; every
    copy gets its own noise, so this equals `num_samples` separate forwards.

    Args:
      model: an `NVAE`.
      x: float images [B, H, W, C] in [0, 1] (bit-reduced / binarised).
      num_samples: k, a Python int.
      seed: stateless seed [2] of the posterior noise.
      shards: batch shards of the forward (`inference_shards`; same
        result).

    Returns:
      (log_w, nelbo), both [k, B] in nats: log_w = log p(x|z) + log p(z) -
      log q(z|x) (log q before the volume-preserving flows, whose
      log-determinant is 0, as the official code scores it) and
      the NELBO recon + KL (unbalanced, beta = 1) of the same sample.
    """
    x = tf.convert_to_tensor(x, tf.float32)
    batch_size = tf.shape(x)[0]
    out = inference_shards.forward(
        model, tf.tile(x, [num_samples, 1, 1, 1]), shards, seed=seed)
    log_w = -out.recon_loss - out.log_q + out.log_p  # [k * B]
    shape = tf.stack([num_samples, batch_size])
    return tf.reshape(log_w, shape), tf.reshape(out.nelbo, shape)


# A sample seed packs (seed, index) into the two 32-bit halves of one int64.
SEED_BITS = 32


def sample_seed(seed: int, index: int) -> int:
    """The int64 seed of importance sample `index` under `seed`.

    Its low 32 bits are `seed`, its high bits `index`, so `stateless_seed`
    of it is the stateless seed [seed, index]: every (seed, index) pair has
    its own noise, whatever ran before it in the process.

    Raises:
      ValueError: `seed` outside [0, 2^32) or `index` outside [0, 2^31).
    """
    if not 0 <= seed < 2 ** SEED_BITS:
        raise ValueError(f"seed={seed} must be in [0, 2^32) (it fills the "
                         "low half of a 64-bit sample seed).")
    if not 0 <= index < 2 ** (SEED_BITS - 1):
        raise ValueError(f"Sample index {index} must be in [0, 2^31).")
    return (index << SEED_BITS) | seed


def stateless_seed(seed) -> tf.Tensor:
    """int64 [] -> the stateless seed int32 [2] of its two 32-bit halves
    (low half first on the little-endian hosts TensorFlow runs on), as the
    exported `sample` and `log_weights` signatures read their `seed`."""
    return tf.bitcast(tf.convert_to_tensor(seed, tf.int64), tf.int32)


def importance_weighted_log_likelihood(log_w) -> tf.Tensor:
    """log p(x) ~ logsumexp_k(log_w) - log k, per image; log_w [k, B]."""
    k = tf.cast(tf.shape(log_w)[0], log_w.dtype)
    return tf.reduce_logsumexp(log_w, axis=0) - tf.math.log(k)
