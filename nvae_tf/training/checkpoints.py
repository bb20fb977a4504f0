"""The nvae_tf model directory: the experiment's config and TF checkpoints.

Layout of a model directory (written by the trainer and the converter, read
by resume, evaluation, export and tuning):

    MODEL_DIR/config.json        ExperimentConfig.to_dict() (+ e.g. source)
    MODEL_DIR/checkpoints/ckpt-N tf.train.Checkpoint(model=..., [optimizer])

Checkpoints are written by `tf.train.CheckpointManager`, which writes the
files first and then atomically replaces the `checkpoint` index, so an
interrupted save leaves the previous checkpoint loadable.
"""

from __future__ import annotations

import hashlib
import json
import os
import time

import numpy as np
import tensorflow as tf

from nvae_tf.config import ConfigError
from nvae_tf.experiment import ExperimentConfig

CONFIG_FILE = "config.json"
CHECKPOINT_SUBDIR = "checkpoints"
# A replaced run is renamed to MODEL_DIR.replaced-<UTC time>, never deleted.
REPLACED_SUFFIX = ".replaced-"


def config_path(model_dir):
    return os.path.join(model_dir, CONFIG_FILE)


def write_config(model_dir, experiment: ExperimentConfig, **extra):
    """Writes `experiment` (and `extra` top-level keys, e.g. `source`) as
    config.json, atomically; returns its path."""
    tf.io.gfile.makedirs(model_dir)
    path = config_path(model_dir)
    tmp = path + ".tmp"
    with tf.io.gfile.GFile(tmp, "w") as f:
        f.write(json.dumps({**experiment.to_dict(), **extra}, indent=2,
                           sort_keys=True))
    tf.io.gfile.rename(tmp, path, overwrite=True)
    return path


def read_sections(model_dir) -> dict:
    """config.json as written (all its keys, e.g. `source`)."""
    path = config_path(model_dir)
    if not tf.io.gfile.exists(path):
        raise FileNotFoundError(
            f"{path} not found: {model_dir!r} is not an nvae_tf model "
            "directory (train one with `python -m nvae_tf.train` or convert "
            "an official checkpoint with `python -m nvae_tf.convert`).")
    with tf.io.gfile.GFile(path) as f:
        try:
            return json.loads(f.read())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON ({err}).") from err


def read_config(model_dir) -> ExperimentConfig:
    """The model directory's `ExperimentConfig` (earlier formats migrated).

    Raises:
      FileNotFoundError: no config.json.
      ValueError: config.json is not valid JSON or not a valid config.
    """
    try:
        return ExperimentConfig.from_dict(read_sections(model_dir))
    except ConfigError as err:
        raise ValueError(f"{config_path(model_dir)}: {err}") from err


def latest_checkpoint(model_dir) -> str | None:
    """Path of the model directory's latest checkpoint, or None."""
    return tf.train.latest_checkpoint(
        os.path.join(model_dir, CHECKPOINT_SUBDIR))


def existing_run(model_dir):
    """What of a run `model_dir` holds: a sorted list of `CONFIG_FILE` and
    `CHECKPOINT_SUBDIR` (when not empty); [] for a new or empty directory."""
    found = []
    if tf.io.gfile.exists(config_path(model_dir)):
        found.append(CONFIG_FILE)
    subdir = os.path.join(model_dir, CHECKPOINT_SUBDIR)
    if tf.io.gfile.isdir(subdir) and tf.io.gfile.listdir(subdir):
        found.append(CHECKPOINT_SUBDIR)
    return sorted(found)


def move_aside(model_dir):
    """Renames `model_dir` to `<model_dir>.replaced-<UTC time>[-n]`.

    Returns:
      The new path of the old directory; nothing is deleted.
    """
    base = model_dir.rstrip("/") + REPLACED_SUFFIX + time.strftime(
        "%Y%m%d-%H%M%S", time.gmtime())
    target, n = base, 1
    while tf.io.gfile.exists(target):
        target, n = f"{base}-{n}", n + 1
    tf.io.gfile.rename(model_dir, target)
    return target


def checkpoint_manager(checkpoint, model_dir, max_to_keep=5):
    return tf.train.CheckpointManager(
        checkpoint, os.path.join(model_dir, CHECKPOINT_SUBDIR),
        max_to_keep=max_to_keep)


def variable_key(variable) -> str:
    """A variable's path inside the model (the model's name stripped:
    Keras numbers it per process, `nvae`, `nvae_1`, ...)."""
    return variable.path.split("/", 1)[-1]


def weights_fingerprint(variables) -> str:
    """SHA-256 (hex) of `variables`' paths and values, in path order; the
    same in every process holding the same weights."""
    digest = hashlib.sha256()
    for key, variable in sorted((variable_key(v), v) for v in variables):
        digest.update(key.encode())
        digest.update(np.ascontiguousarray(variable.numpy()).tobytes())
    return digest.hexdigest()


def save_model_dir(model, model_dir, step=0, **extra):
    """Writes config.json (the model's experiment with default other
    sections, plus `extra` keys) and a model-only checkpoint; returns its
    path."""
    write_config(model_dir, ExperimentConfig.for_model(model.config), **extra)
    checkpoint = tf.train.Checkpoint(model=model)
    return checkpoint_manager(checkpoint, model_dir).save(checkpoint_number=step)


def load_model_dir(model_dir, checkpoint_path=None):
    """Rebuilds the model of a model directory from a checkpoint (default:
    the latest)."""
    from nvae_tf.model import NVAE  # pylint: disable=import-outside-toplevel
    experiment = read_config(model_dir)
    model = NVAE(experiment.model,
                 sync_batchnorm=experiment.runtime.sync_batchnorm)
    model.build()
    checkpoint = tf.train.Checkpoint(model=model)
    path = checkpoint_path or latest_checkpoint(model_dir)
    if path is None:
        raise FileNotFoundError(f"No checkpoint in {model_dir}/"
                                f"{CHECKPOINT_SUBDIR}.")
    try:
        checkpoint.restore(path).expect_partial().assert_existing_objects_matched()
    except (tf.errors.OpError, AssertionError, ValueError) as err:
        raise ValueError(f"Checkpoint {path} cannot be restored into the "
                         f"model of {config_path(model_dir)}: {err}") from err
    return model
