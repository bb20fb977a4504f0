"""WeightNormConv2D, ConvBNSwish, BNSwishConv against NumPy references."""

import math

import numpy as np
import pytest
import tensorflow as tf

from nvae_tf.layers.conv import (WEIGHT_NORM_EPS, BNSwishConv, ConvBNSwish,
                                 WeightNormConv2D, upsample_nearest,
                                 weight_normalize)
from tests.conftest import (batchnorm_reference, conv2d_reference,
                            conv_layer_reference, effective_kernel,
                            randomize_weights, rebuild_from_config, swish,
                            weight_norm_reference)


def _input(shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


# ------------------------------------------------------- WeightNormConv2D

@pytest.mark.parametrize("kwargs, in_shape, out_shape", [
    (dict(filters=5, kernel_size=3, padding=1), (2, 8, 8, 3), (2, 8, 8, 5)),
    (dict(filters=5, kernel_size=3, strides=2, padding=1), (2, 8, 8, 3),
     (2, 4, 4, 5)),
    (dict(filters=4, kernel_size=1, strides=2), (1, 8, 8, 3), (1, 4, 4, 4)),
    (dict(filters=4, kernel_size=1, strides=2), (1, 7, 7, 3), (1, 4, 4, 4)),
    (dict(filters=2, kernel_size=3, padding=2, dilation_rate=2),
     (1, 6, 6, 3), (1, 6, 6, 2)),
    (dict(filters=3, kernel_size=5, padding=2, strides=2, depthwise=True),
     (1, 8, 8, 3), (1, 4, 4, 3)),
    (dict(filters=4, kernel_size=3), (1, 6, 6, 3), (1, 4, 4, 4)),
])
def test_weight_norm_conv_shape_and_numpy_reference(kwargs, in_shape,
                                                    out_shape, regime):
    conv = WeightNormConv2D(**kwargs)
    conv.build(in_shape)
    randomize_weights(conv)
    x = _input(in_shape)
    y = regime(conv, tf.constant(x))
    assert tuple(y.shape) == out_shape
    assert tuple(conv.compute_output_shape(in_shape)) == out_shape
    np.testing.assert_allclose(y, conv_layer_reference(conv, x), rtol=1e-4,
                               atol=1e-5)


@pytest.mark.parametrize("depthwise", [False, True])
def test_effective_kernel_is_exp_gain_times_unit_direction(depthwise):
    conv = WeightNormConv2D(4, 3, padding=1, depthwise=depthwise)
    conv.build((None, 5, 5, 4))
    randomize_weights(conv, seed=3)
    v = np.asarray(conv.kernel, np.float64)
    g = np.asarray(conv.log_weight_norm, np.float64)
    # Hand-written per output channel: exp(g_o) v_o / (||v_o|| + 1e-5).
    expected = np.empty_like(v)
    for o in range(4):
        v_o = v[:, :, o, 0] if depthwise else v[:, :, :, o]
        w_o = math.exp(g[o]) * v_o / (np.sqrt((v_o ** 2).sum()) + 1e-5)
        if depthwise:
            expected[:, :, o, 0] = w_o
        else:
            expected[:, :, :, o] = w_o
    np.testing.assert_allclose(effective_kernel(conv), expected, rtol=1e-5)
    np.testing.assert_allclose(expected,
                               weight_norm_reference(v, g, depthwise),
                               rtol=1e-12)
    # The per-output-channel norm of the effective kernel is exp(g) up to
    # the 1e-5 in the denominator.
    axes = (0, 1, 3) if depthwise else (0, 1, 2)
    norms = np.sqrt((effective_kernel(conv) ** 2).sum(axis=axes))
    np.testing.assert_allclose(norms, np.exp(g), rtol=1e-4)


def test_weight_norm_off_uses_raw_kernel():
    conv = WeightNormConv2D(3, 3, padding=1, weight_norm=False,
                            use_bias=False)
    conv.build((None, 4, 4, 2))
    assert not hasattr(conv, "log_weight_norm")
    assert not hasattr(conv, "bias")
    assert [w.path.split("/")[-1] for w in conv.weights] == ["kernel"]
    np.testing.assert_array_equal(conv.effective_kernel(),
                                  np.asarray(conv.kernel))


@pytest.mark.parametrize("cin, cout, k, depthwise, fan_in", [
    (16, 8, 3, False, 144),  # bound 1 / sqrt(144) = 0.0833
    (64, 64, 1, False, 64),
    (32, 32, 5, True, 25),  # depthwise: fan_in = k * k
])
def test_pytorch_default_init_bounds(cin, cout, k, depthwise, fan_in):
    conv = WeightNormConv2D(cout, k, padding=(k - 1) // 2,
                            depthwise=depthwise)
    conv.build((None, 8, 8, cin))
    bound = 1.0 / math.sqrt(fan_in)
    kernel = np.asarray(conv.kernel)
    bias = np.asarray(conv.bias)
    assert np.abs(kernel).max() <= bound
    assert np.abs(kernel).max() > 0.95 * bound  # uniform, not a narrower law
    assert abs(kernel.std() - bound / math.sqrt(3)) < 0.1 * bound
    assert np.abs(bias).max() <= bound
    # log_weight_norm = log(||v|| + 0.01) so that W ~= 1.02 * v at init.
    axes = (0, 1, 3) if depthwise else (0, 1, 2)
    norm = np.sqrt((kernel.astype(np.float64) ** 2).sum(axis=axes))
    np.testing.assert_allclose(conv.log_weight_norm, np.log(norm + 0.01),
                               rtol=1e-5)


def test_gain_init_scale_shifts_log_weight_norm():
    conv = WeightNormConv2D(3, 1, gain_init_scale=0.1)
    conv.build((None, 2, 2, 6))
    norm = np.sqrt((np.asarray(conv.kernel, np.float64) ** 2).sum((0, 1, 2)))
    np.testing.assert_allclose(conv.log_weight_norm,
                               np.log(norm + 0.01) + math.log(0.1), rtol=1e-5)


@pytest.mark.parametrize("k, padding", [(3, 1), (5, 2)])
def test_stride_two_padding_is_symmetric_not_tf_same(k, padding):
    conv = WeightNormConv2D(4, k, strides=2, padding=padding)
    conv.build((None, 8, 8, 3))
    randomize_weights(conv, seed=1)
    x = _input((2, 8, 8, 3), seed=1)
    y = np.asarray(conv(tf.constant(x)))
    # Explicit symmetric pad then a 'VALID' conv, as PyTorch does.
    kernel = conv.effective_kernel()
    padded = tf.pad(x, [[0, 0], [padding, padding], [padding, padding],
                        [0, 0]])
    explicit = tf.nn.conv2d(padded, kernel, 2, "VALID") + conv.bias
    np.testing.assert_allclose(y, explicit, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(y, conv2d_reference(
        x, kernel, np.asarray(conv.bias), 2, padding), rtol=1e-4, atol=1e-5)
    # TF's 'SAME' pads (0, 1) for an even input at stride 2: other pixels.
    same = tf.nn.conv2d(x, kernel, 2, "SAME") + conv.bias
    assert same.shape == y.shape
    assert np.abs(np.asarray(same) - y).max() > 0.1


def test_depthwise_equals_per_channel_conv():
    conv = WeightNormConv2D(3, 5, padding=2, depthwise=True, use_bias=False,
                            weight_norm=False)
    conv.build((None, 6, 6, 3))
    x = _input((2, 6, 6, 3), seed=2)
    y = np.asarray(conv(tf.constant(x)))
    kernel = np.asarray(conv.kernel)
    for c in range(3):
        single = tf.nn.conv2d(x[..., c:c + 1], kernel[:, :, c:c + 1, :], 1,
                              "SAME")
        np.testing.assert_allclose(y[..., c:c + 1], single, rtol=1e-5,
                                   atol=1e-6)
    assert conv.kernel.shape == (5, 5, 3, 1)


def test_depthwise_needs_filters_equal_to_input_channels():
    conv = WeightNormConv2D(4, 3, padding=1, depthwise=True)
    with pytest.raises(ValueError, match="filters == input channels, got 4 "
                                         "and 3"):
        conv.build((None, 4, 4, 3))


@pytest.mark.parametrize("depthwise", [False, True])
def test_weight_normalize_gradient_equals_autodiff(depthwise):
    rng = np.random.default_rng(4)
    shape = (3, 3, 5, 1) if depthwise else (3, 3, 4, 6)
    axes = (0, 1, 3) if depthwise else (0, 1, 2)
    gain_shape = (1, 1, -1, 1) if depthwise else (1, 1, 1, -1)
    kernel = tf.constant(rng.normal(size=shape).astype(np.float32))
    log_gain = tf.constant(rng.normal(size=(shape[2] if depthwise else
                                            shape[3],)).astype(np.float32))
    upstream = tf.constant(rng.normal(size=shape).astype(np.float32))

    def autodiff(kernel, log_gain):
        norm = tf.sqrt(tf.reduce_sum(tf.square(kernel), axes, keepdims=True))
        return tf.reshape(tf.exp(log_gain), gain_shape) * kernel / (
            norm + WEIGHT_NORM_EPS)

    values, grads = [], []
    for fn in (autodiff, lambda k, g: weight_normalize(k, g, axes,
                                                       gain_shape)):
        with tf.GradientTape() as tape:
            tape.watch([kernel, log_gain])
            weight = fn(kernel, log_gain)
            loss = tf.reduce_sum(weight * upstream)
        values.append(weight.numpy())
        grads.append([g.numpy() for g in tape.gradient(
            loss, [kernel, log_gain])])
    np.testing.assert_array_equal(values[1], values[0])
    for ours, reference in zip(grads[1], grads[0]):
        assert np.abs(reference).max() > 0.1
        np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=1e-6)


def test_transposed_spectral_matrix_is_the_transpose():
    for conv, in_shape in ((WeightNormConv2D(4, 3, padding=1),
                            (None, 4, 4, 2)),
                           (WeightNormConv2D(3, 5, padding=2, depthwise=True),
                            (None, 4, 4, 3))):
        conv.build(in_shape)
        np.testing.assert_array_equal(
            conv.transposed_spectral_matrix().numpy(),
            conv.spectral_matrix().numpy().T)


def test_spectral_matrix_layout():
    conv = WeightNormConv2D(4, 3, padding=1)
    conv.build((None, 4, 4, 2))
    matrix = np.asarray(conv.spectral_matrix())
    assert matrix.shape == (4, 18)
    # Row o holds output channel o's kernel; the column order may differ
    # from PyTorch's [in, kh, kw], which leaves the singular values alone.
    kernel = effective_kernel(conv)
    torch_layout = kernel.transpose(3, 2, 0, 1).reshape(4, -1)
    np.testing.assert_allclose(np.sort(matrix, axis=1),
                               np.sort(torch_layout, axis=1), rtol=1e-6)
    np.testing.assert_allclose(np.linalg.svd(matrix, compute_uv=False),
                               np.linalg.svd(torch_layout, compute_uv=False),
                               rtol=1e-5)
    dw = WeightNormConv2D(3, 5, padding=2, depthwise=True)
    dw.build((None, 4, 4, 3))
    assert tuple(dw.spectral_matrix().shape) == (3, 25)


@pytest.mark.parametrize("kwargs", [
    dict(filters=4, kernel_size=3, strides=2, padding=1),
    dict(filters=3, kernel_size=5, padding=4, dilation_rate=2,
         depthwise=True, use_bias=False),
    dict(filters=2, kernel_size=1, weight_norm=False, gain_init_scale=0.1),
])
def test_weight_norm_conv_from_config(kwargs):
    conv = WeightNormConv2D(**kwargs)
    shape = (2, 8, 8, 3)
    conv.build(shape)
    randomize_weights(conv)
    clone = rebuild_from_config(conv, shape)
    x = tf.constant(_input(shape))
    np.testing.assert_array_equal(conv(x), clone(x))
    for key, value in kwargs.items():
        assert clone.get_config()[key] == value


@pytest.mark.parametrize("kwargs, message", [
    (dict(filters=0, kernel_size=3), "filters=0"),
    (dict(filters=2, kernel_size=4), "kernel_size=4"),
    (dict(filters=2, kernel_size=3, strides=3), "strides=3"),
    (dict(filters=2, kernel_size=3, padding=-1), "padding=-1"),
    (dict(filters=2, kernel_size=3, dilation_rate=0), "dilation_rate=0"),
    (dict(filters=2, kernel_size=3, gain_init_scale=0.0),
     "gain_init_scale=0.0"),
])
def test_weight_norm_conv_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        WeightNormConv2D(**kwargs)


def test_mixed_float16_policy():
    conv = WeightNormConv2D(4, 3, padding=1, dtype="mixed_float16")
    conv.build((None, 4, 4, 2))
    assert conv.kernel.dtype == "float32"
    x = _input((1, 4, 4, 2))
    y = conv(tf.constant(x, tf.float16))
    assert y.dtype == tf.float16
    np.testing.assert_allclose(np.asarray(y, np.float32),
                               conv_layer_reference(conv, x), atol=2e-2)


# ------------------------------------------------------------ ConvBNSwish

@pytest.mark.parametrize("kwargs, out_shape", [
    (dict(filters=6, kernel_size=1), (2, 6, 6, 6)),
    (dict(filters=4, kernel_size=5, depthwise=True), (2, 6, 6, 4)),
    (dict(filters=4, kernel_size=5, strides=2, depthwise=True),
     (2, 3, 3, 4)),
    (dict(filters=5, kernel_size=3, dilation_rate=2), (2, 6, 6, 5)),
])
def test_conv_bn_swish(kwargs, out_shape, regime):
    layer = ConvBNSwish(**kwargs)
    shape = (2, 6, 6, 4)
    layer.build(shape)
    randomize_weights(layer)
    # No weight norm and no bias on this conv (official ConvBNSwish).
    assert not layer.conv.weight_norm and not layer.conv.use_bias
    assert layer.conv.padding == \
        kwargs.get("dilation_rate", 1) * (kwargs["kernel_size"] - 1) // 2
    x = _input(shape)
    y = regime(lambda t: layer(t, training=True), tf.constant(x))
    assert tuple(y.shape) == out_shape == tuple(
        layer.compute_output_shape(shape))
    h = conv_layer_reference(layer.conv, x)
    expected = swish(batchnorm_reference(h, np.asarray(layer.bn.gamma),
                                         np.asarray(layer.bn.beta)))
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4)
    clone = rebuild_from_config(layer, shape)
    np.testing.assert_array_equal(layer(x, training=False),
                                  clone(x, training=False))


def test_conv_bn_swish_errors():
    with pytest.raises(ValueError, match="strides=3"):
        ConvBNSwish(4, 3, strides=3)
    with pytest.raises(ValueError, match="kernel_size=2"):
        ConvBNSwish(4, 2)


# ------------------------------------------------------------ BNSwishConv

@pytest.mark.parametrize("strides, upsample, dilation, out_shape", [
    (1, False, 1, (2, 8, 8, 5)),
    (2, False, 1, (2, 4, 4, 5)),
    (1, True, 1, (2, 16, 16, 5)),
    (1, False, 2, (2, 8, 8, 5)),  # res_bnswish5: 3x3, dilation 2, padding 2
])
def test_bn_swish_conv(strides, upsample, dilation, out_shape, regime):
    layer = BNSwishConv(5, 3, strides=strides, dilation_rate=dilation,
                        upsample=upsample)
    shape = (2, 8, 8, 4)
    layer.build(shape)
    randomize_weights(layer)
    assert layer.conv.weight_norm and layer.conv.use_bias
    assert layer.conv.padding == dilation
    x = _input(shape)
    y = regime(lambda t: layer(t, training=True), tf.constant(x))
    assert tuple(y.shape) == out_shape == tuple(
        layer.compute_output_shape(shape))
    h = swish(batchnorm_reference(x, np.asarray(layer.bn.gamma),
                                  np.asarray(layer.bn.beta)))
    if upsample:
        h = np.asarray(upsample_nearest(tf.constant(h)))
        np.testing.assert_array_equal(h[:, 2:4, 6:8], np.broadcast_to(
            h[:, 2:3, 6:7], (2, 2, 2, 4)))
    np.testing.assert_allclose(y, conv_layer_reference(layer.conv, h),
                               rtol=1e-4, atol=1e-4)
    clone = rebuild_from_config(layer, shape)
    np.testing.assert_array_equal(layer(x, training=False),
                                  clone(x, training=False))


def test_bn_swish_conv_errors():
    with pytest.raises(ValueError, match="strides=0"):
        BNSwishConv(4, strides=0)
    with pytest.raises(ValueError, match="strides=-1"):  # the old "up"
        BNSwishConv(4, strides=-1)
    with pytest.raises(ValueError, match="strides=2, upsample=True"):
        BNSwishConv(4, strides=2, upsample=True)
    with pytest.raises(ValueError, match="filters=0"):
        BNSwishConv(0)
