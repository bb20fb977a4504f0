"""`NVAE.compile` + `fit`: the trainer's step, through Keras.

The same model, data and seed trained 3 steps by the trainer's
`make_train_step` and by `model.fit` must give the same losses, the same
gradients (recorded by the optimizer) and the same weights, on one device
and under a `MirroredStrategy` of 2 logical CPUs. The standard callbacks
run, and `BackupAndRestore` resumes a killed `fit`.
"""

import json
import os
import signal
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from nvae_tf.model import NVAE
from nvae_tf.objectives import ObjectiveConfig
from nvae_tf.training import step as step_lib
from nvae_tf.training.config import RunLength, TrainConfig
from nvae_tf.training.optimizers import Adamax, WarmupCosineSchedule
from tests.conftest import make_tiny_config, run_fresh_python

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEED = 5
STEPS = 3
BATCH = 4
STEPS_PER_EPOCH = 2
EPOCHS = 3
RTOL = 1e-5
# fit's eager steps against the trainer's traced ones: Grappler's rewrites
# of the traced step (fused convolutions, reordered sums) move the
# gradients and, through Adamax, the weights in float32 rounding (measured
# after 3 steps: 7.7e-5 and 9.4e-5).
EAGER_RTOL = 3e-4
TRAIN = TrainConfig(learning_rate=1e-2, warmup_epochs=1, seed=SEED)
# Regularisers on and annealed, KL warm-up over the run: the whole recipe.
OBJECTIVE = ObjectiveConfig(total_steps=STEPS_PER_EPOCH * EPOCHS,
                            weight_decay_norm=1e-2,
                            weight_decay_norm_anneal=True)


class RecordingAdamax(Adamax):
    """The official Adamax, keeping the last gradient of every variable."""

    def build(self, var_list):
        if self.built:
            return
        super().build(var_list)
        self.recorded = [self.add_variable_from_reference(v, name="grad")
                         for v in var_list]

    def update_step(self, gradient, variable, learning_rate):
        recorded = self.recorded[self._get_variable_index(variable)]
        getattr(recorded, "value", recorded).assign(gradient)
        super().update_step(gradient, variable, learning_rate)


def _images():
    rng = np.random.RandomState(0)
    shape = (STEPS * BATCH, *make_tiny_config().data_shape)
    return rng.randint(0, 256, shape).astype(np.float32) / 255.0


def _model_and_optimizer(initial):
    model = NVAE(make_tiny_config(), seed=SEED)
    model.build()
    for variable, value in zip(model.weights, initial):
        variable.assign(value)
    schedule = WarmupCosineSchedule(
        TRAIN.learning_rate, TRAIN.learning_rate_min, STEPS_PER_EPOCH,
        EPOCHS, TRAIN.warmup_epochs)
    optimizer = RecordingAdamax(schedule, l2_weight_decay=TRAIN.weight_decay)
    optimizer.build(model.trainable_variables)
    return model, schedule, optimizer


def _state(model, optimizer, losses):
    return {"loss": np.array(losses, np.float64),
            "grads": [v.numpy() for v in optimizer.recorded],
            "weights": [v.numpy() for v in model.weights]}


def trainer_and_fit(strategy, run_eagerly=False):
    """(trainer's state, fit's state) after `STEPS` steps in `strategy`;
    fit's steps traced, or eager with `run_eagerly`."""
    keras.utils.set_random_seed(SEED)
    ds = tf.data.Dataset.from_tensor_slices(_images()).batch(BATCH)
    with strategy.scope():
        reference = NVAE(make_tiny_config(), seed=SEED)
        reference.build()
    initial = [v.numpy() for v in reference.weights]

    with strategy.scope():
        model, schedule, optimizer = _model_and_optimizer(initial)
        counters = step_lib.StepCounters.create()
    train_step = step_lib.make_train_step(
        strategy, model, optimizer, schedule, OBJECTIVE, counters,
        step_lib.seeded_latent_noise(SEED))
    batches = iter(strategy.experimental_distribute_dataset(ds))
    losses = [float(train_step(batches)["loss"]) for _ in range(STEPS)]
    trainer = _state(model, optimizer, losses)
    trainer["initial"] = initial

    with strategy.scope():
        model, _, optimizer = _model_and_optimizer(initial)
        model.compile(optimizer=optimizer, objective=OBJECTIVE,
                      run_eagerly=run_eagerly)

    class Losses(keras.callbacks.Callback):
        """Each step's loss (Keras logs the running mean)."""

        def __init__(self):
            super().__init__()
            self.values = []

        def on_train_batch_end(self, batch, logs=None):
            mean, n = logs["loss"], len(self.values)
            self.values.append(mean * (n + 1) - sum(self.values))

    record = Losses()
    model.fit(ds, epochs=1, steps_per_epoch=STEPS, callbacks=[record],
              verbose=0)
    return trainer, _state(model, optimizer, record.values)


def max_relative_errors(trainer, fit):
    """Largest error relative to max(|trainer's value|, 1e-3) by field."""
    out = {}
    for key in ("loss", "grads", "weights"):
        worst = 0.0
        for a, b in zip(tf.nest.flatten(fit[key]),
                        tf.nest.flatten(trainer[key])):
            a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
            scale = max(float(np.abs(b).max()), 1e-3)
            worst = max(worst, float(np.abs(a - b).max()) / scale)
        out[key] = worst
    out["num_grads"] = len(trainer["grads"])
    out["grads_nonzero"] = int(sum(bool(np.any(g)) for g in trainer["grads"]))
    out["weights_moved"] = max(
        float(np.abs(a - b).max())
        for a, b in zip(trainer["weights"], trainer["initial"]))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("run_eagerly", [False, True])
def test_fit_equals_the_trainer_step_on_one_device(run_eagerly):
    strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
    trainer, fit = trainer_and_fit(strategy, run_eagerly)
    errors = max_relative_errors(trainer, fit)
    assert errors["num_grads"] == len(fit["grads"]) > 10
    assert errors["grads_nonzero"] > errors["num_grads"] // 2
    for key in ("loss", "grads", "weights"):
        tolerance = EAGER_RTOL if run_eagerly and key != "loss" else RTOL
        assert errors[key] <= tolerance, errors
    assert np.all(np.isfinite(trainer["loss"]))
    assert errors["weights_moved"] > 1e-4


@pytest.mark.slow
def test_fit_equals_the_trainer_step_on_two_logical_cpus():
    code = (
        "import json, tensorflow as tf\n"
        "cpu = tf.config.list_physical_devices('CPU')[0]\n"
        "tf.config.set_logical_device_configuration(\n"
        "    cpu, [tf.config.LogicalDeviceConfiguration()] * 2)\n"
        "from tests import test_fit as t\n"
        "s = tf.distribute.MirroredStrategy(['/cpu:0', '/cpu:1'])\n"
        "trainer, fit = t.trainer_and_fit(s)\n"
        "e = t.max_relative_errors(trainer, fit)\n"
        "e['replicas'] = s.num_replicas_in_sync\n"
        "print(json.dumps(e))\n")
    errors = json.loads(run_fresh_python(code, timeout=900).splitlines()[-1])
    assert errors["replicas"] == 2
    for key in ("loss", "grads", "weights"):
        assert errors[key] <= RTOL, errors


def test_compile_defaults_to_the_official_optimizer_and_schedule():
    model = NVAE(make_tiny_config(), seed=SEED)
    model.compile(steps_per_epoch=STEPS_PER_EPOCH, epochs=EPOCHS,
                  train_config=TRAIN)
    length = RunLength(batches_per_pass=STEPS_PER_EPOCH,
                       steps_per_epoch=STEPS_PER_EPOCH,
                       total_steps=STEPS_PER_EPOCH * EPOCHS,
                       schedule_epochs=EPOCHS)
    schedule, optimizer = step_lib.make_optimizer(
        TRAIN, length, model.trainable_variables)
    assert isinstance(model.optimizer, Adamax)
    assert model.optimizer.get_config() == optimizer.get_config()
    steps = range(STEPS_PER_EPOCH * EPOCHS)
    np.testing.assert_array_equal(
        [float(model._fit_state.schedule(s)) for s in steps],  # pylint: disable=protected-access
        [float(schedule(s)) for s in steps])
    assert model._fit_state.objective.total_steps == 6  # pylint: disable=protected-access


def test_compile_errors_name_what_to_pass():
    model = NVAE(make_tiny_config())
    with pytest.raises(ValueError, match="steps_per_epoch= and epochs="):
        model.compile()
    with pytest.raises(ValueError, match="`loss` is not supported"):
        model.compile(loss="mse", steps_per_epoch=2, epochs=1)
    with pytest.raises(RuntimeError, match=r"NVAE.compile\(...\) first"):
        model.train_step(tf.zeros([1, 8, 8, 3]))


def test_evaluate_returns_nelbo_and_bits_per_dim():
    model = NVAE(make_tiny_config(), seed=SEED)
    model.compile(steps_per_epoch=1, epochs=1)
    x = _images()[:BATCH]
    result = model.evaluate(x, batch_size=BATCH, return_dict=True, verbose=0)
    assert set(result) == {"nelbo", "recon", "kl", "bpd"}
    np.testing.assert_allclose(
        result["bpd"], result["nelbo"] / (np.log(2) * 8 * 8 * 3), rtol=1e-5)
    np.testing.assert_allclose(result["nelbo"],
                               result["recon"] + result["kl"], rtol=1e-5)


def test_standard_callbacks_run(tmp_path):
    model = NVAE(make_tiny_config(), seed=SEED)
    model.compile(steps_per_epoch=STEPS_PER_EPOCH, epochs=EPOCHS)
    ds = tf.data.Dataset.from_tensor_slices(_images()).batch(BATCH).repeat()
    val = tf.data.Dataset.from_tensor_slices(_images()).batch(BATCH)
    weights = str(tmp_path / "best.weights.h5")
    history = model.fit(
        ds, epochs=EPOCHS, steps_per_epoch=STEPS_PER_EPOCH,
        validation_data=val, verbose=0, callbacks=[
            keras.callbacks.ModelCheckpoint(
                weights, monitor="val_nelbo", mode="min",
                save_weights_only=True),
            keras.callbacks.TensorBoard(str(tmp_path / "tb")),
            keras.callbacks.EarlyStopping(
                monitor="val_nelbo", mode="min", patience=0,
                min_delta=1e9)])
    # min_delta so large that no epoch improves: stops after epoch 2.
    assert len(history.history["val_nelbo"]) == 2
    assert os.path.exists(weights)
    assert os.listdir(tmp_path / "tb" / "train")
    assert int(model.optimizer.iterations) == 2 * STEPS_PER_EPOCH


_RESUMABLE_FIT = """
import os, sys, numpy as np, keras, tensorflow as tf
from tests import test_fit as t
from tests.conftest import make_tiny_config
from nvae_tf.model import NVAE
backup, kill_after = sys.argv[1], int(sys.argv[2])
model = NVAE(make_tiny_config(), seed=t.SEED)
model.compile(steps_per_epoch=t.STEPS_PER_EPOCH, epochs=t.EPOCHS)
ds = tf.data.Dataset.from_tensor_slices(t._images()).batch(t.BATCH).repeat()

class Kill(keras.callbacks.Callback):
    def on_epoch_begin(self, epoch, logs=None):
        print("epoch_begin", epoch, int(model.optimizer.iterations),
              flush=True)

    def on_epoch_end(self, epoch, logs=None):
        if epoch + 1 == kill_after:  # after BackupAndRestore saved it
            os.kill(os.getpid(), 9)

model.fit(ds, epochs=t.EPOCHS, steps_per_epoch=t.STEPS_PER_EPOCH, verbose=0,
          callbacks=[keras.callbacks.BackupAndRestore(backup), Kill()])
print("done", int(model.optimizer.iterations),
      float(np.sum([np.sum(v) for v in model.trainable_variables])))
"""


def _run_fit(backup, kill_after):
    proc = subprocess.run(
        [sys.executable, "-c", _RESUMABLE_FIT, backup, str(kill_after)],
        cwd=ROOT, capture_output=True, text=True, timeout=900, check=False)
    return proc.returncode, proc.stdout.split("\n")


@pytest.mark.slow
def test_backup_and_restore_resumes_a_killed_fit(tmp_path):
    backup = str(tmp_path / "backup")
    code, lines = _run_fit(backup, kill_after=2)
    assert code == -signal.SIGKILL, lines
    assert "epoch_begin 1 2" in lines
    code, lines = _run_fit(backup, kill_after=0)
    assert code == 0, lines
    # Resumes at epoch 3 with the optimizer's step at 2 epochs.
    begins = [line for line in lines if line.startswith("epoch_begin")]
    assert begins == [f"epoch_begin 2 {2 * STEPS_PER_EPOCH}"], lines
    done = [line for line in lines if line.startswith("done")][0].split()
    assert int(done[1]) == EPOCHS * STEPS_PER_EPOCH
