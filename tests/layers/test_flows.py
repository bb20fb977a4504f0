"""Autoregressive masks and the volume-preserving shift flows."""

import numpy as np
import pytest
import tensorflow as tf

from nvae_tf.layers.flows import (AutoregressiveShiftCell, MaskedConv2D,
                                  PairedAutoregressiveFlow,
                                  autoregressive_mask)
from tests.conftest import (conv_layer_reference, effective_kernel,
                            randomize_weights, rebuild_from_config,
                            weight_norm_reference)

Z_SHAPE = (1, 4, 4, 3)


def _input(shape=Z_SHAPE, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


# ------------------------------------------------------------------- masks

def _spatial(mask):
    """[k, k] spatial pattern of a single-channel mask."""
    return mask[:, :, 0, 0].astype(int).tolist()


def test_mask_spatial_raster_pattern():
    assert autoregressive_mask(3, 1, 1, False, False, False).shape == \
        (3, 3, 1, 1)
    assert _spatial(autoregressive_mask(3, 1, 1, False, False, False)) == [
        [1, 1, 1],
        [1, 1, 0],
        [0, 0, 0]]
    assert _spatial(autoregressive_mask(3, 1, 1, False, True, False)) == [
        [1, 1, 1],
        [1, 0, 0],
        [0, 0, 0]]
    assert _spatial(autoregressive_mask(5, 1, 1, False, False, False)) == [
        [1, 1, 1, 1, 1],
        [1, 1, 1, 1, 1],
        [1, 1, 1, 0, 0],
        [0, 0, 0, 0, 0],
        [0, 0, 0, 0, 0]]


def test_mask_mirror_flips_spatially():
    assert _spatial(autoregressive_mask(3, 1, 1, False, False, True)) == [
        [0, 0, 0],
        [0, 1, 1],
        [1, 1, 1]]
    assert _spatial(autoregressive_mask(3, 1, 1, False, True, True)) == [
        [0, 0, 0],
        [0, 0, 1],
        [1, 1, 1]]


@pytest.mark.parametrize("cin, cout, zero_diag, centre", [
    # c_out >= c_in: output block i (of c_out / c_in) sees inputs 0..i
    # (0..i-1 with zero_diag). centre[in][out].
    (2, 4, False, [[1, 1, 1, 1],
                   [0, 0, 1, 1]]),
    (2, 4, True, [[0, 0, 1, 1],
                  [0, 0, 0, 0]]),
    (3, 3, False, [[1, 1, 1],
                   [0, 1, 1],
                   [0, 0, 1]]),
    (3, 3, True, [[0, 1, 1],
                  [0, 0, 1],
                  [0, 0, 0]]),
    # c_out < c_in: output o sees inputs 0..(o+1) r - 1 (0..o r - 1).
    (4, 2, False, [[1, 1],
                   [1, 1],
                   [0, 1],
                   [0, 1]]),
    (4, 2, True, [[0, 1],
                  [0, 1],
                  [0, 0],
                  [0, 0]]),
])
def test_mask_channel_blocks(cin, cout, zero_diag, centre):
    mask = autoregressive_mask(1, cin, cout, False, zero_diag, False)
    assert mask.shape == (1, 1, cin, cout)
    assert mask[0, 0].astype(int).tolist() == centre
    # With a 3x3 kernel the same block sits at the centre tap, the taps
    # above/left are all ones and the ones below/right all zeros.
    mask3 = autoregressive_mask(3, cin, cout, False, zero_diag, False)
    assert mask3[1, 1].astype(int).tolist() == centre
    assert mask3[0].min() == 1 and mask3[1, 0].min() == 1
    assert mask3[2].max() == 0 and mask3[1, 2].max() == 0


def test_mask_mirror_keeps_channel_order():
    mask = autoregressive_mask(3, 2, 2, False, False, True)
    assert mask[1, 1].astype(int).tolist() == [[1, 1], [0, 1]]
    assert mask[0].max() == 0 and mask[1, 0].max() == 0
    assert mask[2].min() == 1 and mask[1, 2].min() == 1


@pytest.mark.parametrize("zero_diag", [False, True])
def test_mask_depthwise(zero_diag):
    mask = autoregressive_mask(3, 2, 2, True, zero_diag, False)
    assert mask.shape == (3, 3, 2, 1)
    centre = 0 if zero_diag else 1
    for c in range(2):
        assert mask[:, :, c, 0].astype(int).tolist() == [
            [1, 1, 1],
            [1, centre, 0],
            [0, 0, 0]]


# ------------------------------------------------------------ MaskedConv2D

@pytest.mark.parametrize("kwargs", [
    dict(filters=6, kernel_size=3, zero_diag=True, use_bias=False),
    dict(filters=6, kernel_size=5, depthwise=True, mirror=True,
         use_bias=False),
    dict(filters=2, kernel_size=1, gain_init_scale=0.1),
    dict(filters=4, kernel_size=3, mirror=True),
    dict(filters=4, kernel_size=5, zero_diag=True, mirror=True),
])
def test_masked_conv(kwargs, regime):
    in_channels = 6 if kwargs.get("depthwise") or kwargs["kernel_size"] == 1 \
        else 2
    shape = (2, 4, 4, in_channels)
    conv = MaskedConv2D(**kwargs)
    conv.build(shape)
    mask = autoregressive_mask(kwargs["kernel_size"], in_channels,
                               kwargs["filters"],
                               kwargs.get("depthwise", False),
                               kwargs.get("zero_diag", False),
                               kwargs.get("mirror", False))
    depthwise = kwargs.get("depthwise", False)
    # Gain initialised from the norm of the *masked* kernel (+ log scale).
    masked = np.asarray(conv.kernel, np.float64) * mask
    axes = (0, 1, 3) if depthwise else (0, 1, 2)
    norm = np.sqrt((masked ** 2).sum(axis=axes))
    np.testing.assert_allclose(
        conv.log_weight_norm,
        np.log(norm + 0.01) + np.log(kwargs.get("gain_init_scale", 1.0)),
        rtol=1e-5)
    randomize_weights(conv)
    masked = np.asarray(conv.kernel, np.float64) * mask
    np.testing.assert_allclose(
        effective_kernel(conv),
        weight_norm_reference(masked, conv.log_weight_norm, depthwise),
        rtol=1e-5, atol=1e-7)
    assert np.all(effective_kernel(conv)[mask == 0] == 0)
    assert conv.padding == (kwargs["kernel_size"] - 1) // 2
    x = _input(shape)
    y = regime(conv, tf.constant(x))
    assert y.shape == shape[:3] + (kwargs["filters"],)
    np.testing.assert_allclose(y, conv_layer_reference(conv, x), rtol=1e-4,
                               atol=1e-5)
    clone = rebuild_from_config(conv, shape)
    for key in ("zero_diag", "mirror", "depthwise", "padding"):
        assert clone.get_config()[key] == conv.get_config()[key]
    np.testing.assert_array_equal(conv(x), clone(x))


@pytest.mark.parametrize("mirror", [False, True])
@pytest.mark.parametrize("kernel_size", [3, 5])
def test_masked_conv_cropped_kernel_matches_full_kernel(mirror, kernel_size):
    """The conv skips the masked half of the kernel: same value, same grads."""
    conv = MaskedConv2D(4, kernel_size, zero_diag=True, mirror=mirror)
    shape = (2, 6, 6, 2)
    conv.build(shape)
    randomize_weights(conv)
    x = tf.constant(_input(shape, seed=3))
    dy = tf.constant(_input(shape[:3] + (4,), seed=4))

    def run(convolve):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = convolve(x, conv.effective_kernel(), conv.bias)
        return [y] + tape.gradient(y, [x] + conv.trainable_variables, dy)

    full = lambda x, k, b: super(MaskedConv2D, conv).convolve(x, k, b)  # noqa
    for cropped, plain in zip(run(conv.convolve), run(full)):
        np.testing.assert_allclose(cropped, plain, rtol=1e-5, atol=1e-5)
    graph = tf.function(conv).get_concrete_function(x).graph
    kernels = [op.inputs[1].shape for op in graph.get_operations()
               if op.type == "Conv2D"]
    assert kernels == [((kernel_size + 1) // 2, kernel_size, 2, 4)]


def test_masked_conv_errors():
    with pytest.raises(ValueError, match="kernel_size=2"):
        MaskedConv2D(4, 2)
    with pytest.raises(ValueError, match="filters=0"):
        MaskedConv2D(0, 3)


# ------------------------------------------------------------ flow cells

def _jacobian(fn, z, regime):
    def jac(z):
        with tf.GradientTape() as tape:
            tape.watch(z)
            out = fn(z)
        return tape.jacobian(out, z)
    size = int(np.prod(z.shape))
    return np.asarray(regime(jac, tf.constant(z))).reshape(size, size)


def _raster_order(mirror, positions=16, channels=3):
    """Flat NHWC indices in (position-major, channel-minor) causal order."""
    order = range(positions - 1, -1, -1) if mirror else range(positions)
    return np.array([p * channels + c for p in order
                     for c in range(channels)])


def _built_cell(mirror):
    cell = AutoregressiveShiftCell(mirror=mirror)
    cell.build(Z_SHAPE)
    return cell


def test_shift_cell_structure():
    cell = _built_cell(False)
    assert cell.conv_in.kernel.shape == (3, 3, 3, 18)  # hidden = 6 L
    assert cell.conv_in.zero_diag and not cell.conv_in.use_bias
    assert cell.conv_depthwise.kernel.shape == (5, 5, 18, 1)
    assert cell.conv_depthwise.depthwise
    assert not cell.conv_depthwise.zero_diag
    assert cell.conv_mu.kernel.shape == (1, 1, 18, 3)
    assert cell.conv_mu.use_bias and not cell.conv_mu.zero_diag
    # mu's weight-norm gain starts at 0.1 x the masked kernel's norm.
    masked = np.asarray(cell.conv_mu.kernel, np.float64) * \
        autoregressive_mask(1, 18, 3, False, False, False)
    np.testing.assert_allclose(
        cell.conv_mu.log_weight_norm,
        np.log(np.sqrt((masked ** 2).sum((0, 1, 2))) + 0.01) + np.log(0.1),
        rtol=1e-5)


@pytest.mark.parametrize("mirror", [False, True])
def test_shift_cell_jacobian_is_unit_lower_triangular(mirror, regime):
    cell = _built_cell(mirror)
    randomize_weights(cell, seed=7)
    z = _input()
    jac = _jacobian(cell, z, regime)
    order = _raster_order(mirror)
    ordered = jac[np.ix_(order, order)]
    np.testing.assert_array_equal(np.diag(ordered), np.ones(48))
    assert np.abs(np.triu(ordered, k=1)).max() < 1e-6
    assert np.abs(np.tril(ordered, k=-1)).max() > 1e-2
    # In the other cell's order the Jacobian is not triangular.
    other = jac[np.ix_(_raster_order(not mirror), _raster_order(not mirror))]
    assert np.abs(np.triu(other, k=1)).max() > 1e-2
    # Same channel order in both cells: at one position, channel 2 depends on
    # channels 0, 1 but not the reverse.
    p = 5 * 3
    assert np.abs(jac[p + 2, p:p + 2]).max() > 1e-3
    assert np.all(jac[p, p + 1:p + 3] == 0)


def test_shift_cell_output_and_config():
    cell = _built_cell(True)
    randomize_weights(cell, seed=3)
    z = tf.constant(_input())
    out = cell(z)
    assert out.shape == Z_SHAPE == tuple(cell.compute_output_shape(Z_SHAPE))
    # z_new = z - mu with mu computed by the masked network (ELU twice).
    h = tf.nn.elu(cell.conv_in(z))
    h = tf.nn.elu(cell.conv_depthwise(h))
    mu = cell.conv_mu(tf.nn.elu(h))
    np.testing.assert_allclose(out, z - mu, rtol=1e-6, atol=1e-6)
    clone = rebuild_from_config(cell, Z_SHAPE)
    assert clone.mirror
    np.testing.assert_array_equal(cell(z), clone(z))


def test_paired_flow_volume_preserving(regime):
    flow = PairedAutoregressiveFlow()
    flow.build(Z_SHAPE)
    assert not flow.cell1.mirror and flow.cell2.mirror
    randomize_weights(flow, seed=11)
    z = _input()
    z_new, log_det = regime(flow, tf.constant(z))
    assert z_new.shape == Z_SHAPE and log_det.shape == Z_SHAPE
    np.testing.assert_array_equal(log_det, np.zeros(Z_SHAPE))
    np.testing.assert_allclose(z_new, flow.cell2(flow.cell1(z)), rtol=1e-6,
                               atol=1e-6)
    assert np.abs(np.asarray(z_new) - z).max() > 1e-2
    jac = _jacobian(lambda t: flow(t)[0], z, regime)
    sign, logabsdet = np.linalg.slogdet(jac.astype(np.float64))
    assert sign == 1 and abs(logabsdet) < 1e-3
    shapes = flow.compute_output_shape(Z_SHAPE)
    assert tuple(shapes[0]) == tuple(shapes[1]) == Z_SHAPE
    clone = rebuild_from_config(flow, Z_SHAPE)
    np.testing.assert_array_equal(flow(z)[0], clone(z)[0])
