"""BatchNorm with PyTorch statistics conventions, against NumPy."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf

from nvae_tf.layers.norm import BatchNorm
from tests.conftest import (batchnorm_reference, randomize_weights,
                            rebuild_from_config, swish)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))


def _input(shape=(4, 3, 3, 5), seed=0):
    rng = np.random.default_rng(seed)
    # Channel-dependent offsets and scales, so statistics are not ~(0, 1).
    return (rng.normal(size=shape) * np.arange(1, shape[-1] + 1) +
            np.linspace(-2, 3, shape[-1])).astype(np.float32)


def _built(shape=(4, 3, 3, 5), **kwargs):
    bn = BatchNorm(**kwargs)
    bn.build(shape)
    randomize_weights(bn, seed=1)
    bn.moving_mean.assign(np.zeros(shape[-1], np.float32))
    bn.moving_variance.assign(np.ones(shape[-1], np.float32))
    return bn


@pytest.mark.parametrize("activation", [None, "swish"])
def test_training_output_uses_biased_batch_variance(activation, regime):
    bn = _built(activation=activation)
    x = _input()
    y = regime(lambda t: bn(t, training=True), tf.constant(x))
    expected = batchnorm_reference(x, np.asarray(bn.gamma),
                                   np.asarray(bn.beta))
    if activation == "swish":
        expected = swish(expected)
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-5)
    # Normalising with the unbiased variance (36 values/channel) would be
    # off by a factor sqrt(36/35) on the centred values.
    unbiased = (x - x.mean((0, 1, 2))) / np.sqrt(
        x.var((0, 1, 2), ddof=1) + 1e-5) * np.asarray(bn.gamma) + \
        np.asarray(bn.beta)
    if activation is None:
        assert np.abs(np.asarray(y) - unbiased).max() > 1e-3


def test_moving_statistics_pytorch_momentum_and_unbiased_variance(regime):
    bn = _built()
    x = _input()
    regime(lambda t: bn(t, training=True), tf.constant(x))
    mean = x.astype(np.float64).mean((0, 1, 2))
    unbiased = x.astype(np.float64).var((0, 1, 2), ddof=1)
    # PyTorch: running = (1 - 0.05) running + 0.05 batch_stat.
    np.testing.assert_allclose(bn.moving_mean, 0.05 * mean, rtol=1e-5,
                               atol=1e-7)
    np.testing.assert_allclose(bn.moving_variance, 0.95 + 0.05 * unbiased,
                               rtol=1e-5)
    biased = x.astype(np.float64).var((0, 1, 2))
    assert np.abs(np.asarray(bn.moving_variance) -
                  (0.95 + 0.05 * biased)).max() > 1e-3
    # A second step continues the exponential average.
    regime(lambda t: bn(t, training=True), tf.constant(2.0 * x))
    np.testing.assert_allclose(
        bn.moving_mean, 0.95 * 0.05 * mean + 0.05 * 2 * mean, rtol=1e-5,
        atol=1e-7)
    np.testing.assert_allclose(
        bn.moving_variance,
        0.95 * (0.95 + 0.05 * unbiased) + 0.05 * 4 * unbiased, rtol=1e-5)


@pytest.mark.parametrize("activation", [None, "swish"])
def test_inference_uses_moving_statistics(activation, regime):
    bn = _built(activation=activation)
    moving_mean = np.array([0.5, -1.0, 2.0, 0.0, 1.5], np.float32)
    moving_var = np.array([2.0, 0.5, 1.0, 3.0, 0.25], np.float32)
    bn.moving_mean.assign(moving_mean)
    bn.moving_variance.assign(moving_var)
    x = _input()
    for training in (False, None):
        y = regime(lambda t: bn(t, training=training), tf.constant(x))
        expected = batchnorm_reference(x, np.asarray(bn.gamma),
                                       np.asarray(bn.beta), moving_mean,
                                       moving_var)
        if activation == "swish":
            expected = swish(expected)
        np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-5)
    # Inference does not touch the statistics.
    np.testing.assert_array_equal(bn.moving_mean, moving_mean)
    np.testing.assert_array_equal(bn.moving_variance, moving_var)


def test_gradients_reach_gamma_and_beta():
    bn = _built(activation="swish")
    x = tf.constant(_input())
    with tf.GradientTape() as tape:
        y = tf.reduce_sum(bn(x, training=True) ** 2)
    grads = tape.gradient(y, [bn.gamma, bn.beta])
    assert all(g is not None and np.abs(np.asarray(g)).max() > 0
               for g in grads)
    assert [w.path.split("/")[-1] for w in bn.trainable_weights] == \
        ["gamma", "beta"]
    assert len(bn.non_trainable_weights) == 2


@pytest.mark.parametrize("shape", [(4, 3, 3, 5), (2, 8, 6, 3)])
def test_fused_swish_gradients_equal_bn_then_swish(shape, regime):
    """Training-mode BN-Swish recomputes BN(x) in its backward pass instead
    of keeping it: output, statistics and the gradients of x, gamma and
    beta are those of the plain ops."""
    bn = _built(shape, activation="swish")
    x = tf.constant(_input(shape, seed=2))
    d_out = tf.constant(_input(shape, seed=3))

    def grads(layer_call):
        def run(x):
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = layer_call(x)
            return [y] + tape.gradient(y, [x, bn.gamma, bn.beta], d_out)
        return regime(run, x)

    def plain(x):
        y, _, _ = tf.compat.v1.nn.fused_batch_norm(
            x, bn.gamma, bn.beta, epsilon=bn.epsilon, is_training=True)
        return tf.nn.silu(y)

    mean, variance = bn.moving_mean.numpy(), bn.moving_variance.numpy()
    fused = grads(lambda x: bn(x, training=True))
    for name, a, b in zip(("output", "d_x", "d_gamma", "d_beta"), fused,
                          grads(plain)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=name)
    # Moving statistics updated once per call, from the batch moments.
    values = np.asarray(x).reshape(-1, shape[-1])
    np.testing.assert_allclose(
        bn.moving_mean, mean * bn.momentum + (1 - bn.momentum) *
        values.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        bn.moving_variance, variance * bn.momentum + (1 - bn.momentum) *
        values.var(0, ddof=1), rtol=1e-5, atol=1e-6)


def test_fused_swish_recomputes_only_in_the_backward_pass():
    """The recomputed BN(x) waits for the upstream gradient: otherwise the
    executor would compute it during the forward pass and keep it alive,
    which is the memory the recomputation is meant to save."""
    bn = _built(activation="swish")
    x = tf.constant(_input())

    @tf.function
    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = bn(x, training=True)
        return tape.gradient(y, x)

    graph = step.get_concrete_function(x).graph
    recomputed = [op for op in graph.get_operations()
                  if op.type == "FusedBatchNormV3"
                  and not op.get_attr("is_training")]
    assert len(recomputed) == 1
    assert recomputed[0].control_inputs


def test_from_config_round_trip():
    bn = _built(activation="swish", synchronized=True, momentum=0.9,
                epsilon=1e-3)
    clone = rebuild_from_config(bn, (4, 3, 3, 5))
    config = clone.get_config()
    assert (config["activation"], config["synchronized"], config["momentum"],
            config["epsilon"]) == ("swish", True, 0.9, 1e-3)
    x = tf.constant(_input())
    np.testing.assert_array_equal(bn(x, training=False),
                                  clone(x, training=False))
    np.testing.assert_array_equal(bn(x, training=True),
                                  clone(x, training=True))


def test_defaults_are_official():
    bn = BatchNorm()
    assert bn.momentum == 0.95 and bn.epsilon == 1e-5
    bn.build((None, 2, 2, 3))
    np.testing.assert_array_equal(bn.gamma, np.ones(3))
    np.testing.assert_array_equal(bn.beta, np.zeros(3))


def test_mixed_float16_keeps_statistics_in_float32():
    bn = BatchNorm(activation="swish", dtype="mixed_float16")
    bn.build((4, 3, 3, 5))
    x = _input()
    y = bn(tf.constant(x, tf.float16), training=True)
    assert y.dtype == tf.float16
    assert bn.moving_variance.dtype == "float32"
    np.testing.assert_allclose(np.asarray(y, np.float32), swish(
        batchnorm_reference(x, 1.0, 0.0)), atol=1e-2)


@pytest.mark.parametrize("kwargs, message", [
    (dict(activation="relu"), "activation='relu'"),
    (dict(momentum=1.0), "momentum=1.0"),
    (dict(momentum=-0.1), "momentum=-0.1"),
])
def test_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BatchNorm(**kwargs)


# The strategy needs two logical CPUs, which must be configured before
# TensorFlow initialises: run in a fresh interpreter.
_MIRRORED_SCRIPT = textwrap.dedent("""
    import json
    import numpy as np
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    from nvae_tf.layers.norm import BatchNorm

    rng = np.random.default_rng(0)
    x = (rng.normal(size=(4, 3, 3, 5)) * np.arange(1, 6) +
         np.arange(5)).astype(np.float32)
    # Replica 0 gets images 0-1, replica 1 images 2-3, with different stats.
    x[2:] = 3.0 * x[2:] - 1.0
    gamma = rng.uniform(0.5, 1.5, 5).astype(np.float32)
    beta = rng.uniform(-1, 1, 5).astype(np.float32)
    result = {}

    single = BatchNorm(activation="swish")
    single.build(x.shape)
    single.gamma.assign(gamma)
    single.beta.assign(beta)
    result["single"] = single(x, training=True).numpy().tolist()
    result["single_mean"] = single.moving_mean.numpy().tolist()
    result["single_var"] = single.moving_variance.numpy().tolist()

    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    for synchronized in (True, False):
        with strategy.scope():
            bn = BatchNorm(activation="swish", synchronized=synchronized)
            bn.build((None, 3, 3, 5))
            bn.gamma.assign(gamma)
            bn.beta.assign(beta)
        shards = strategy.experimental_distribute_values_from_function(
            lambda ctx: x[2 * ctx.replica_id_in_sync_group:
                          2 * ctx.replica_id_in_sync_group + 2])

        @tf.function
        def step(batch):
            return strategy.run(lambda b: bn(b, training=True), (batch,))

        out = strategy.experimental_local_results(step(shards))
        key = "sync" if synchronized else "local"
        result[key] = np.concatenate([o.numpy() for o in out]).tolist()
        result[key + "_mean"] = bn.moving_mean.numpy().tolist()
        result[key + "_var"] = bn.moving_variance.numpy().tolist()
        result[key + "_replicas"] = strategy.num_replicas_in_sync
    print("RESULT" + json.dumps(result))
""")


def test_synchronized_batchnorm_under_mirrored_strategy_matches_one_device():
    env = dict(os.environ, PYTHONPATH=REPO_ROOT, TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run([sys.executable, "-c", _MIRRORED_SCRIPT],
                          capture_output=True, text=True, env=env,
                          timeout=240, cwd=REPO_ROOT)
    lines = [line for line in proc.stdout.splitlines()
             if line.startswith("RESULT")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    r = {k: np.asarray(v) for k, v in json.loads(lines[-1][6:]).items()}
    assert r["sync_replicas"] == 2
    # Synchronized: statistics over the global batch of 4 = one device.
    np.testing.assert_allclose(r["sync"], r["single"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(r["sync_mean"], r["single_mean"], rtol=1e-5,
                               atol=1e-6)
    np.testing.assert_allclose(r["sync_var"], r["single_var"], rtol=1e-5)
    # Per-replica statistics differ (the shards were made to differ).
    assert np.abs(r["local"] - r["single"]).max() > 1e-2
