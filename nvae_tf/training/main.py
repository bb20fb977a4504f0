r"""Trains NVAE (Vahdat & Kautz, NeurIPS 2020) with the official recipe.

    python -m nvae_tf.train --flagfile=configs/quickstart.cfg [--flag=value]

Parses and validates the flags (`nvae_tf.training.flags`) into an
`ExperimentConfig`, builds the tf.distribute strategy, opens the data,
resolves the run length, checks the config against MODEL_DIR/config.json
when resuming and saves it there (once, when new or changed), trains with
`nvae_tf.training.trainer.Trainer` (checkpoints, TensorBoard, NaN recovery),
evaluates (the validation split every epoch when there is one, the test
split after the last step) and exports a SavedModel to
saved_models/<name>/<step> (TF Serving's layout). Rerunning the same command
resumes from the latest checkpoint (with the saved run length, unless
`--extend_run`). A bad flag, missing or corrupt data, a model directory
that cannot be written or is in use by another trainer (`lock`) stops the
command with one line on stderr (`nvae_tf.cli`). SIGTERM or SIGINT stops
it after the current step with a checkpoint and exit status 143 or 130
(`preemption`). This file is intentionally kept short.
"""

from __future__ import annotations

import contextlib
import json
import os

import keras
import tensorflow as tf
from absl import app
from absl import flags
from absl import logging

from nvae_tf import cli as cli_lib
from nvae_tf import flagfiles
from nvae_tf.training import checkpoints
from nvae_tf import data as data_lib
from nvae_tf.training import flags as nvae_flags
from nvae_tf.training import lock as lock_lib
from nvae_tf.training import preemption
from nvae_tf.training import trainer as trainer_lib
from nvae_tf.config import ConfigError
from nvae_tf.model import NVAE
from nvae_tf.training.config import RUN_LENGTH_FLAGS

FLAGS = flags.FLAGS


def _cluster_size() -> int:
    """Tasks in TF_CONFIG's cluster (0 without TF_CONFIG)."""
    try:
        cluster = json.loads(os.environ.get("TF_CONFIG", "{}")).get(
            "cluster", {})
    except json.JSONDecodeError as err:
        raise nvae_flags.FlagError(f"TF_CONFIG is not valid JSON: {err}")
    return sum(len(tasks) for tasks in cluster.values())


def make_strategy(runtime):
    """The `tf.distribute.Strategy` named by `runtime.strategy`.

    Must run before any other TensorFlow op (multi-worker collectives and
    logical devices are configured at program start).
    """
    gpus = tf.config.list_physical_devices("GPU")
    if runtime.num_cpu_devices > 1:
        if gpus:
            raise nvae_flags.FlagError(
                "--num_cpu_devices is for CPU-only machines; this one has "
                f"{len(gpus)} GPU(s).")
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] *
            runtime.num_cpu_devices)
    kind = runtime.strategy
    if kind == "auto":
        if _cluster_size() > 1:
            kind = "multi_worker"
        elif len(gpus) > 1 or runtime.num_cpu_devices > 1:
            kind = "mirrored"
        else:
            kind = "one_device"
    if kind == "multi_worker":
        if _cluster_size() < 1:
            raise nvae_flags.FlagError(
                "--strategy=multi_worker needs TF_CONFIG describing the "
                "cluster (see README, multi-worker training).")
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
    elif kind == "mirrored":
        devices = None if gpus else [
            d.name for d in tf.config.list_logical_devices("CPU")]
        strategy = tf.distribute.MirroredStrategy(devices)
    else:
        strategy = tf.distribute.OneDeviceStrategy(
            "/gpu:0" if gpus else "/cpu:0")
    if runtime.jit_compile and strategy.num_replicas_in_sync > 1:
        raise nvae_flags.FlagError(
            f"--jit_compile with {strategy.num_replicas_in_sync} replicas: "
            "XLA compilation is supported with one replica only.")
    logging.info("Strategy %s with %d replica(s).", type(strategy).__name__,
                 strategy.num_replicas_in_sync)
    return strategy


def check_resume_compatible(model_dir, experiment) -> None:
    """Refuses to resume a model directory with another architecture.

    Only the `model` section must match: data, objective, train and runtime
    settings (e.g. `--sync_batchnorm`, `--grappler`) may change on resume.

    Raises:
      FlagError: listing the architecture fields that differ.
    """
    if not os.path.exists(checkpoints.config_path(model_dir)):
        return
    saved = checkpoints.read_config(model_dir)
    diff = [f"{nvae_flags.flag_name(path)}: saved {old!r}, flags {new!r}"
            for path, old, new in saved.differences(experiment)
            if path.startswith("model.")]
    if diff:
        raise nvae_flags.FlagError(
            f"--model_dir={model_dir} holds a model with a different "
            "architecture and cannot be resumed with these flags:\n  " +
            "\n  ".join(diff) + "\nUse a new --model_dir or the saved "
            "values (see its config.json).")


def check_run_length(model_dir, experiment) -> None:
    """Refuses to resume with another run length, unless `extend_run`.

    The LR cosine and the KL warm-up are functions of the run length
    (`RunLength.schedule()`); resuming a checkpoint with another length would
    move them mid-run (e.g. a learning rate that has decayed to its minimum
    jumps back up).

    Raises:
      FlagError: one line naming the run-length flags and their saved values.
    """
    if experiment.runtime.extend_run or \
            checkpoints.latest_checkpoint(model_dir) is None or \
            not os.path.exists(checkpoints.config_path(model_dir)):
        return
    saved = checkpoints.read_config(model_dir)
    if saved.run is None or saved.run.schedule() == experiment.run.schedule():
        return
    changed = [f"--{name}={getattr(experiment.train, name)} (saved "
               f"{getattr(saved.train, name)})" for name in RUN_LENGTH_FLAGS
               if getattr(saved.train, name) != getattr(experiment.train,
                                                        name)]
    if not changed:  # same flags, another split size or batch size
        changed = [f"{experiment.run.batches_per_pass} batches per pass "
                   f"(saved {saved.run.batches_per_pass}; --batch_size or "
                   "--validation_fraction changed)"]
    raise nvae_flags.FlagError(
        f"--model_dir={model_dir} was trained with another run length: "
        f"{', '.join(changed)}; resuming would move the LR and KL schedules "
        "mid-run. Rerun with the saved values, or pass --extend_run to "
        "change the length on purpose.")


def save_config(model_dir, experiment) -> bool:
    """Writes config.json unless it already holds `experiment` (a resume
    with the same settings leaves it as it is); returns whether it wrote."""
    if os.path.exists(checkpoints.config_path(model_dir)):
        changes = checkpoints.read_config(model_dir).differences(experiment)
        if not changes:
            return False
        logging.info("Resuming with other settings than config.json's: %s.",
                     "; ".join(f"{path} {old!r} -> {new!r}"
                               for path, old, new in changes))
    checkpoints.write_config(model_dir, experiment)
    return True


def export_model(trainer, step: int) -> str | None:
    """Writes EXPORT_DIR_BASE/<name>/<step> (chief only)."""
    try:  # pylint: disable-next=import-outside-toplevel
        from nvae_tf.serving import export as export_lib
    except ImportError as err:
        logging.warning("SavedModel export skipped: nvae_tf.export is not "
                        "available (%s).", err)
        return None
    model_dir = trainer.model_dir
    name = trainer.train.export_name or os.path.basename(
        os.path.normpath(model_dir))
    export_dir = os.path.join(trainer.train.export_dir_base, name, str(step))
    if os.path.exists(export_dir):
        logging.info("SavedModel %s exists already.", export_dir)
        return export_dir
    # A float32 copy outside the distribution strategy is what TF Serving
    # runs; the trained model's variables may be mirrored or mixed.
    keras.config.set_dtype_policy("float32")
    copy = NVAE(trainer.model_config, seed=trainer.train.seed,
                sync_batchnorm=trainer.runtime.sync_batchnorm)
    copy.build()
    copy.set_weights(trainer.model.get_weights())
    export_lib.export_saved_model(
        copy, export_dir, model_dir=model_dir,
        checkpoint_id=trainer.manager.latest_checkpoint)
    return export_dir


def build_trainer(experiment, strategy):
    """Checks the run against the data, the strategy and the model
    directory, resolves the run length, then builds the `Trainer` (model,
    optimizer, state).

    Returns:
      (trainer, DataInfo); the trainer's `experiment` is resolved.
    """
    train, data_config = experiment.train, experiment.data
    keras.utils.set_random_seed(train.seed)
    keras.config.set_dtype_policy(experiment.runtime.keras_dtype_policy)
    replicas = strategy.num_replicas_in_sync
    if data_config.batch_size % replicas:
        raise nvae_flags.FlagError(
            f"--batch_size={data_config.batch_size} is not divisible by the "
            f"{replicas} replicas of the strategy.")
    try:  # fails fast if the data are absent
        _, _, info = data_lib.make_datasets(data_config, seed=train.seed)
    except ConfigError as err:
        raise nvae_flags.flag_error(err.within("data")) from err
    experiment = experiment.resolved(
        info.steps_per_epoch, num_train=info.num_train,
        num_eval=info.num_eval, num_validation=info.num_validation,
        replicas=replicas)
    check_resume_compatible(experiment.runtime.model_dir, experiment)
    check_run_length(experiment.runtime.model_dir, experiment)
    return trainer_lib.Trainer(experiment, strategy), info


def run(experiment, strategy, stop=None):
    """Trains (or resumes) and returns the final evaluation dict.

    After the checks (nothing written yet), the chief takes the model
    directory's lock for the rest of the run (a second trainer is refused)
    and removes the folders of interrupted saves.

    Args:
      experiment: the `ExperimentConfig`.
      strategy: the `tf.distribute.Strategy`.
      stop: a `preemption.StopRequest` (see `Trainer.fit`).

    Raises:
      lock.ModelDirLocked: another trainer holds the model directory.
      preemption.Interrupted: stopped by a signal after a checkpoint.
    """
    trainer, info = build_trainer(experiment, strategy)
    model_dir = experiment.runtime.model_dir
    with contextlib.ExitStack() as stack:
        if trainer.is_chief:
            stack.enter_context(lock_lib.ModelDirLock(model_dir))
            checkpoints.remove_temp_folders(model_dir)
        return _train(trainer, info, stop)


def _train(trainer, info, stop):
    experiment = trainer.experiment
    if trainer.is_chief:
        save_config(experiment.runtime.model_dir, experiment)
    logging.info("%s: %d training images, %d steps of %d images (%d per "
                 "epoch, %d epochs), %s parameters.", experiment.data.dataset,
                 info.num_train, experiment.run.total_steps,
                 experiment.data.batch_size, experiment.run.steps_per_epoch,
                 experiment.run.num_epochs,
                 f"{trainer.model.num_parameters():,}")
    result = trainer.fit(stop)
    skipped = data_lib.skipped_image_files()
    if skipped:
        result["skipped_images"] = len(skipped)
        logging.warning(
            "%d image file(s) under %s could not be decoded and were left "
            "out of training and evaluation (remove or fix them): %s",
            len(skipped), experiment.data.data_dir, ", ".join(skipped))
    if experiment.train.export and trainer.is_chief:
        result["export_dir"] = export_model(trainer, result["step"])
    logging.info("%s NELBO %.3f nats, %.4f bits/dim (%s %s split, %d "
                 "images, one posterior sample each, step %d).",
                 result["split"].capitalize(), result["nelbo"],
                 result["bpd"], experiment.data.dataset, result["split"],
                 result["num_images"], result["step"])
    return result


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    with preemption.StopRequest() as stop:
        experiment = nvae_flags.from_flags(FLAGS)
        strategy = make_strategy(experiment.runtime)
        stop.install()
        try:
            run(experiment, strategy, stop)
        except preemption.Interrupted as stopped:
            logging.warning("%s with a checkpoint in %s; rerun the same "
                            "command to resume (exit status %d).", stopped,
                            experiment.runtime.model_dir,
                            stopped.exit_status)
            return stopped.exit_status
    return 0


def cli():
    """Entry point of `python -m nvae_tf.train`."""
    nvae_flags.define_flags()
    cli_lib.run(main, user_errors=(nvae_flags.FlagError,),
                argv=flagfiles.command_line(
                    help_groups=nvae_flags.HELP_GROUPS))


if __name__ == "__main__":
    cli()
