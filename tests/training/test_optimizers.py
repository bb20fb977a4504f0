"""Tests of nvae_tf.training.optimizers against NumPy / PyTorch-recurrence references."""

import math
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

from nvae_tf.training.optimizers import Adamax, WarmupCosineSchedule

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))

# ------------------------------------------------------------------ Adamax

THETA0 = np.array([0.5, -1.0, 2.0, 0.0], np.float32)
GRADS = [np.array([0.1, -0.2, 0.0, 3.0], np.float32),
         np.array([-0.3, 0.05, 0.0, 1.0], np.float32),
         np.array([0.2, 0.2, 1e-4, -2.0], np.float32)]


def _numpy_adamax(theta, grads, lr, wd, beta_1=0.9, beta_2=0.999, eps=1e-3):
    """torch.optim.Adamax (the official optimiser) in float64."""
    theta = theta.astype(np.float64)
    m = np.zeros_like(theta)
    u = np.zeros_like(theta)
    for t, g in enumerate(grads, start=1):
        g = g + wd * theta
        m = beta_1 * m + (1 - beta_1) * g
        u = np.maximum(beta_2 * u, np.abs(g) + eps)
        theta = theta - lr / (1 - beta_1 ** t) * m / u
    return theta


def _run(optimizer, grads=GRADS, compiled=False):
    var = tf.Variable(THETA0)
    apply = optimizer.apply_gradients
    if compiled:
        apply = tf.function(lambda g: optimizer.apply_gradients([(g, var)]))
        for g in grads:
            apply(tf.constant(g))
    else:
        for g in grads:
            apply([(tf.constant(g), var)])
    return var.numpy()


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("wd", [3e-4, 0.1, 0.0])
def test_adamax_matches_numpy_reference(wd, compiled):
    opt = Adamax(learning_rate=0.01, l2_weight_decay=wd)
    result = _run(opt, compiled=compiled)
    expected = _numpy_adamax(THETA0, GRADS, 0.01, wd)
    np.testing.assert_allclose(result, expected, atol=1e-6, rtol=0)
    assert int(opt.iterations.numpy()) == 3
    # The third coordinate's gradient is 0 at first: |g| + eps sets u.
    assert not np.allclose(result, THETA0)


def test_adamax_default_weight_decay_and_differs_from_keras():
    ours = _run(Adamax(learning_rate=0.01))
    np.testing.assert_allclose(
        ours, _numpy_adamax(THETA0, GRADS, 0.01, 3e-4), atol=1e-6, rtol=0)
    keras_result = _run(keras.optimizers.Adamax(learning_rate=0.01,
                                                epsilon=1e-3))
    assert np.max(np.abs(ours - keras_result)) > 1e-3


def test_adamax_weight_decay_name_is_an_alias_not_keras_decay():
    opt = Adamax(learning_rate=0.01, weight_decay=0.1)
    assert opt.l2_weight_decay == 0.1 and opt.weight_decay is None
    np.testing.assert_allclose(
        _run(opt), _numpy_adamax(THETA0, GRADS, 0.01, 0.1), atol=1e-6)
    with pytest.raises(ValueError, match="alias"):
        Adamax(weight_decay=0.1, l2_weight_decay=0.2)


def test_adamax_config_round_trip():
    opt = Adamax(learning_rate=0.02, beta_1=0.8, epsilon=1e-4,
                 l2_weight_decay=1e-3)
    config = opt.get_config()
    assert config["weight_decay"] is None
    clone = Adamax.from_config(config)
    assert (clone.beta_1, clone.beta_2, clone.epsilon,
            clone.l2_weight_decay) == (0.8, 0.999, 1e-4, 1e-3)
    again = keras.optimizers.deserialize(keras.optimizers.serialize(opt))
    assert isinstance(again, Adamax) and again.l2_weight_decay == 1e-3


@pytest.mark.parametrize("kwargs, name", [
    (dict(beta_1=1.0), "beta_1"), (dict(beta_2=-0.1), "beta_2"),
    (dict(epsilon=0.0), "epsilon"), (dict(l2_weight_decay=-1.0),
                                     "l2_weight_decay")])
def test_adamax_errors(kwargs, name):
    with pytest.raises(ValueError, match=f"`{name}`"):
        Adamax(**kwargs)


def test_adamax_with_schedule_in_model_fit():
    keras.utils.set_random_seed(0)
    x = np.random.default_rng(0).normal(size=(64, 3)).astype(np.float32)
    y = x @ np.array([[1.0], [-2.0], [0.5]], np.float32)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    schedule = WarmupCosineSchedule(0.2, 1e-3, steps_per_epoch=4, epochs=6,
                                    warmup_epochs=1)
    model.compile(optimizer=Adamax(schedule), loss="mse")
    history = model.fit(x, y, batch_size=16, epochs=6, verbose=0)
    losses = history.history["loss"]
    assert int(model.optimizer.iterations.numpy()) == 24
    assert np.all(np.diff(losses) < 0) and losses[-1] < 0.1 * losses[0]


class _PerVariableAdamax(Adamax):
    """The straightforward update: every scalar made per variable, slots
    re-read after their assignment (the form before the shared per-step
    scalars)."""

    def _distributed_tf_update_step(self, distribution, grads_and_vars,
                                    learning_rate):
        for grad, var in grads_and_vars:
            distribution.extended.update(
                var, lambda v, g, lr: self.update_step(g, v, lr),
                args=(grad, learning_rate), group=False)

    def update_step(self, gradient, variable, learning_rate):
        dtype = variable.dtype
        lr = tf.cast(learning_rate, dtype)
        gradient = tf.cast(gradient, dtype)
        step = tf.cast(self.iterations + 1, dtype)
        index = self._get_variable_index(variable)
        m = self._momentums[index]
        u = self._norms[index]
        gradient = gradient + self.l2_weight_decay * variable
        self.assign(m, self.beta_1 * m + (1.0 - self.beta_1) * gradient)
        self.assign(u, tf.maximum(self.beta_2 * u,
                                  tf.abs(gradient) + self.epsilon))
        bias_correction = 1.0 - tf.pow(tf.cast(self.beta_1, dtype), step)
        self.assign_sub(variable, lr / bias_correction * m / u)


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("schedule", [False, True])
def test_adamax_shared_step_scalars_equal_per_variable_update(compiled,
                                                              schedule):
    """Bit-for-bit the per-variable form, over steps (nothing stale)."""
    rng = np.random.default_rng(3)
    shapes = [(3, 3, 4, 5), (5,), (7, 2), ()]
    init = [rng.normal(size=s).astype(np.float32) for s in shapes]
    grads = [[rng.normal(size=s).astype(np.float32) * 10.0 ** -k
              for s in shapes] for k in range(4)]
    finals = []
    for cls in (Adamax, _PerVariableAdamax):
        lr = (WarmupCosineSchedule(0.05, 1e-3, steps_per_epoch=2, epochs=4,
                                   warmup_epochs=1) if schedule else 0.01)
        opt = cls(learning_rate=lr, l2_weight_decay=0.1)
        variables = [tf.Variable(v) for v in init]

        def apply(gs, opt=opt, variables=variables):
            opt.apply_gradients(zip(gs, variables))
        if compiled:
            apply = tf.function(apply)
        for gs in grads:
            apply([tf.constant(g) for g in gs])
        finals.append([v.numpy() for v in variables + opt.variables])
    for a, b in zip(*finals):
        np.testing.assert_array_equal(a, b)


def test_adamax_first_step_with_schedule_is_a_no_op():
    # lr is exactly 0 at step 0, so even the coupled decay does nothing.
    schedule = WarmupCosineSchedule(0.01, 1e-4, steps_per_epoch=10, epochs=20)
    result = _run(Adamax(schedule, l2_weight_decay=0.5), grads=GRADS[:1])
    np.testing.assert_array_equal(result, THETA0)


_MIRRORED_SCRIPT = textwrap.dedent("""
    import numpy as np
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras
    from nvae_tf.training.optimizers import Adamax, WarmupCosineSchedule

    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 3)).astype(np.float32)
    y = x @ np.array([[1.0], [-2.0], [0.5]], np.float32)

    def train(strategy):
        with strategy.scope():
            model = keras.Sequential([
                keras.Input((3,)),
                keras.layers.Dense(1, kernel_initializer="ones")])
            schedule = WarmupCosineSchedule(
                0.05, 1e-3, steps_per_epoch=4, epochs=3, warmup_epochs=1)
            model.compile(optimizer=Adamax(schedule, l2_weight_decay=0.01),
                          loss="mse")
        model.fit(x, y, batch_size=8, epochs=3, shuffle=False, verbose=0)
        return model

    single = train(tf.distribute.get_strategy())
    mirrored = train(tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]))
    for a, b in zip(single.get_weights(), mirrored.get_weights()):
        np.testing.assert_allclose(a, b, atol=1e-5)
    opt = mirrored.optimizer
    assert int(opt.iterations.numpy()) == 12
    for var in opt.variables:
        values = getattr(getattr(var, "value", var), "values", None)
        if values is not None and len(values) == 2:
            np.testing.assert_array_equal(values[0].numpy(),
                                          values[1].numpy())
    print("OK")
""")


def test_adamax_under_mirrored_strategy_matches_single_device():
    """Two logical CPUs need a fresh process (set before TF initialises)."""
    env = {**os.environ, "PYTHONPATH": REPO_ROOT, "TF_CPP_MIN_LOG_LEVEL": "2",
           "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run([sys.executable, "-c", _MIRRORED_SCRIPT],
                            capture_output=True, text=True, env=env,
                            timeout=180, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("OK")


# ---------------------------------------------------- WarmupCosineSchedule

# CIFAR-10-like: 195 iterations per epoch, 400 epochs, 5 warm-up epochs.
CIFAR = dict(learning_rate=1e-2, learning_rate_min=1e-4, steps_per_epoch=195,
             epochs=400, warmup_epochs=5)


def _official_lr_per_step(learning_rate, learning_rate_min, steps_per_epoch,
                          epochs, warmup_epochs):
    """Simulates the official loop with PyTorch's recursive CosineAnnealingLR.

    The scheduler is built on the optimizer at `learning_rate` (its base LR);
    warm-up overwrites the LR each iteration gs < W; the scheduler is stepped
    at the start of each epoch e > warmup_epochs, with the chainable
    (recursive) form of `CosineAnnealingLR.get_lr`, from the current LR.
    """
    t_max = epochs - warmup_epochs - 1
    warmup_steps = warmup_epochs * steps_per_epoch
    base_lr, eta_min = learning_rate, learning_rate_min
    lr, last_epoch, out = learning_rate, 0, []
    for epoch in range(epochs):
        if epoch > warmup_epochs:
            last_epoch += 1
            if (last_epoch - 1 - t_max) % (2 * t_max) == 0:
                lr = lr + (base_lr - eta_min) * (
                    1 - math.cos(math.pi / t_max)) / 2
            else:
                lr = ((1 + math.cos(math.pi * last_epoch / t_max))
                      / (1 + math.cos(math.pi * (last_epoch - 1) / t_max))
                      * (lr - eta_min) + eta_min)
        for i in range(steps_per_epoch):
            gs = epoch * steps_per_epoch + i
            if gs < warmup_steps:
                lr = learning_rate * gs / warmup_steps
            out.append(lr)
    return np.array(out)


def _lr(schedule, step):
    return float(schedule(tf.constant(step, tf.int64)))


def test_schedule_cifar_key_values():
    s = WarmupCosineSchedule(**CIFAR, dtype="float64")
    w = 5 * 195
    last_warmup = 1e-2 * (w - 1) / w
    assert _lr(s, 0) == 0.0
    assert _lr(s, 1) == pytest.approx(1e-2 / w, rel=1e-12)
    assert _lr(s, w - 1) == pytest.approx(last_warmup, rel=1e-12)
    assert _lr(s, w) == pytest.approx(last_warmup, rel=1e-12)  # epoch 5
    assert _lr(s, 6 * 195 - 1) == pytest.approx(last_warmup, rel=1e-12)
    first_cosine = 1e-4 + (last_warmup - 1e-4) * (
        1 + math.cos(math.pi / 394)) / 2
    assert _lr(s, 6 * 195) == pytest.approx(first_cosine, rel=1e-12)
    assert _lr(s, 7 * 195 - 1) == pytest.approx(first_cosine, rel=1e-12)
    assert _lr(s, 399 * 195) == 1e-4                     # last epoch
    assert _lr(s, 400 * 195 - 1) == 1e-4
    assert _lr(s, 450 * 195) == 1e-4                     # past the end


def test_schedule_matches_recursive_pytorch_scheduler_everywhere():
    """float64 mode: every step of the run within 1e-9 relative.

    The default float32 output agrees to float32 rounding (rtol 1e-6).
    """
    expected = _official_lr_per_step(**CIFAR)
    steps = tf.range(len(expected), dtype=tf.int64)
    exact = WarmupCosineSchedule(**CIFAR, dtype="float64")(steps).numpy()
    np.testing.assert_allclose(exact, expected, rtol=1e-9, atol=0)
    starts = exact[::195]
    assert len(starts) == 400 and starts[-1] == 1e-4
    single = WarmupCosineSchedule(**CIFAR)(steps)
    assert single.dtype == tf.float32
    np.testing.assert_allclose(single.numpy(), expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("settings", [
    dict(steps_per_epoch=7, epochs=10, warmup_epochs=0),   # no warm-up
    dict(steps_per_epoch=3, epochs=12, warmup_epochs=1),   # ImageNet-32-like
    dict(steps_per_epoch=1, epochs=6, warmup_epochs=2),    # W = 2
])
def test_schedule_other_settings_match_recursion(settings):
    args = dict(learning_rate=8e-3, learning_rate_min=1e-4, **settings)
    expected = _official_lr_per_step(**args)
    steps = tf.range(len(expected), dtype=tf.int64)
    got = WarmupCosineSchedule(**args, dtype="float64")(steps).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-18)


@pytest.mark.parametrize("epochs, warmup_epochs", [(1, 0), (6, 5), (3, 5)])
def test_schedule_without_cosine_part_is_finite(epochs, warmup_epochs):
    # T_max = epochs - warmup_epochs - 1 <= 0: no epoch reaches the cosine.
    args = dict(learning_rate=1e-2, learning_rate_min=1e-4, steps_per_epoch=4,
                epochs=epochs, warmup_epochs=warmup_epochs)
    s = WarmupCosineSchedule(**args, dtype="float64")
    values = s(tf.range(4 * (epochs + 2), dtype=tf.int64)).numpy()
    assert np.all(np.isfinite(values))
    np.testing.assert_allclose(values[:4 * epochs],
                               _official_lr_per_step(**args), rtol=1e-12)
    assert values[-1] == pytest.approx(s.last_warmup_learning_rate, rel=1e-12)


def test_schedule_lr_scale_without_retracing():
    s = WarmupCosineSchedule(**CIFAR)
    fn = tf.function(lambda step: s(step))
    step = tf.constant(3000, tf.int64)
    before = float(fn(step))
    s.scale_by(0.5)
    assert float(fn(step)) == pytest.approx(before / 2, rel=1e-6)
    s.lr_scale.assign(0.1)
    assert float(fn(step)) == pytest.approx(before / 10, rel=1e-6)
    assert fn.experimental_get_tracing_count() == 1
    assert s.get_config()["lr_scale"] == pytest.approx(0.1)
    opt = Adamax(s)
    assert float(opt.learning_rate) == 0.0  # iterations = 0


def test_schedule_config_round_trip():
    s = WarmupCosineSchedule(**CIFAR, lr_scale=0.5)
    clone = WarmupCosineSchedule.from_config(s.get_config())
    assert clone.get_config() == s.get_config()
    again = keras.saving.deserialize_keras_object(
        keras.saving.serialize_keras_object(s))
    assert isinstance(again, WarmupCosineSchedule)
    assert _lr(again, 10000) == _lr(s, 10000)


@pytest.mark.parametrize("change, name", [
    (dict(learning_rate=-1.0), "learning_rate"),
    (dict(learning_rate_min=float("nan")), "learning_rate_min"),
    (dict(steps_per_epoch=0), "steps_per_epoch"),
    (dict(epochs=0), "epochs"),
    (dict(warmup_epochs=-1), "warmup_epochs"),
    (dict(warmup_epochs=1.5), "warmup_epochs"),
    (dict(lr_scale=-0.5), "lr_scale"),
    (dict(dtype="float16"), "dtype"),
])
def test_schedule_errors(change, name):
    with pytest.raises(ValueError, match=f"`{name}`"):
        WarmupCosineSchedule(**{**CIFAR, **change})
