"""SqueezeExcite, InvertedResidual and the two skip paths vs NumPy."""

import numpy as np
import pytest
import tensorflow as tf

from nvae_tf.layers.blocks import (FactorizedReduce, InvertedResidual,
                                   SqueezeExcite, UpsampleSkip,
                                   resize_bilinear_align_corners)
from tests.conftest import (batchnorm_reference, conv2d_reference,
                            conv_layer_reference, effective_kernel,
                            randomize_weights, rebuild_from_config, swish)


def _input(shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


# ----------------------------------------------------------- SqueezeExcite

@pytest.mark.parametrize("channels, hidden", [(8, 4), (64, 4), (128, 8)])
def test_squeeze_excite_hidden_width(channels, hidden):
    se = SqueezeExcite()
    se.build((None, 2, 2, channels))
    assert se.squeeze.kernel.shape == (channels, hidden)
    assert se.excite.kernel.shape == (hidden, channels)
    # PyTorch Linear init: U(+-1/sqrt(fan_in)) for weights and biases.
    assert np.abs(np.asarray(se.squeeze.kernel)).max() <= channels ** -0.5
    assert np.abs(np.asarray(se.excite.bias)).max() <= hidden ** -0.5
    assert np.abs(np.asarray(se.excite.bias)).max() > 0


def test_squeeze_excite_numpy_reference(regime):
    se = SqueezeExcite()
    shape = (2, 3, 3, 8)
    se.build(shape)
    randomize_weights(se)
    x = _input(shape)
    y = regime(se, tf.constant(x))
    assert y.shape == shape == tuple(se.compute_output_shape(shape))
    w1, b1 = np.asarray(se.squeeze.kernel), np.asarray(se.squeeze.bias)
    w2, b2 = np.asarray(se.excite.kernel), np.asarray(se.excite.bias)
    pooled = x.mean(axis=(1, 2))
    gate = _sigmoid(np.maximum(pooled @ w1 + b1, 0.0) @ w2 + b2)
    np.testing.assert_allclose(y, x * gate[:, None, None, :], rtol=1e-5,
                               atol=1e-6)
    clone = rebuild_from_config(se, shape)
    np.testing.assert_array_equal(se(x), clone(x))


# -------------------------------------------------------- InvertedResidual

def _inverted_residual_reference(layer, x, upsample):
    """Eval-mode NumPy InvertedResidual (moving statistics)."""
    def bn(h, bn_layer):
        return batchnorm_reference(h, np.asarray(bn_layer.gamma),
                                   np.asarray(bn_layer.beta),
                                   np.asarray(bn_layer.moving_mean),
                                   np.asarray(bn_layer.moving_variance))

    h = np.asarray(x, np.float64)
    if upsample:
        h = h.repeat(2, axis=1).repeat(2, axis=2)
    h = bn(h, layer.bn_in)  # plain BN, no activation
    h = swish(bn(conv_layer_reference(layer.expand.conv, h),
                 layer.expand.bn))
    h = swish(bn(conv_layer_reference(layer.depthwise.conv, h),
                 layer.depthwise.bn))
    return bn(conv_layer_reference(layer.project, h), layer.bn_out)


@pytest.mark.parametrize("strides, upsample, expansion, out_shape", [
    (1, False, 6, (2, 4, 4, 4)),
    (2, False, 3, (2, 2, 2, 6)),
    (1, True, 3, (2, 8, 8, 2)),
])
def test_inverted_residual(strides, upsample, expansion, out_shape, regime):
    shape = (2, 4, 4, 4)
    layer = InvertedResidual(out_shape[-1], strides=strides,
                             expansion=expansion, kernel_size=5,
                             upsample=upsample)
    layer.build(shape)
    randomize_weights(layer)
    hidden = 4 * expansion  # round(C_in * ex), from C_in before upsampling
    assert layer.expand.conv.kernel.shape == (1, 1, 4, hidden)
    assert layer.depthwise.conv.kernel.shape == (5, 5, hidden, 1)
    assert layer.depthwise.conv.depthwise
    assert layer.depthwise.conv.strides == strides
    assert layer.project.kernel.shape == (1, 1, hidden, out_shape[-1])
    # No weight norm and no bias anywhere in the block (official).
    for conv in (layer.expand.conv, layer.depthwise.conv, layer.project):
        assert not conv.weight_norm and not conv.use_bias
    x = _input(shape)
    y = regime(lambda t: layer(t, training=False), tf.constant(x))
    assert tuple(y.shape) == out_shape == tuple(
        layer.compute_output_shape(shape))
    np.testing.assert_allclose(
        y, _inverted_residual_reference(layer, x, upsample), rtol=1e-4,
        atol=1e-4)
    clone = rebuild_from_config(layer, shape)
    np.testing.assert_array_equal(layer(x, training=True),
                                  clone(x, training=True))


def test_inverted_residual_training_mode_uses_batch_statistics():
    layer = InvertedResidual(4, expansion=2)
    layer.build((4, 4, 4, 4))
    x = tf.constant(_input((4, 4, 4, 4)))
    y = np.asarray(layer(x, training=True))
    # The last layer is a plain BN with gamma 1, beta 0: per-channel batch
    # mean 0 and (biased) variance 1.
    np.testing.assert_allclose(y.mean(axis=(0, 1, 2)), 0.0, atol=1e-5)
    np.testing.assert_allclose(y.var(axis=(0, 1, 2)), 1.0, rtol=1e-3)


@pytest.mark.parametrize("kwargs, message", [
    (dict(filters=4, strides=3), "strides=3"),
    (dict(filters=4, strides=-1), "strides=-1"),
    (dict(filters=4, strides=2, upsample=True), "strides=2, upsample=True"),
    (dict(filters=0), "filters=0"),
    (dict(filters=4, expansion=0), "expansion=0"),
    (dict(filters=4, kernel_size=4), "kernel_size=4"),
])
def test_inverted_residual_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        InvertedResidual(**kwargs)


# -------------------------------------------------------- FactorizedReduce

def test_factorized_reduce_is_four_shifted_strided_convs(regime):
    shape = (2, 6, 6, 3)
    layer = FactorizedReduce(10)
    layer.build(shape)
    randomize_weights(layer)
    x = _input(shape)
    y = np.asarray(regime(layer, tf.constant(x)))
    assert y.shape == (2, 3, 3, 10) == tuple(layer.compute_output_shape(
        shape))
    a = swish(x.astype(np.float64))
    # conv_1: a[0::2, 0::2]; conv_2 drops the first row and column;
    # conv_3 drops the first column; conv_4 drops the first row.
    crops = (a[:, 0::2, 0::2], a[:, 1::2, 1::2], a[:, 0::2, 1::2],
             a[:, 1::2, 0::2])
    widths = (2, 2, 2, 4)  # C_out // 4 three times, then the rest
    parts = []
    for conv, crop, width in zip(layer.convs, crops, widths):
        assert conv.kernel.shape == (1, 1, 3, width)
        assert conv.weight_norm and conv.use_bias
        kernel = effective_kernel(conv)[0, 0]  # [in, out]
        parts.append(crop @ kernel + np.asarray(conv.bias))
    np.testing.assert_allclose(y, np.concatenate(parts, axis=-1), rtol=1e-4,
                               atol=1e-5)
    clone = rebuild_from_config(layer, shape)
    np.testing.assert_array_equal(layer(x), clone(x))


def test_factorized_reduce_errors():
    with pytest.raises(ValueError, match="filters=3"):
        FactorizedReduce(3)


# ------------------------------------------------------------ UpsampleSkip

def _bilinear_align_corners(x, out_size):
    """NumPy bilinear resize with align_corners=True (PyTorch semantics)."""
    x = np.asarray(x, np.float64)
    size = x.shape[1]
    coords = np.arange(out_size) * (size - 1) / (out_size - 1)
    low = np.floor(coords).astype(int)
    high = np.minimum(low + 1, size - 1)
    frac = coords - low
    rows = (x[:, low] * (1 - frac)[None, :, None, None] +
            x[:, high] * frac[None, :, None, None])
    return (rows[:, :, low] * (1 - frac)[None, None, :, None] +
            rows[:, :, high] * frac[None, None, :, None])


def test_upsample_skip_bilinear_align_corners(regime):
    shape = (2, 3, 3, 4)
    layer = UpsampleSkip(2)
    layer.build(shape)
    randomize_weights(layer)
    assert not layer.conv.use_bias and layer.conv.weight_norm
    x = _input(shape)
    y = np.asarray(regime(layer, tf.constant(x)))
    assert y.shape == (2, 6, 6, 2) == tuple(layer.compute_output_shape(shape))
    up = _bilinear_align_corners(x, 6)
    # Corners of the up-sampled image are exactly the input corners.
    np.testing.assert_allclose(up[:, [0, -1]][:, :, [0, -1]],
                               x[:, [0, -1]][:, :, [0, -1]], rtol=1e-12)
    expected = conv2d_reference(up, effective_kernel(layer.conv))
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-5)
    # TF's default (half-pixel) bilinear resize gives a different result.
    half_pixel = tf.image.resize(x, (6, 6), method="bilinear")
    other = conv2d_reference(half_pixel, effective_kernel(layer.conv))
    assert np.abs(other - y).max() > 1e-2
    clone = rebuild_from_config(layer, shape)
    np.testing.assert_array_equal(layer(x), clone(x))


@pytest.mark.parametrize("dtype", [tf.float32, tf.float16])
@pytest.mark.parametrize("shape", [(2, 3, 3, 4), (1, 5, 5, 3)])
def test_resize_matches_the_deprecated_align_corners_op(shape, dtype):
    """Same values and gradient as tf.compat.v1's resize_bilinear, which the
    layer used before (it logs a deprecation warning)."""
    x = tf.constant(_input(shape), dtype)
    size = tf.constant(shape[1:3]) * 2
    batch, height, width, channels = shape
    weights = tf.constant(_input((batch, 2 * height, 2 * width, channels),
                                 seed=1))
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        new = resize_bilinear_align_corners(x, size)
        old = tf.compat.v1.image.resize_bilinear(x, size, align_corners=True)
        new_sum, old_sum = (tf.reduce_sum(new * weights),
                            tf.reduce_sum(old * weights))
    assert new.dtype == old.dtype == tf.float32
    np.testing.assert_array_equal(new.numpy(), old.numpy())
    np.testing.assert_array_equal(tape.gradient(new_sum, x).numpy(),
                                  tape.gradient(old_sum, x).numpy())
    np.testing.assert_allclose(
        new.numpy(), _bilinear_align_corners(x.numpy(), 2 * height),
        rtol=1e-5, atol=1e-6)


def test_upsample_skip_errors():
    with pytest.raises(ValueError, match="filters=0"):
        UpsampleSkip(0)
