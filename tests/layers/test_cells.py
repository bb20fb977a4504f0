"""ResidualCell (all eight cell types) and the two combiner cells."""

import numpy as np
import pytest
import tensorflow as tf

from nvae_tf.layers.blocks import (FactorizedReduce, InvertedResidual,
                                   UpsampleSkip)
from nvae_tf.layers.cells import CELL_TYPES, ResidualCell
from nvae_tf.layers.combiners import DecoderCombinerCell, EncoderCombinerCell
from nvae_tf.layers.conv import BNSwishConv
from tests.conftest import (conv2d_reference, effective_kernel,
                            randomize_weights, rebuild_from_config)

IN_SHAPE = (2, 4, 4, 4)
# cell type -> (filters, output shape, op class, expansion or None, skip)
CELLS = {
    "normal_pre": (4, (2, 4, 4, 4), BNSwishConv, None, None),
    "down_pre": (8, (2, 2, 2, 8), BNSwishConv, None, FactorizedReduce),
    "normal_enc": (4, (2, 4, 4, 4), BNSwishConv, None, None),
    "down_enc": (8, (2, 2, 2, 8), BNSwishConv, None, FactorizedReduce),
    "normal_dec": (4, (2, 4, 4, 4), InvertedResidual, 6, None),
    "up_dec": (2, (2, 8, 8, 2), InvertedResidual, 6, UpsampleSkip),
    "normal_post": (4, (2, 4, 4, 4), InvertedResidual, 3, None),
    "up_post": (2, (2, 8, 8, 2), InvertedResidual, 3, UpsampleSkip),
}


def _input(shape=IN_SHAPE, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def test_table_covers_every_cell_type():
    assert sorted(CELLS) == sorted(CELL_TYPES)


@pytest.mark.parametrize("cell_type", CELL_TYPES)
def test_residual_cell_structure_and_shape(cell_type, regime):
    filters, out_shape, op_class, expansion, skip_class = CELLS[cell_type]
    cell = ResidualCell(cell_type, filters)
    cell.build(IN_SHAPE)
    randomize_weights(cell)
    expected_ops = 2 if op_class is BNSwishConv else 1
    assert len(cell.ops) == expected_ops
    assert all(isinstance(op, op_class) for op in cell.ops)
    # Only the first op changes resolution.
    kind = cell_type.split("_")[0]
    assert cell.ops[0].strides == (2 if kind == "down" else 1)
    assert cell.ops[0].upsample == (kind == "up")
    assert all(op.strides == 1 and not op.upsample for op in cell.ops[1:])
    if expansion is not None:
        assert cell.ops[0].expansion == expansion
        assert cell.ops[0].kernel_size == 5
    if skip_class is None:
        assert cell.skip is None
    else:
        assert isinstance(cell.skip, skip_class)
    x = _input()
    y = regime(lambda t: cell(t, training=True), tf.constant(x))
    assert tuple(y.shape) == out_shape == tuple(
        cell.compute_output_shape(IN_SHAPE))
    assert np.all(np.isfinite(y))


@pytest.mark.parametrize("cell_type", CELL_TYPES)
def test_residual_cell_is_skip_plus_tenth_of_se_branch(cell_type):
    filters = CELLS[cell_type][0]
    cell = ResidualCell(cell_type, filters)
    cell.build(IN_SHAPE)
    randomize_weights(cell)
    x = tf.constant(_input())
    y = np.asarray(cell(x, training=False))
    branch = x
    for op in cell.ops:
        branch = op(branch, training=False)
    branch = cell.se(branch)
    skip = x if cell.skip is None else cell.skip(x)
    np.testing.assert_allclose(y, skip + 0.1 * branch, rtol=1e-5, atol=1e-6)
    assert np.abs(y - (skip + branch)).max() > 1e-3
    # Rebuilt from its config with the same weights: the same function.
    clone = rebuild_from_config(cell, IN_SHAPE)
    np.testing.assert_array_equal(cell(x, training=False),
                                  clone(x, training=False))
    config = clone.get_config()
    assert config["cell_type"] == cell_type and config["filters"] == filters


def test_residual_cell_without_se():
    cell = ResidualCell("normal_enc", 4, use_se=False)
    cell.build(IN_SHAPE)
    assert cell.se is None
    randomize_weights(cell)
    x = tf.constant(_input())
    branch = cell.ops[1](cell.ops[0](x, training=False), training=False)
    np.testing.assert_allclose(cell(x, training=False), x + 0.1 * branch,
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch, cell_type, filters, op_names", [
    # mbconv_sep down cells run a stride-2 depthwise 5x5 (explicit padding).
    ("mbconv_sep", "down_enc", 8, ["InvertedResidual"]),
    ("res53_mbconv", "normal_enc", 4, ["BNSwishConv", "BNSwishConv"]),
    ("res_bnswish", "up_dec", 2, ["BNSwishConv", "BNSwishConv"]),
    ("mbconv_sep11", "normal_dec", 4, ["InvertedResidual"]),
])
def test_other_arch_instances(arch, cell_type, filters, op_names, regime):
    cell = ResidualCell(cell_type, filters, arch_instance=arch)
    cell.build(IN_SHAPE)
    assert [type(op).__name__ for op in cell.ops] == op_names
    if arch == "res53_mbconv":
        assert [op.dilation_rate for op in cell.ops] == [2, 1]
    if arch == "mbconv_sep11":
        assert cell.ops[0].kernel_size == 11
    y = regime(lambda t: cell(t, training=True), tf.constant(_input()))
    assert tuple(y.shape) == tuple(cell.compute_output_shape(IN_SHAPE))


@pytest.mark.parametrize("kwargs, message", [
    (dict(cell_type="sideways_enc", filters=4), "cell_type='sideways_enc'"),
    (dict(cell_type="normal_enc", filters=4, arch_instance="res_mbconv9"),
     "arch_instance='res_mbconv9'"),
    (dict(cell_type="normal_enc", filters=0), "filters=0"),
])
def test_residual_cell_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ResidualCell(**kwargs)


def test_normal_cell_must_keep_channels():
    cell = ResidualCell("normal_dec", 6)
    with pytest.raises(ValueError, match="got input 4 channels, filters=6"):
        cell.build(IN_SHAPE)


# ---------------------------------------------------------------- combiners

def test_encoder_combiner_adds_conv_of_decoder_state(regime):
    enc_shape, dec_shape = (2, 4, 4, 6), (2, 4, 4, 5)
    cell = EncoderCombinerCell()
    cell.build(enc_shape, dec_shape)
    randomize_weights(cell)
    enc, dec = _input(enc_shape, 1), _input(dec_shape, 2)
    y = regime(cell, tf.constant(enc), tf.constant(dec))
    assert y.shape == enc_shape == tuple(cell.compute_output_shape(
        enc_shape, dec_shape))
    assert cell.conv.kernel.shape == (1, 1, 5, 6)
    assert cell.conv.use_bias and cell.conv.weight_norm
    expected = enc + conv2d_reference(dec, effective_kernel(cell.conv),
                                      np.asarray(cell.conv.bias))
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
    clone = rebuild_from_config(cell, enc_shape, dec_shape)
    np.testing.assert_array_equal(cell(enc, dec), clone(enc, dec))


def test_decoder_combiner_convolves_concat_state_then_z(regime):
    state_shape, z_shape = (2, 4, 4, 6), (2, 4, 4, 3)
    cell = DecoderCombinerCell()
    cell.build(state_shape, z_shape)
    randomize_weights(cell)
    state, z = _input(state_shape, 1), _input(z_shape, 2)
    y = regime(cell, tf.constant(state), tf.constant(z))
    assert y.shape == state_shape == tuple(cell.compute_output_shape(
        state_shape, z_shape))
    kernel = effective_kernel(cell.conv)[0, 0]  # [6 + 3, 6]
    assert kernel.shape == (9, 6)
    # Input rows 0..5 act on the state, rows 6..8 on z.
    expected = state @ kernel[:6] + z @ kernel[6:] + np.asarray(
        cell.conv.bias)
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
    swapped = z @ kernel[:3] + state @ kernel[3:] + np.asarray(
        cell.conv.bias)
    assert np.abs(np.asarray(y) - swapped).max() > 1e-2
    clone = rebuild_from_config(cell, state_shape, z_shape)
    np.testing.assert_array_equal(cell(state, z), clone(state, z))


@pytest.mark.parametrize("cell_type", ["down_enc", "up_dec", "up_post"])
def test_residual_cell_mixed_float16(cell_type):
    filters = CELLS[cell_type][0]
    full = ResidualCell(cell_type, filters)
    full.build(IN_SHAPE)
    randomize_weights(full)
    mixed = ResidualCell(cell_type, filters, dtype="mixed_float16")
    mixed.build(IN_SHAPE)
    for dst, src in zip(mixed.weights, full.weights):
        dst.assign(src)
    x = _input()
    y = mixed(tf.constant(x, tf.float16), training=False)
    assert y.dtype == tf.float16
    np.testing.assert_allclose(np.asarray(y, np.float32),
                               full(x, training=False), rtol=2e-2, atol=2e-2)
