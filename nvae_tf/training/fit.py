"""Keras' `compile`/`fit`/`evaluate`/`export` for the NVAE model.

`NVAE.compile(...)` then `fit(dataset, epochs=..., steps_per_epoch=...)`
trains with the recipe of `python -m nvae_tf.train`: `train_step` runs the
trainer's per-replica step (`step.make_replica_step`: the objective with
KL warm-up and balancing, the spectral and BN regularisers and their
anneal, latent noise keyed by `(seed, step)`, all-reduced gradients) and
its cross-replica part (`step.finish_step`: official Adamax update, or a
skip that restores the non-trainable state if the loss or a gradient is
not finite) in a `merge_call`. The step index is `optimizer.iterations`,
so a skipped step is retried with the same noise on the next batch.

Keras' limits, where the CLI trainer is the route: `fit` under
`MultiWorkerMirroredStrategy` is not supported by Keras 3, NaN recovery
(restore and lower the learning rate) and the float16 loss scale are the
trainer's, and `BackupAndRestore` resumes at the epoch boundary with the
data order of the dataset given to `fit`.
"""

from __future__ import annotations

import dataclasses

import keras
import tensorflow as tf

from nvae_tf.objectives import ObjectiveConfig, bits_per_dim
from nvae_tf.training import step as step_lib
from nvae_tf.training.config import RunLength, TrainConfig

# Metrics of `train_step` (besides Keras' own "loss") and of `test_step`.
TRAIN_METRICS = ("nelbo", "recon", "kl", "kl_coeff", "bpd")
TEST_METRICS = ("nelbo", "recon", "kl", "bpd")


class _FitState:
    """What `compile` prepares for `train_step`; a plain object, so that
    none of it becomes part of the model's weights."""

    def __init__(self, model, objective, schedule):
        self.objective = objective
        self.schedule = schedule
        self.options = step_lib.StepOptions()
        self.counters = step_lib.StepCounters.create()
        self.trackers = {name: keras.metrics.Mean(name=name)
                         for name in TRAIN_METRICS}
        self.replica_step = step_lib.make_replica_step(
            model, objective, step_lib.seeded_latent_noise(model.seed),
            self.options)


def _images(data):
    """The images of a batch: `x`, or the first element of `(x, ...)`."""
    if isinstance(data, (tuple, list)):
        return data[0]
    if isinstance(data, dict):
        return data["images"]
    return data


class KerasTraining:
    """`compile`, `train_step`, `test_step`, `metrics` and `export` of
    `NVAE` (mixed into the Keras model)."""

    def compile(self, optimizer=None, objective: ObjectiveConfig | None = None,
                steps_per_epoch: int | None = None, epochs: int | None = None,
                train_config: TrainConfig | None = None, **kwargs):
        """Prepares `fit` with the official recipe.

        Call it in the strategy's scope, as for any Keras model.

        Args:
          optimizer: a Keras optimizer; None builds the official `Adamax`
            with the `WarmupCosineSchedule` of `train_config` over
            `steps_per_epoch` and `epochs`.
          objective: the `ObjectiveConfig`; None is the default objective
            with `total_steps = steps_per_epoch * epochs` (the KL warm-up
            length).
          steps_per_epoch, epochs: the run's length, needed when
            `optimizer` or `objective` is None.
          train_config: learning rates, warm-up and weight decay of the
            default optimizer (`TrainConfig()` if None).
          **kwargs: other `keras.Model.compile` arguments
            (`steps_per_execution`, ...); `loss` and `jit_compile=True` are
            not supported (the loss is the NVAE objective).
        """
        for name in ("loss", "loss_weights", "metrics", "weighted_metrics"):
            if kwargs.get(name) is not None:
                raise ValueError(
                    f"NVAE.compile: `{name}` is not supported; the loss is "
                    "the NVAE objective, set it with objective="
                    "ObjectiveConfig(...).")
        if kwargs.pop("jit_compile", False) not in (False, "auto"):
            raise ValueError("NVAE.compile: jit_compile=True is not "
                             "supported by fit; use `python -m "
                             "nvae_tf.train --jit_compile`.")
        total = None
        if steps_per_epoch is not None and epochs is not None:
            total = int(steps_per_epoch) * int(epochs)
        if total is None and (optimizer is None or objective is None):
            raise ValueError(
                "NVAE.compile needs steps_per_epoch= and epochs= for the "
                "official learning-rate schedule and KL warm-up (or pass "
                "optimizer= and objective=).")
        if not self.built:
            self.build()
        schedule = None
        if optimizer is None:
            train = train_config or TrainConfig()
            length = RunLength(batches_per_pass=int(steps_per_epoch),
                               steps_per_epoch=int(steps_per_epoch),
                               total_steps=total,
                               schedule_epochs=int(epochs))
            schedule, optimizer = step_lib.make_optimizer(
                train, length, self.trainable_variables)
        else:
            optimizer = keras.optimizers.get(optimizer)
            schedule = optimizer._learning_rate  # pylint: disable=protected-access
            if not callable(schedule):
                schedule = _Constant(schedule)
            optimizer.build(self.trainable_variables)
        if objective is None:
            objective = ObjectiveConfig(total_steps=total)
        super().compile(optimizer=optimizer, jit_compile=False, **kwargs)
        self._fit_state = _FitState(self, objective, schedule)

    @property
    def metrics(self):
        state = getattr(self, "_fit_state", None)
        extra = list(state.trackers.values()) if state is not None else []
        return super().metrics + extra

    def _require_compiled(self, what):
        if getattr(self, "_fit_state", None) is None:
            raise RuntimeError(f"NVAE.{what} needs NVAE.compile(...) first "
                               "(in the strategy's scope).")

    def train_step(self, data):
        """One step of the trainer's recipe (module docstring)."""
        self._require_compiled("fit")
        fit = self._fit_state
        x = _images(data)
        step = tf.convert_to_tensor(self.optimizer.iterations)
        state = self.non_trainable_variables
        snapshot = [tf.identity(v.value) for v in state]
        outputs = fit.replica_step(
            x, step, tf.constant(0, tf.int64),
            tf.constant(1.0, tf.float32))
        metrics = outputs[1]

        def cross_replica(strategy, outputs, snapshot):
            def restore():
                for variable, value in zip(state, snapshot):
                    strategy.extended.update(
                        variable.value, lambda v, s: v.assign(s),
                        args=(value,), group=False)

            return step_lib.finish_step(
                strategy, self, self.optimizer, fit.schedule, fit.counters,
                fit.options, step, outputs, restore)["finite"]

        finite = tf.distribute.get_replica_context().merge_call(
            cross_replica, args=(outputs, snapshot))
        del finite
        self._loss_tracker.update_state(metrics["loss"])
        for name, tracker in fit.trackers.items():
            tracker.update_state(metrics[name])
        logs = {m.name: m.result() for m in self.metrics}
        logs["skipped_steps"] = tf.convert_to_tensor(
            fit.counters.skipped_steps)
        return logs

    def test_step(self, data):
        """NELBO (nats per image), its parts and bits/dim, beta = 1."""
        self._require_compiled("evaluate")
        out = self(_images(data), training=False)
        values = {"nelbo": out.nelbo, "recon": out.recon_loss,
                  "kl": tf.add_n(out.kl_per_group),
                  "bpd": bits_per_dim(out.nelbo, self.config.num_pixels)}
        trackers = self._fit_state.trackers
        for name in TEST_METRICS:
            trackers[name].update_state(values[name])
        return {name: trackers[name].result() for name in TEST_METRICS}

    def export(self, filepath, format="tf_saved_model", verbose=None,
               input_signature=None, **kwargs):
        """Writes the serving SavedModel of `python -m nvae_tf.export`.

        Signatures sample (serving_default), reconstruct, log_likelihood,
        encode, decode and log_weights, with the image and latent shapes
        in their input specs.

        Args:
          filepath: the export directory (`saved_models/<name>/<version>`).
          format, verbose, input_signature: Keras' arguments; only
            "tf_saved_model" and no `input_signature` are supported (the
            signatures are fixed).
          **kwargs: `nvae_tf.serving.export.export_saved_model` options
            (temperature, readjust_bn, overwrite, inference_shards, ...).

        Returns:
          The export's metadata (see `export_saved_model`).
        """
        del verbose
        if format != "tf_saved_model" or input_signature is not None:
            raise ValueError(
                "NVAE.export writes the serving SavedModel only "
                "(format='tf_saved_model', no input_signature); got "
                f"format={format!r}, input_signature={input_signature!r}.")
        from nvae_tf.serving import export as export_lib  # pylint: disable=import-outside-toplevel
        if not self.built:
            self.build()
        return export_lib.export_saved_model(self, filepath, **kwargs)


@dataclasses.dataclass(frozen=True)
class _Constant:
    """A constant learning rate as a schedule of the step."""

    value: float

    def __call__(self, step):
        del step
        return tf.convert_to_tensor(self.value, tf.float32)
