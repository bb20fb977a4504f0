"""Resuming with other run-length flags: refused unless `--extend_run`.

The LR cosine and the KL warm-up are functions of the run length, so a
resume with another `--max_steps`, `--epochs` or `--steps_per_epoch` would
move them mid-run; `--extend_run` accepts the new length on purpose.
"""

import dataclasses
import os

import numpy as np
import pytest
import tensorflow as tf
from absl import flags

from nvae_tf.training import checkpoints
from nvae_tf.training import flags as nvae_flags
from nvae_tf.training import main as train
from nvae_tf.training.optimizers import WarmupCosineSchedule
from tests.training import helpers as train_helpers


def _experiment(tmp_path, *extra):
    values = flags.FlagValues()
    nvae_flags.define_flags(values)
    values(["train", *train_helpers.TINY_FLAGS, "--data_dir=/images",
            f"--model_dir={tmp_path / 'run'}", *extra])
    return nvae_flags.from_flags(values)


def _saved_run(tmp_path, *extra, batches_per_pass=9):
    """A model directory with config.json and one checkpoint."""
    experiment = _experiment(tmp_path, *extra).resolved(batches_per_pass)
    model_dir = experiment.runtime.model_dir
    checkpoints.write_config(model_dir, experiment)
    checkpoints.checkpoint_manager(
        tf.train.Checkpoint(step=tf.Variable(3)), model_dir).save(3)
    return model_dir


def test_changed_run_length_flags_are_refused_naming_the_saved_values(
        tmp_path):
    model_dir = _saved_run(tmp_path, "--max_steps=6", "--steps_per_epoch=3")
    same = _experiment(tmp_path, "--max_steps=6",
                       "--steps_per_epoch=3").resolved(9)
    train.check_run_length(model_dir, same)  # no error
    longer = _experiment(tmp_path, "--max_steps=12", "--steps_per_epoch=3",
                         "--epochs=5").resolved(9)
    with pytest.raises(nvae_flags.FlagError) as err:
        train.check_run_length(model_dir, longer)
    message = str(err.value)
    assert "\n" not in message
    assert "--max_steps=12 (saved 6)" in message
    assert "--epochs=5 (saved 2)" in message
    assert "--steps_per_epoch" not in message  # unchanged
    assert "--extend_run" in message
    # The flag accepts it.
    extended = dataclasses.replace(longer, runtime=dataclasses.replace(
        longer.runtime, extend_run=True))
    train.check_run_length(model_dir, extended)
    # --epochs alone does not matter while --max_steps sets the length.
    train.check_run_length(model_dir, _experiment(
        tmp_path, "--max_steps=6", "--steps_per_epoch=3",
        "--epochs=7").resolved(9))


def test_another_split_size_is_refused_too(tmp_path):
    """Same flags, but --batch_size (or --validation_fraction) changed the
    batches per pass and with them the epoch length."""
    model_dir = _saved_run(tmp_path)
    with pytest.raises(nvae_flags.FlagError,
                       match=r"12 batches per pass \(saved 9; --batch_size"):
        train.check_run_length(model_dir, _experiment(tmp_path).resolved(12))


def test_a_new_directory_or_one_without_checkpoint_is_not_checked(tmp_path):
    experiment = _experiment(tmp_path, "--max_steps=6").resolved(9)
    train.check_run_length(str(tmp_path / "new"), experiment)
    checkpoints.write_config(str(tmp_path / "bare"), experiment)
    train.check_run_length(str(tmp_path / "bare"), _experiment(
        tmp_path, "--max_steps=7").resolved(9))


def _scalars(folder, tag):
    values = {}
    for name in os.listdir(folder):
        for event in tf.compat.v1.train.summary_iterator(
                os.path.join(folder, name)):
            for value in event.summary.value:
                if value.tag == tag:
                    values[event.step] = float(tf.make_ndarray(value.tensor))
    return values


@pytest.mark.slow
def test_extend_run_resumes_with_the_schedule_of_the_new_length(tmp_path):
    data = train_helpers.make_image_folder(str(tmp_path / "images"))
    model_dir = str(tmp_path / "run")
    common = (*train_helpers.TINY_FLAGS, f"--data_dir={data}",
              f"--model_dir={model_dir}", "--steps_per_epoch=3",
              "--noexport")
    train_helpers.run_train(*common, "--max_steps=3")
    refused = train_helpers.run_train(*common, "--max_steps=9", check=False)
    assert refused.returncode != 0
    assert "--max_steps=9 (saved 3)" in refused.stderr
    assert train_helpers.checkpoint_step(  # nothing trained
        train_helpers.latest_checkpoint(model_dir)) == 3
    assert checkpoints.read_config(model_dir).run.total_steps == 3

    log = train_helpers.run_train(*common, "--max_steps=9",
                                  "--extend_run").stderr
    assert "at step 3" in log
    saved = checkpoints.read_config(model_dir)
    assert (saved.run.total_steps, saved.run.schedule_epochs) == (9, 3)
    assert saved.objective.total_steps == 9  # the KL warm-up's length too
    # Summaries every 2 steps report the LR of the step just taken
    # (schedule(step - 1)): the new 3-epoch cosine, no longer the 1-epoch
    # schedule of the first run (which stays at its peak, 1e-2).
    new = WarmupCosineSchedule(1e-2, 1e-4, steps_per_epoch=3, epochs=3,
                               warmup_epochs=0)
    learning_rates = _scalars(os.path.join(model_dir, "train"),
                              "learning_rate")
    for step in (4, 6, 8):
        np.testing.assert_allclose(learning_rates[step],
                                   float(new(step - 1)), rtol=1e-6)
    np.testing.assert_allclose(learning_rates[4], 5.05e-3, rtol=1e-6)
    np.testing.assert_allclose(learning_rates[8], 1e-4, rtol=1e-6)
