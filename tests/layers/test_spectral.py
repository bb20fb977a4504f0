"""Tests of nvae_tf.layers.spectral: power iteration against NumPy's SVD."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf

from nvae_tf.layers import spectral
from nvae_tf.layers.spectral import SpectralRegularizer

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))

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


def test_spectral_regularizer_transposed_matrices_same_value_state_grads():
    results = []
    for transposed in (False, True):
        layer = SpectralRegularizer(seed=5)
        layer.build(SHAPES)
        mats = [tf.Variable(m.T if transposed else m)
                for m in _matrices(3)]
        for _ in range(2):  # the first call (40 iterations) and a later one
            with tf.GradientTape() as tape:
                value = layer(mats, transposed=transposed)
        grads = tape.gradient(value, mats)
        results.append((float(value),
                        [w.numpy() for w in layer.non_trainable_weights],
                        [g.numpy().T if transposed else g.numpy()
                         for g in grads]))
    (value, state, grads), (value_t, state_t, grads_t) = results
    assert value_t == pytest.approx(value, rel=1e-6)
    for a, b in zip(state + grads, state_t + grads_t):
        np.testing.assert_allclose(b, a, atol=1e-6)
    # The state is the one of the untransposed matrices: u [rows], v [cols].
    assert [s.shape for s in state_t[:2]] == [(3, 8), (3, 18)]


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
    assert spectral.FIRST_CALL_ITERATION_MULTIPLIER == 10
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
    from nvae_tf.layers.spectral import SpectralRegularizer

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
