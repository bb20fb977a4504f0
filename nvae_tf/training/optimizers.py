"""Optimiser and learning-rate schedule of NVAE, as the official code runs them.

`Adamax` is the official variant (epsilon inside the max, coupled L2 weight
decay), which Keras' built-in Adamax is not. `WarmupCosineSchedule` is the
official per-iteration linear warm-up followed by a per-epoch cosine decay.
Reference: NVAE (Vahdat & Kautz, NeurIPS 2020, arXiv:2007.03898) and the
official `train.py`.
"""

from __future__ import annotations

import math
from typing import Any

import keras
import tensorflow as tf
from keras import ops

DEFAULT_WEIGHT_DECAY = 3e-4  # official `--weight_decay`, coupled L2


@keras.saving.register_keras_serializable(package="nvae_tf")
class Adamax(keras.optimizers.Optimizer):
    """Adamax with epsilon inside the max and coupled L2 weight decay.

    At step t = iterations + 1, for every variable theta with gradient g:

        g     <- g + wd * theta                      (coupled L2, all variables)
        m     <- beta_1 * m + (1 - beta_1) * g
        u     <- max(beta_2 * u, |g| + epsilon)
        theta <- theta - lr / (1 - beta_1^t) * m / u

    This is `torch.optim.Adamax` as NVAE uses it. `keras.optimizers.Adamax`
    instead divides by (u + epsilon) with epsilon 1e-7, and Keras'
    `weight_decay` is decoupled (AdamW-style); both differ. The base class'
    `weight_decay` is therefore always None here.

    Args:
      learning_rate: float or `LearningRateSchedule` (e.g.
        `WarmupCosineSchedule`).
      beta_1: decay of the first moment m.
      beta_2: decay of the infinity norm u.
      epsilon: added to |g| inside the max (official 1e-3); also a floor on u.
      l2_weight_decay: wd of the coupled L2 term; None means the official
        default 3e-4.
      weight_decay: the official flag name for the same coupled L2 decay,
        accepted as an alias of `l2_weight_decay` (so configs using the NVAE
        name carry over). It never enables Keras' decoupled decay.
      **kwargs: other `keras.optimizers.Optimizer` arguments (clipnorm,
        loss_scale_factor, ...); NVAE uses none of them.

    Raises:
      ValueError: on out-of-range hyper-parameters, or if `weight_decay` and
        `l2_weight_decay` are both given and differ.
    """

    def __init__(self, learning_rate=1e-2, beta_1: float = 0.9,
                 beta_2: float = 0.999, epsilon: float = 1e-3,
                 l2_weight_decay: float | None = None,
                 weight_decay: float | None = None,
                 name: str = "adamax_nvae", **kwargs):
        if (weight_decay is not None and l2_weight_decay is not None
                and weight_decay != l2_weight_decay):
            raise ValueError(
                "`weight_decay` is an alias of `l2_weight_decay`; got "
                f"different values: weight_decay={weight_decay}, "
                f"l2_weight_decay={l2_weight_decay}")
        if l2_weight_decay is None:
            l2_weight_decay = (DEFAULT_WEIGHT_DECAY if weight_decay is None
                               else weight_decay)
        super().__init__(learning_rate=learning_rate, name=name,
                         weight_decay=None, **kwargs)
        for arg, value in (("beta_1", beta_1), ("beta_2", beta_2)):
            if not 0.0 <= value < 1.0:
                raise ValueError(f"`{arg}` must be in [0, 1). "
                                 f"Received: {arg}={value}")
        if epsilon <= 0:
            raise ValueError(f"`epsilon` must be > 0. Received: "
                             f"epsilon={epsilon}")
        if l2_weight_decay < 0:
            raise ValueError("`l2_weight_decay` must be >= 0. Received: "
                             f"l2_weight_decay={l2_weight_decay}")
        self.beta_1 = beta_1
        self.beta_2 = beta_2
        self.epsilon = epsilon
        self.l2_weight_decay = l2_weight_decay

    def build(self, var_list):
        """Creates the slots m (first moment) and u (infinity norm)."""
        if self.built:
            return
        super().build(var_list)
        self._momentums = []
        self._norms = []
        for variable in var_list:
            self._momentums.append(self.add_variable_from_reference(
                variable, name="momentum"))
            self._norms.append(self.add_variable_from_reference(
                variable, name="norm"))

    def update_step(self, gradient, variable, learning_rate):
        """Applies one official Adamax update to `variable`."""
        self._update_step(gradient, variable, learning_rate, None)

    def _distributed_tf_update_step(self, distribution, grads_and_vars,
                                    learning_rate):
        """Keras' TF-backend update loop, sharing per-step scalars.

        The step's scalars (lr / (1 - beta_1^t) and the constants) depend on
        the step only, so they are made once per device and dtype for all
        variables instead of once per variable: the same values, a smaller
        training graph (faster tracing and graph optimisation, less memory;
        docs/performance.md). `cache` lives for this one call, so eager steps never see a
        stale value.
        """
        cache = {}

        # Straight-line code: nothing for AutoGraph to convert, and it is
        # converted once per variable, a cost in tracing time.
        @tf.autograph.experimental.do_not_convert
        def apply_grad_to_update_var(var, grad, learning_rate):
            return self._update_step(grad, var, learning_rate, cache)

        for grad, var in grads_and_vars:
            distribution.extended.update(
                var, apply_grad_to_update_var, args=(grad, learning_rate),
                group=False)

    def _step_scalars(self, learning_rate, dtype):
        """(lr / (1 - beta_1^t), wd, beta_1, 1 - beta_1, beta_2, epsilon)."""
        lr = ops.cast(learning_rate, dtype)
        step = ops.cast(self.iterations + 1, dtype)
        bias_correction = 1.0 - ops.power(ops.cast(self.beta_1, dtype), step)
        constants = (self.l2_weight_decay, self.beta_1, 1.0 - self.beta_1,
                     self.beta_2, self.epsilon)
        return (lr / bias_correction,) + tuple(
            tf.constant(c, dtype) for c in constants)

    def _update_step(self, gradient, variable, learning_rate, cache):
        dtype = variable.dtype
        if cache is None:
            scalars = self._step_scalars(learning_rate, dtype)
        else:
            # Keyed by the learning-rate tensor itself (one per device under
            # a MirroredStrategy), kept alive by the entry.
            key = (id(learning_rate), dtype)
            if key not in cache:
                cache[key] = (learning_rate,
                              self._step_scalars(learning_rate, dtype))
            scalars = cache[key][1]
        lr_t, wd, beta_1, one_minus_beta_1, beta_2, epsilon = scalars
        gradient = tf.cast(gradient, dtype)
        index = self._get_variable_index(variable)
        # The TensorFlow variables under the Keras ones, with TensorFlow's
        # ops: the same ops as through `keras.ops` and `self.assign`, traced
        # in less than half the time (463-886 variables per step).
        var, m, u = (_tf_variable(v) for v in (
            variable, self._momentums[index], self._norms[index]))

        gradient = gradient + wd * var
        m_t = beta_1 * m + one_minus_beta_1 * gradient
        u_t = tf.maximum(beta_2 * u, tf.abs(gradient) + epsilon)
        m.assign(m_t)
        u.assign(u_t)
        # (lr / (1 - beta_1^t)) * m / u, evaluated in the official order.
        var.assign_sub(lr_t * m_t / u_t)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(),
                "beta_1": self.beta_1,
                "beta_2": self.beta_2,
                "epsilon": self.epsilon,
                "l2_weight_decay": self.l2_weight_decay}


def _tf_variable(variable):
    """The `tf.Variable` (a mirrored one under a strategy) of a Keras
    variable; a `tf.Variable` as it is."""
    return getattr(variable, "value", variable) \
        if isinstance(variable, keras.Variable) else variable


@keras.saving.register_keras_serializable(package="nvae_tf")
class WarmupCosineSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up per iteration, then cosine decay per epoch (official).

    With N = `steps_per_epoch`, W = `warmup_epochs * N`, epoch e = step // N,
    T = `epochs - warmup_epochs - 1` and L0 = `learning_rate * (W - 1) / W`
    (the last warm-up value; `learning_rate` when W = 0), warmup =
    `warmup_epochs`:

        step < W:                 lr = learning_rate * step / W
        step >= W, e <= warmup:   lr = L0
        e > warmup:               lr = lr_min + (L0 - lr_min)
                                       * (1 + cos(pi (e - warmup) / T)) / 2

    so lr is exactly 0 at step 0 and exactly `learning_rate_min` in the last
    epoch e = epochs - 1. This is the closed form of the official run: warm-up
    sets the LR every iteration, and `CosineAnnealingLR(T_max=T)` is stepped
    at the start of every epoch e > warmup_epochs, starting from the LR left
    by warm-up. Steps past the last epoch stay at `learning_rate_min` (the
    official run never gets there). If T <= 0 no epoch reaches the cosine
    part.

    The value is computed in float64 and returned in `dtype` (float32 by
    default; float64 for exact comparisons).

    `lr_scale` is a non-trainable float64 `tf.Variable` (initial value
    `lr_scale`) multiplying the result. A trainer lowers the LR after a NaN
    recovery with `schedule.scale_by(0.5)` or `schedule.lr_scale.assign(...)`
    outside the compiled step; the step picks it up without retracing. It is
    not part of the optimizer's checkpoint: a trainer that wants it to
    survive a restart tracks it itself (its current value is also in
    `get_config()`).

    Args:
      learning_rate: peak LR (official default 1e-2).
      learning_rate_min: final LR eta_min (official default 1e-4).
      steps_per_epoch: N, iterations per epoch *per process* (the official
        schedule counts a process's iterations, not images).
      epochs: total epochs.
      warmup_epochs: warm-up length in epochs (official default 5; 0 = none).
      lr_scale: initial value of the `lr_scale` multiplier.
      dtype: dtype of the returned LR.

    Raises:
      ValueError: naming the argument, if a value is out of range.
    """

    def __init__(self, learning_rate: float, learning_rate_min: float,
                 steps_per_epoch: int, epochs: int, warmup_epochs: int = 5,
                 lr_scale: float = 1.0, dtype: str = "float32"):
        for arg, value in (("learning_rate", learning_rate),
                           ("learning_rate_min", learning_rate_min),
                           ("lr_scale", lr_scale)):
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"`{arg}` must be a finite number >= 0. "
                                 f"Received: {arg}={value}")
        for arg, value, low in (("steps_per_epoch", steps_per_epoch, 1),
                                ("epochs", epochs, 1),
                                ("warmup_epochs", warmup_epochs, 0)):
            if int(value) != value or value < low:
                raise ValueError(f"`{arg}` must be an int >= {low}. "
                                 f"Received: {arg}={value}")
        if dtype not in ("float32", "float64"):
            raise ValueError("`dtype` must be 'float32' or 'float64'. "
                             f"Received: dtype={dtype}")
        self.learning_rate = float(learning_rate)
        self.learning_rate_min = float(learning_rate_min)
        self.steps_per_epoch = int(steps_per_epoch)
        self.epochs = int(epochs)
        self.warmup_epochs = int(warmup_epochs)
        self.dtype = dtype
        self.lr_scale = tf.Variable(float(lr_scale), dtype=tf.float64,
                                    trainable=False, name="lr_scale")

    @property
    def warmup_steps(self) -> int:
        """W = warmup_epochs * steps_per_epoch."""
        return self.warmup_epochs * self.steps_per_epoch

    @property
    def last_warmup_learning_rate(self) -> float:
        """L0, the LR held from the end of warm-up until the cosine starts."""
        w = self.warmup_steps
        return self.learning_rate * (w - 1) / w if w else self.learning_rate

    def scale_by(self, factor: float) -> None:
        """Multiplies `lr_scale` by `factor` (call outside the train step)."""
        self.lr_scale.assign(self.lr_scale * float(factor))

    def __call__(self, step):
        with tf.name_scope("warmup_cosine_schedule"):
            step = tf.cast(step, tf.int64)
            epoch = tf.minimum(step // self.steps_per_epoch, self.epochs - 1)
            w = self.warmup_steps
            lr_peak = tf.constant(self.learning_rate, tf.float64)
            lr_min = tf.constant(self.learning_rate_min, tf.float64)
            lr_hold = tf.constant(self.last_warmup_learning_rate, tf.float64)
            # max(., 1) keeps both unused branches finite at W = 0 / T <= 0.
            warmup = lr_peak * tf.cast(step, tf.float64) / max(w, 1)
            t_max = max(self.epochs - self.warmup_epochs - 1, 1)
            progress = tf.cast(epoch - self.warmup_epochs, tf.float64) / t_max
            cosine = lr_min + (lr_hold - lr_min) * 0.5 * (
                1.0 + tf.cos(math.pi * progress))
            lr = tf.where(
                step < w, warmup,
                tf.where(epoch <= self.warmup_epochs, lr_hold, cosine))
            lr = lr * tf.convert_to_tensor(self.lr_scale)
            return tf.cast(lr, self.dtype)

    def get_config(self) -> dict[str, Any]:
        return {"learning_rate": self.learning_rate,
                "learning_rate_min": self.learning_rate_min,
                "steps_per_epoch": self.steps_per_epoch,
                "epochs": self.epochs,
                "warmup_epochs": self.warmup_epochs,
                "lr_scale": float(self.lr_scale.numpy()),
                "dtype": self.dtype}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "WarmupCosineSchedule":
        return cls(**config)
