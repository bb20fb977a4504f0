"""BatchNorm statistics re-estimated for sampling, cached per temperature.

The official `--readjust_bn` puts the model in training mode and
draws `model.sample(16, t)` 500 times, so the decoder's BatchNorm running
statistics (momentum 0.05) become those of prior samples at temperature t
instead of posterior samples seen in training. Samples drawn with the
training statistics look visibly worse at t < 1.

The official code recomputes this before every sampling run (NVlabs/NVAE PR
#18 asks for a cache). Here the statistics are stored once per temperature:

    MODEL_DIR/bn_stats/temperature_0.70.npz

one array per BatchNorm moving statistic, keyed by its variable path inside
the model (`decoder_cell_0/op_0/bn_in/moving_mean`), plus `__meta__`, a JSON
string with the temperature, the number of passes, the batch size, the seed,
the checkpoint id and a SHA-256 fingerprint of the trainable weights. A cache
file is used only if all of these match, so a newer checkpoint (different
weights) invalidates it and the file is recomputed and overwritten.
Non-finite statistics (the NaN images of NVlabs/NVAE issue #36) raise
instead of being cached or used.
"""

from __future__ import annotations

import io
import json
import os
from typing import NamedTuple

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from nvae_tf.training import checkpoints

READJUST_PASSES = 500  # official number of sample() passes
READJUST_BATCH_SIZE = 16  # official batch in `evaluate.py --eval_mode sample`
# Default seed of the sampling passes, shared by `evaluate --readjust_bn`
# (its --seed default) and `export --readjust_bn`: the seed is part of the
# cache key, so the two commands reuse one cache file by default.
READJUST_SEED = 1
CACHE_SUBDIR = "bn_stats"
META_KEY = "__meta__"
CACHE_FORMAT = 1  # bump when the file layout changes
_STAT_NAMES = ("moving_mean", "moving_variance")


class ReadjustResult(NamedTuple):
    """Re-estimated statistics and where they came from.

    Attributes:
      statistics: {variable key: float32 array}, see `checkpoints.variable_key`.
      from_cache: True if read from `cache_path` (no sampling was run).
      cache_path: the cache file, or None without a model directory.
      metadata: the settings the statistics belong to.
    """

    statistics: dict
    from_cache: bool
    cache_path: str | None
    metadata: dict


def _statistic_variables(model):
    """[(key, variable)] of every BatchNorm moving mean and variance."""
    pairs = [(checkpoints.variable_key(getattr(bn, name)), getattr(bn, name))
             for bn in model.batchnorm_layers() for name in _STAT_NAMES]
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError("BatchNorm variable paths are not unique; cannot "
                         "key their statistics.")
    return pairs


def get_statistics(model) -> dict:
    """{key: array} of the model's current BatchNorm moving statistics."""
    return {k: np.array(v.numpy()) for k, v in _statistic_variables(model)}


def set_statistics(model, statistics: dict) -> None:
    """Assigns `statistics` (all of the model's BN statistics) to `model`."""
    for variable, value in statistics_substitutes(model, statistics):
        variable.assign(value)


def temperature_tag(temperature: float) -> str:
    """`0.70` for 0.7; more digits only when two decimals are not exact."""
    tag = f"{temperature:.2f}"
    return tag if float(tag) == float(temperature) else repr(
        float(temperature))


def cache_path(model_dir: str, temperature: float) -> str:
    return os.path.join(model_dir, CACHE_SUBDIR,
                        f"temperature_{temperature_tag(temperature)}.npz")


def compute_statistics(model, temperature: float,
                       num_passes: int = READJUST_PASSES,
                       batch_size: int = READJUST_BATCH_SIZE,
                       seed: int = READJUST_SEED,
                       progress: bool = False) -> dict:
    """Runs the official re-estimation; returns the statistics.

    `num_passes` calls of `model.sample(batch_size, temperature)` with
    training-mode BatchNorm, each with its own stateless seed. The model's
    own statistics are restored afterwards.

    Raises:
      FloatingPointError: a re-estimated statistic is not finite.
    """
    if num_passes < 1 or batch_size < 2:
        raise ValueError(f"num_passes={num_passes}, batch_size={batch_size};"
                         " expected num_passes >= 1 and batch_size >= 2 "
                         "(batch statistics of one image are degenerate).")
    original = get_statistics(model)

    @tf.function(autograph=False)
    def one_pass(temperature, seed):
        model.sample(batch_size, temperature, seed=seed, training=True)

    bar = keras.utils.Progbar(num_passes, unit_name="pass") \
        if progress else None
    try:
        t = tf.constant(temperature, tf.float32)
        for i in range(num_passes):
            one_pass(t, tf.constant([seed, i], tf.int64))
            if bar is not None:
                bar.update(i + 1)
        statistics = get_statistics(model)
    finally:
        set_statistics(model, original)
    bad = sorted(k for k, v in statistics.items() if not np.all(
        np.isfinite(v)))
    if bad:
        raise FloatingPointError(
            f"BatchNorm re-estimation at temperature {temperature} gave "
            f"non-finite statistics in {len(bad)} variables (e.g. {bad[:3]}); "
            "the samples would be NaN. Try a lower temperature or check the "
            "checkpoint.")
    return statistics


def _read_cache(path):
    with tf.io.gfile.GFile(path, "rb") as f:
        arrays = np.load(io.BytesIO(f.read()), allow_pickle=False)
        arrays = {k: arrays[k] for k in arrays.files}
    meta = json.loads(str(arrays.pop(META_KEY)))
    return arrays, meta


def _write_cache(path, statistics, meta):
    buffer = io.BytesIO()
    np.savez(buffer, **statistics, **{META_KEY: np.array(json.dumps(meta))})
    tf.io.gfile.makedirs(os.path.dirname(path))
    tmp = f"{path}.tmp-{os.getpid()}"
    with tf.io.gfile.GFile(tmp, "wb") as f:
        f.write(buffer.getvalue())
    tf.io.gfile.rename(tmp, path, overwrite=True)


def readjusted_statistics(model, temperature: float,
                          model_dir: str | None = None,
                          checkpoint_id: str | None = None,
                          num_passes: int = READJUST_PASSES,
                          batch_size: int = READJUST_BATCH_SIZE,
                          seed: int = READJUST_SEED,
                          progress: bool = False) -> ReadjustResult:
    """Re-estimated statistics at `temperature`, from the cache if valid.

    Does not change the model (see `readjust_batchnorm`).

    Args:
      model: a built `NVAE` with its trained weights.
      temperature: latent temperature of the sampling passes.
      model_dir: where to cache (`MODEL_DIR/bn_stats/`); None: no cache.
      checkpoint_id: recorded in the cache (e.g. `ckpt-12`), for people;
        validity is decided by the weights fingerprint.
      num_passes, batch_size, seed: the re-estimation (official: 500, 16).
      progress: show a progress bar while sampling.
    """
    meta = {"format": CACHE_FORMAT, "temperature": float(temperature),
            "num_passes": int(num_passes), "batch_size": int(batch_size),
            "seed": int(seed),
            "weights_sha256": checkpoints.weights_fingerprint(
                model.trainable_variables)}
    path = cache_path(model_dir, temperature) if model_dir else None
    keys = {k for k, _ in _statistic_variables(model)}
    if path and tf.io.gfile.exists(path):
        try:
            statistics, cached = _read_cache(path)
        except (ValueError, OSError, KeyError) as err:
            logging.warning("Ignoring unreadable BN cache %s: %s", path, err)
        else:
            stale = [k for k in meta if cached.get(k) != meta[k]]
            if set(statistics) != keys:
                stale.append("variables")
            if not stale:
                logging.info("BN statistics at temperature %s from %s "
                             "(checkpoint %s).", temperature, path,
                             cached.get("checkpoint"))
                return ReadjustResult(statistics, True, path, cached)
            logging.info("BN cache %s is stale (%s differ); recomputing.",
                         path, ", ".join(stale))
    logging.info("Re-estimating BN statistics: %d sampling passes of %d "
                 "images at temperature %s.", num_passes, batch_size,
                 temperature)
    statistics = compute_statistics(model, temperature, num_passes,
                                    batch_size, seed, progress)
    meta["checkpoint"] = checkpoint_id
    if path:
        _write_cache(path, statistics, meta)
        logging.info("Cached BN statistics in %s.", path)
    return ReadjustResult(statistics, False, path, meta)


def readjust_batchnorm(model, temperature: float, **kwargs) -> ReadjustResult:
    """`readjusted_statistics(...)`, then assigned to the model's BN layers."""
    result = readjusted_statistics(model, temperature, **kwargs)
    set_statistics(model, result.statistics)
    return result


def statistics_substitutes(model, statistics: dict) -> list:
    """[(BatchNorm moving statistic, its value in `statistics`)].

    For tracing one function (an export signature) with re-estimated
    statistics while the model keeps its own
    (`constant_weights.with_substituted_weights`); the statistics become
    constants of that graph.
    """
    pairs = _statistic_variables(model)
    missing = sorted({k for k, _ in pairs} - set(statistics))
    if missing:
        raise ValueError(f"Statistics lack {len(missing)} BatchNorm "
                         f"variables of the model, e.g. {missing[:3]}.")
    substitutes = []
    for key, variable in pairs:
        value = np.asarray(statistics[key], np.float32)
        if value.shape != tuple(variable.shape):
            raise ValueError(f"{key}: statistics of shape {value.shape}, the "
                             f"model has {tuple(variable.shape)}.")
        substitutes.append((variable, value))
    return substitutes
