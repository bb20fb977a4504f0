"""Tests of nvae_tf.objectives: hand-worked values, NumPy references."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf

from nvae_tf import objectives
from nvae_tf.objectives import (
    SpectralRegularizer, balanced_kl, batchnorm_regularization, kl_coeff,
    kl_balancing_alpha, weight_decay_norm_coeff)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------- kl_coeff

@pytest.mark.parametrize("step, expected", [
    (0, 1e-4),          # (0 - 1) / 3000 < 0 -> floor
    (1, 1e-4),          # end of the constant part: ramp = 0 -> floor
    (301, 0.1),         # (301 - 1) / 3000
    (1501, 0.5),
    (3001, 1.0),        # end of the anneal
    (9999, 1.0),
])
def test_kl_coeff_defaults(step, expected):
    # N = 10000: constant for 1e-4 * N = 1 step, anneal over 0.3 * N = 3000.
    assert float(kl_coeff(step, 10000)) == pytest.approx(expected, rel=1e-6)
    as_int64 = kl_coeff(tf.constant(step, tf.int64), tf.constant(10000))
    assert as_int64.dtype == tf.float32
    assert float(as_int64) == pytest.approx(expected, rel=1e-6)


def test_kl_coeff_custom_portions_in_tf_function():
    fn = tf.function(lambda s: kl_coeff(s, 100, kl_anneal_portion=0.5,
                                        kl_const_portion=0.1,
                                        kl_const_coeff=0.01))
    # (step - 10) / 50, floored at 0.01, capped at 1.
    for step, expected in [(0, 0.01), (10, 0.01), (20, 0.2), (35, 0.5),
                           (60, 1.0), (90, 1.0)]:
        assert float(fn(tf.constant(step, tf.int64))) == pytest.approx(
            expected, rel=1e-6)


@pytest.mark.parametrize("kwargs, name", [
    (dict(total_steps=0), "total_steps"),
    (dict(total_steps=10, kl_anneal_portion=0.0), "kl_anneal_portion"),
])
def test_kl_coeff_errors(kwargs, name):
    with pytest.raises(ValueError, match=name):
        kl_coeff(0, **kwargs)


# ------------------------------------------------------ kl_balancing_alpha

@pytest.mark.parametrize("groups, expected", [
    ((5, 10), [1] * 5 + [2] * 10),                              # MNIST
    ((5, 10, 20), [1] * 5 + [2] * 10 + [4] * 20),               # CelebA-64
    ((4, 4, 4, 8, 16),                                          # CelebA-HQ
     [1] * 4 + [4] * 4 + [16] * 4 + [32] * 8 + [64] * 16),
    ((10,), [1] * 10),                                          # one scale
    ((1,), [1]),
])
def test_kl_balancing_alpha(groups, expected):
    alpha = kl_balancing_alpha(groups)
    assert alpha.dtype == np.float32
    np.testing.assert_array_equal(alpha, np.array(expected, np.float32))


def test_kl_balancing_alpha_errors():
    for bad in ((), (3, 0)):
        with pytest.raises(ValueError, match="groups_per_decoder_scale"):
            kl_balancing_alpha(bad)


# ------------------------------------------------------------- balanced_kl

def _two_group_kl():
    return [tf.constant([1.0, 3.0]), tf.constant([-2.0, 6.0])]


def test_balanced_kl_hand_worked_two_groups():
    kl = _two_group_kl()
    alpha = np.array([1.0, 2.0], np.float32)
    kl_term, gamma, kl_means = balanced_kl(kl, 0.5, alpha)
    # a_0 = (mean|KL_0| + 0.01) / 1 = 2.01; a_1 = (4 + 0.01) / 2 = 2.005.
    a = np.array([2.01, 2.005])
    expected_gamma = a / a.mean()
    np.testing.assert_allclose(gamma, expected_gamma, rtol=1e-6)
    np.testing.assert_allclose(kl_means, [2.0, 2.0], rtol=1e-6)
    expected_term = 0.5 * (expected_gamma[0] * np.array([1.0, 3.0])
                           + expected_gamma[1] * np.array([-2.0, 6.0]))
    np.testing.assert_allclose(kl_term, expected_term, rtol=1e-6)


def test_balanced_kl_gamma_has_mean_one():
    rng = np.random.default_rng(0)
    kl = [tf.constant(rng.gamma(2.0, s, size=8).astype(np.float32))
          for s in (0.1, 5.0, 20.0, 1.0, 3.0)]
    _, gamma, _ = balanced_kl(kl, 0.2, kl_balancing_alpha((2, 3)))
    assert float(tf.reduce_mean(gamma)) == pytest.approx(1.0, abs=1e-6)
    assert not np.allclose(gamma, 1.0)


def test_balanced_kl_gamma_is_stop_gradient():
    kl = _two_group_kl()
    alpha = tf.constant([1.0, 2.0])
    with tf.GradientTape() as tape:
        for k in kl:
            tape.watch(k)
        kl_term, gamma, _ = balanced_kl(kl, 0.25, alpha)
        total = tf.reduce_sum(kl_term)
    grads = tape.gradient(total, kl)
    for k, grad in enumerate(grads):
        np.testing.assert_allclose(grad, [0.25 * gamma[k]] * 2, rtol=1e-6)


@pytest.mark.parametrize("beta", [1.0, 1.5])
def test_balanced_kl_off_after_warmup(beta):
    kl_term, gamma, kl_means = balanced_kl(
        _two_group_kl(), beta, tf.constant([1.0, 2.0]))
    np.testing.assert_array_equal(gamma, [1.0, 1.0])
    np.testing.assert_allclose(kl_term, beta * np.array([-1.0, 9.0]),
                               rtol=1e-6)
    np.testing.assert_allclose(kl_means, [2.0, 2.0])


def test_balanced_kl_in_tf_function_with_tensor_beta():
    alpha = tf.constant([1.0, 2.0])
    fn = tf.function(lambda kl, beta: balanced_kl(kl, beta, alpha))
    kl = _two_group_kl()
    warm, gamma_warm, _ = fn(kl, tf.constant(0.5))
    done, gamma_done, _ = fn(kl, tf.constant(1.0))
    eager, _, _ = balanced_kl(kl, 0.5, alpha)
    np.testing.assert_allclose(warm, eager, rtol=1e-6)
    assert not np.allclose(gamma_warm, 1.0)
    np.testing.assert_allclose(done, [-1.0, 9.0], rtol=1e-6)
    np.testing.assert_array_equal(gamma_done, [1.0, 1.0])
    # One trace serves both regimes: no python branching on beta.
    assert fn.experimental_get_tracing_count() == 1


# ------------------------------------------------ weight_decay_norm_coeff

def test_weight_decay_norm_coeff_anneal_is_geometric():
    def lam(beta):
        return float(weight_decay_norm_coeff(beta, 1e-2, 1.0, anneal=True))
    assert lam(0.0) == pytest.approx(1.0, rel=1e-6)
    assert lam(1.0) == pytest.approx(1e-2, rel=1e-6)
    assert lam(0.5) == pytest.approx(1e-1, rel=1e-6)  # sqrt(1 * 1e-2)
    assert lam(tf.constant(0.25)) == pytest.approx(10 ** -0.5, rel=1e-6)


def test_weight_decay_norm_coeff_constant_without_anneal():
    value = weight_decay_norm_coeff(0.3, 1e-1, weight_decay_norm_init=10.)
    assert value.dtype == tf.float32
    assert float(value) == pytest.approx(1e-1, rel=1e-7)
    assert float(weight_decay_norm_coeff(0.3, 0.0)) == 0.0  # official default


@pytest.mark.parametrize("args, name", [
    ((0.0, 1.0, True), "weight_decay_norm"),
    ((1e-2, 0.0, True), "weight_decay_norm_init"),
    ((-1.0, 1.0, False), "weight_decay_norm"),
])
def test_weight_decay_norm_coeff_errors(args, name):
    with pytest.raises(ValueError, match=f"`{name}`"):
        weight_decay_norm_coeff(0.5, *args[:2], anneal=args[2])


def test_batchnorm_regularization():
    gammas = [tf.constant([1.0, -3.0, 2.0]), tf.constant([0.5])]
    assert float(batchnorm_regularization(gammas)) == pytest.approx(3.5)
    assert float(batchnorm_regularization([tf.ones([4])] * 7)) == 7.0
    assert float(batchnorm_regularization([])) == 0.0


# ------------------------------------------------------ SpectralRegularizer

SHAPES = [(8, 18), (16, 9), (8, 18), (8, 18)]  # a bucket of 3 and one of 1


def _matrices(seed=0, shapes=SHAPES):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=s).astype(np.float32) for s in shapes]


def _np_power_iteration(w, u, v, iterations):
    """Reference power iteration in float64 for one matrix."""
    def normalize(x):
        return x / max(np.linalg.norm(x), 1e-3)
    u, v = u.astype(np.float64), v.astype(np.float64)
    for _ in range(iterations):
        v = normalize(w.T @ u)
        u = normalize(w @ v)
    return u, v


def _state(layer, matrix_index):
    """(u, v) stored for matrix `matrix_index` of SHAPES."""
    bucket, row = {0: (0, 0), 2: (0, 1), 3: (0, 2), 1: (1, 0)}[matrix_index]
    return (layer._u[bucket].numpy()[row], layer._v[bucket].numpy()[row])


def _top_singular_value(w):
    return np.linalg.svd(w, compute_uv=False)[0]


@pytest.mark.parametrize("compiled", [False, True])
def test_spectral_regularizer_first_and_later_calls(compiled):
    layer = SpectralRegularizer(seed=3)
    layer.build(SHAPES)
    assert [tuple(w.shape) for w in layer.non_trainable_weights] == [
        (3, 8), (3, 18), (1, 16), (1, 9), ()]
    call = tf.function(layer.__call__) if compiled else layer.__call__
    mats = _matrices(0)
    init = [_state(layer, i) for i in range(4)]

    value = call([tf.constant(m) for m in mats])
    assert int(layer.initialized.numpy()) == 1
    sigmas = []
    for i, w in enumerate(mats):
        u, v = _state(layer, i)
        u0, v0 = init[i]
        ref_u, ref_v = _np_power_iteration(
            w, u0 / np.linalg.norm(u0), v0 / np.linalg.norm(v0), 40)
        np.testing.assert_allclose(u, ref_u, atol=1e-5)
        np.testing.assert_allclose(v, ref_v, atol=1e-5)
        sigmas.append(u @ w @ v)
        assert sigmas[-1] == pytest.approx(_top_singular_value(w), rel=1e-3)
    assert float(value) == pytest.approx(sum(sigmas), rel=1e-5)

    # Later call on slightly changed weights: 4 iterations from the state.
    before = [_state(layer, i) for i in range(4)]
    mats2 = [w + 0.05 * n for w, n in zip(mats, _matrices(1))]
    value2 = call([tf.constant(m) for m in mats2])
    total = 0.0
    for i, w in enumerate(mats2):
        u, v = _state(layer, i)
        assert not np.allclose(u, before[i][0])
        ref_u, ref_v = _np_power_iteration(w, *before[i], 4)
        np.testing.assert_allclose(u, ref_u, atol=1e-5)
        np.testing.assert_allclose(v, ref_v, atol=1e-5)
        assert u @ w @ v == pytest.approx(_top_singular_value(w), rel=1e-3)
        total += _top_singular_value(w)
    assert float(value2) == pytest.approx(total, rel=1e-3)


def test_spectral_regularizer_gradient_is_u_v_transpose():
    layer = SpectralRegularizer(seed=0)
    mats = [tf.Variable(m) for m in _matrices(2)]
    with tf.GradientTape() as tape:
        value = layer(mats)
    grads = tape.gradient(value, mats)
    for i, grad in enumerate(grads):
        u, v = _state(layer, i)
        np.testing.assert_allclose(grad, np.outer(u, v), atol=1e-6)


def test_spectral_regularizer_update_state_false_keeps_state():
    layer = SpectralRegularizer(seed=0)
    mats = [tf.constant(m) for m in _matrices(0)]
    layer(mats)
    before = [w.numpy().copy() for w in layer.non_trainable_weights]
    value = layer([m * 2.0 + 1.0 for m in mats], update_state=False)
    for w, old in zip(layer.non_trainable_weights, before):
        np.testing.assert_array_equal(w.numpy(), old)
    assert np.isfinite(float(value))


def test_spectral_regularizer_state_variables_are_mean_aggregated():
    layer = SpectralRegularizer()
    layer.build(SHAPES)
    assert not layer.trainable_weights
    for u, v in zip(layer._u, layer._v):
        assert u.aggregation == "mean" and v.aggregation == "mean"
        assert not u.trainable and not v.trainable
    assert layer.initialized.dtype == "int32"


def test_spectral_regularizer_float32_under_mixed_policy():
    layer = SpectralRegularizer(seed=0)
    mats = [tf.constant(m, tf.float16) for m in _matrices(0)]
    value = layer(mats)
    assert value.dtype == tf.float32
    expected = sum(_top_singular_value(m.numpy().astype(np.float32))
                   for m in mats)
    assert float(value) == pytest.approx(expected, rel=1e-3)


def test_spectral_regularizer_config_round_trip_and_errors():
    layer = SpectralRegularizer(num_power_iterations=2, seed=7, name="sr")
    clone = SpectralRegularizer.from_config(layer.get_config())
    assert clone.num_power_iterations == 2 and clone.seed == 7
    assert clone.name == "sr"
    assert objectives.FIRST_CALL_ITERATION_MULTIPLIER == 10
    with pytest.raises(ValueError, match="num_power_iterations"):
        SpectralRegularizer(num_power_iterations=0)
    with pytest.raises(ValueError, match="2-D"):
        SpectralRegularizer().build([(2, 3, 4)])
    layer.build(SHAPES)
    with pytest.raises(ValueError, match="Expected 4 matrices"):
        layer([tf.zeros(s) for s in SHAPES[:2]])


_MIRRORED_SCRIPT = textwrap.dedent("""
    import numpy as np
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    from nvae_tf.objectives import SpectralRegularizer

    shapes = [(8, 18), (16, 9), (8, 18)]
    rng = np.random.default_rng(0)
    mats = [rng.normal(size=s).astype(np.float32) for s in shapes]
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        layer = SpectralRegularizer(seed=1)
        layer.build(shapes)
        weights = [tf.Variable(m) for m in mats]

    @tf.function
    def step():
        return strategy.run(lambda: layer([w * 1.0 for w in weights]))

    for _ in range(2):
        values = strategy.experimental_local_results(step())
    assert abs(float(values[0]) - float(values[1])) < 1e-6, values
    for var in layer.non_trainable_weights:
        copies = [c.numpy() for c in var.value.values]
        assert len(copies) == 2
        np.testing.assert_array_equal(copies[0], copies[1])
    assert int(layer.initialized.numpy()) == 1
    expected = sum(np.linalg.svd(m, compute_uv=False)[0] for m in mats)
    assert abs(float(values[0]) - expected) < 1e-3 * expected
    print("OK")
""")


def test_spectral_regularizer_state_identical_across_replicas():
    """Two logical CPUs need a fresh process (set before TF initialises)."""
    env = {**os.environ, "PYTHONPATH": REPO_ROOT, "TF_CPP_MIN_LOG_LEVEL": "2",
           "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run([sys.executable, "-c", _MIRRORED_SCRIPT],
                            capture_output=True, text=True, env=env,
                            timeout=120, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("OK")
