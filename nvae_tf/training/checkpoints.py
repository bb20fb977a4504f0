"""The nvae_tf model directory: the experiment's config and TF checkpoints.

Layout of a model directory (written by the trainer and the converter, read
by resume, evaluation, export and tuning):

    MODEL_DIR/config.json        ExperimentConfig.to_dict() (+ e.g. source)
    MODEL_DIR/checkpoints/ckpt-N tf.train.Checkpoint(model=..., [optimizer])

Checkpoints are written by `tf.train.CheckpointManager`, which writes the
files first and then atomically replaces the `checkpoint` index, so an
interrupted save leaves the previous checkpoint loadable (and a
`ckpt-N_temp/` folder, removed by `remove_temp_folders` on the next start).
A checkpoint that cannot be read (truncated, missing files) is passed over
for the newest readable one, with a warning naming it; its files are
never deleted.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time

import numpy as np
import tensorflow as tf
from absl import logging

from nvae_tf import cli as cli_lib

from nvae_tf.config import ConfigError
from nvae_tf.experiment import ExperimentConfig

CONFIG_FILE = "config.json"
CHECKPOINT_SUBDIR = "checkpoints"
# A replaced run is renamed to MODEL_DIR.replaced-<UTC time>, never deleted.
REPLACED_SUFFIX = ".replaced-"
# Where the trainer moves the files of an unreadable checkpoint, so that a
# new save at the same step cannot overwrite them.
DAMAGED_SUBDIR = "damaged"
# A save in progress (or interrupted): CheckpointManager's scratch folder.
_TEMP_FOLDER = re.compile(r"^ckpt-\d+_temp$")
# What reading a damaged checkpoint raises: OpError (a truncated index is
# "not an sstable", missing files), IndexError (a truncated data file:
# "Read less bytes than requested"). A checkpoint that does not fit the
# model (AssertionError, ValueError) is not damaged and is never passed over.
DAMAGE_ERRORS = (tf.errors.OpError, IndexError)


class NoReadableCheckpoint(cli_lib.UserError):
    """The model directory lists checkpoints but none can be read."""


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


def checkpoints_newest_first(model_dir) -> list[str]:
    """The checkpoints listed in the model directory's `checkpoint` index,
    newest first (missing ones included: restoring them fails, which is
    reported like any damage)."""
    state = tf.train.get_checkpoint_state(
        os.path.join(model_dir, CHECKPOINT_SUBDIR))
    if state is None:
        return []
    paths = list(state.all_model_checkpoint_paths)
    if state.model_checkpoint_path and \
            state.model_checkpoint_path not in paths:
        paths.append(state.model_checkpoint_path)
    return paths[::-1]


def restore_newest_readable(model_dir, restore) -> str | None:
    """Calls `restore(path)` on the newest checkpoint that it can read.

    Args:
      model_dir: the model directory.
      restore: restores one checkpoint path; raises one of `DAMAGE_ERRORS`
        when it cannot read it (other errors propagate).

    Returns:
      The restored path, or None when no checkpoint is listed.

    Raises:
      NoReadableCheckpoint: checkpoints are listed, none can be read.
    """
    damaged = []
    for path in checkpoints_newest_first(model_dir):
        try:
            restore(path)
        except DAMAGE_ERRORS as err:
            damaged.append(path)
            logging.warning("Checkpoint %s cannot be read (%s); its files "
                            "are kept, trying the previous checkpoint.",
                            path, cli_lib.one_line(err))
            last_error = err
            continue
        if damaged:
            logging.warning("Restored %s instead of the damaged %s.", path,
                            ", ".join(damaged))
        return path
    if damaged:
        raise NoReadableCheckpoint(
            f"No readable checkpoint in {model_dir}/{CHECKPOINT_SUBDIR}: "
            f"{', '.join(os.path.basename(p) for p in damaged)} cannot be "
            f"restored ({cli_lib.one_line(last_error)}); restore them from "
            "a backup or move the model directory aside to start afresh.")
    return None


def set_damaged_aside(model_dir, damaged) -> str:
    """Moves the files of the checkpoints `damaged` into
    `checkpoints/damaged/` (renamed, never deleted) and drops them from the
    `checkpoint` index; returns that folder."""
    subdir = os.path.join(model_dir, CHECKPOINT_SUBDIR)
    target = os.path.join(subdir, DAMAGED_SUBDIR)
    tf.io.gfile.makedirs(target)
    for path in damaged:
        for name in tf.io.gfile.glob(path + ".*"):
            tf.io.gfile.rename(
                name, os.path.join(target, os.path.basename(name)),
                overwrite=True)
    state = tf.train.get_checkpoint_state(subdir)
    paths = list(state.all_model_checkpoint_paths)
    times = list(state.all_model_checkpoint_timestamps) or \
        [state.last_preserved_timestamp] * len(paths)
    kept = [(path, stamp) for path, stamp in zip(paths, times)
            if path not in damaged]
    tf.compat.v1.train.update_checkpoint_state(
        subdir, kept[-1][0], [p for p, _ in kept],
        all_model_checkpoint_timestamps=[t for _, t in kept],
        last_preserved_timestamp=state.last_preserved_timestamp)
    return target


def remove_temp_folders(model_dir) -> list[str]:
    """Removes the `ckpt-N_temp/` folders left by interrupted saves (run
    only while no save is in progress: by the lock's holder at start-up);
    returns their paths."""
    subdir = os.path.join(model_dir, CHECKPOINT_SUBDIR)
    if not tf.io.gfile.isdir(subdir):
        return []
    removed = []
    for name in sorted(tf.io.gfile.listdir(subdir)):
        name = name.rstrip("/")
        path = os.path.join(subdir, name)
        if _TEMP_FOLDER.match(name) and tf.io.gfile.isdir(path):
            tf.io.gfile.rmtree(path)
            removed.append(path)
    if removed:
        logging.info("Removed %d folder(s) of interrupted checkpoint saves: "
                     "%s.", len(removed), ", ".join(removed))
    return removed


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


def load_model_and_path(model_dir, checkpoint_path=None):
    """Rebuilds the model of a model directory from a checkpoint.

    Args:
      model_dir: the model directory.
      checkpoint_path: the checkpoint; default the newest readable one (a
        damaged newer one is named in a warning).

    Returns:
      (model, the restored checkpoint's path).

    Raises:
      FileNotFoundError: no config.json, or no checkpoint.
      NoReadableCheckpoint: no listed checkpoint can be read.
      ValueError: `checkpoint_path` cannot be restored into the model.
    """
    from nvae_tf.model import NVAE  # pylint: disable=import-outside-toplevel
    experiment = read_config(model_dir)
    model = NVAE(experiment.model,
                 sync_batchnorm=experiment.runtime.sync_batchnorm)
    model.build()
    checkpoint = tf.train.Checkpoint(model=model)

    def restore(path):
        try:
            checkpoint.restore(path).expect_partial() \
                .assert_existing_objects_matched()
        except (AssertionError, ValueError) as err:  # fits another model
            raise ValueError(
                f"Checkpoint {path} cannot be restored into the model of "
                f"{config_path(model_dir)}: {cli_lib.one_line(err)}") from err

    if checkpoint_path is None:
        path = restore_newest_readable(model_dir, restore)
        if path is None:
            raise FileNotFoundError(f"No checkpoint in {model_dir}/"
                                    f"{CHECKPOINT_SUBDIR}.")
        return model, path
    try:
        restore(checkpoint_path)
    except DAMAGE_ERRORS as err:
        raise ValueError(
            f"Checkpoint {checkpoint_path} cannot be read: "
            f"{cli_lib.one_line(err)}") from err
    return model, checkpoint_path


def load_model_dir(model_dir, checkpoint_path=None):
    """The model of `load_model_and_path`."""
    return load_model_and_path(model_dir, checkpoint_path)[0]
