"""Inference mode folds every batch norm into a convolution (issue 7).

`ResidualCell` in inference mode runs `_inference_branch`: BN after a
convolution becomes that convolution's kernel scale and bias, the input BN of
an inverted residual goes into its 1x1 expansion, and an up-sampling inverted
residual expands before up-sampling. Here that path is compared with the
plain layer-by-layer evaluation on the same weights, with BN statistics far
from their initial values so that a wrong fold cannot hide.
"""

import contextlib

import numpy as np
import pytest
import tensorflow as tf

from benchmarks import bench
from nvae_tf.config import NVAEConfig
from nvae_tf.layers import blocks, cells
from nvae_tf.layers.conv import upsample_nearest
from nvae_tf.model import NVAE

RTOL = 1e-5


def _plain_inverted_residual(op, x):
    x = upsample_nearest(x) if op.upsample else x
    x = op.bn_in(x, training=False)
    x = op.expand.bn(op.expand.conv(x), training=False)
    x = op.depthwise.bn(op.depthwise.conv(x), training=False)
    return op.bn_out(op.project(x), training=False)


def _plain_branch(cell, x):
    for op in cell.ops:
        if isinstance(op, blocks.InvertedResidual):
            x = _plain_inverted_residual(op, x)
        else:
            y = op.bn(x, training=False)
            x = op.conv(upsample_nearest(y) if op.upsample else y)
    return x


@contextlib.contextmanager
def plain_inference():
    """Evaluates cells layer by layer, every BN applied on its own."""
    saved = cells.ResidualCell._inference_branch
    cells.ResidualCell._inference_branch = _plain_branch
    try:
        yield
    finally:
        cells.ResidualCell._inference_branch = saved


def _randomize_batchnorm(model, seed=0):
    """Moving statistics and affine parameters far from 0/1."""
    rng = np.random.default_rng(seed)
    for bn in model.batchnorm_layers():
        n = bn.gamma.shape[0]
        bn.gamma.assign(rng.uniform(0.5, 2.0, n))
        bn.beta.assign(rng.normal(0.0, 0.5, n))
        bn.moving_mean.assign(rng.normal(0.0, 0.5, n))
        bn.moving_variance.assign(rng.uniform(0.3, 3.0, n))


def _close(actual, expected, what):
    actual, expected = np.asarray(actual), np.asarray(expected)
    err = float(np.abs(actual - expected).max())
    scale = max(float(np.abs(expected).max()), 1e-12)
    assert err <= RTOL * scale, f"{what}: error {err:.3g}, scale {scale:.3g}"


ARCHS = ["res_mbconv", "res_bnswish", "mbconv_sep", "res53_mbconv"]


@pytest.mark.parametrize("arch", ARCHS)
def test_folded_inference_matches_plain_layers(arch):
    config = NVAEConfig(
        dataset="cifar10", image_size=8, num_channels_enc=8,
        num_channels_dec=8, num_latent_scales=2, num_groups_per_scale=2,
        num_latent_per_group=4, num_preprocess_blocks=1,
        num_postprocess_blocks=1, num_preprocess_cells=2,
        num_postprocess_cells=2, use_se=arch != "res_bnswish",
        res_dist=True, num_nf=1, num_mixture_dec=3, arch_instance=arch)
    model = NVAE(config, seed=1)
    model.build()
    _randomize_batchnorm(model)
    x = tf.constant(bench._synthetic_batch(config, 3, seed=2))
    eps = [tf.random.stateless_normal(shape, seed=(5, k))
           for k, shape in enumerate(model.latent_shapes(3))]
    folded = model(x, training=False, eps=eps)
    folded_sample = model.sample(3, 0.8, eps=eps, seed=(1, 2))
    with plain_inference():
        plain = model(x, training=False, eps=eps)
        plain_sample = model.sample(3, 0.8, eps=eps, seed=(1, 2))
    _close(folded.logits, plain.logits, "logits")
    _close(folded.nelbo, plain.nelbo, "nelbo")
    _close(folded_sample.logits, plain_sample.logits, "sample logits")
    # The folded path really is different code: the only BN ops left are
    # the input BNs of BN-Swish-conv cells (a BN before Swish cannot fold).
    graph = tf.function(lambda t: model(t, training=False, eps=eps).nelbo
                        ).get_concrete_function(x).graph
    unfoldable = sum(
        isinstance(layer, cells.ResidualCell) and
        not isinstance(layer.ops[0], blocks.InvertedResidual)
        for layer in model._flatten_layers(include_self=False))
    assert sum("FusedBatchNorm" in op.type
               for op in graph.get_operations()) == unfoldable


def test_training_mode_does_not_fold():
    """Training uses batch statistics: the BN ops stay (and update)."""
    config, batch, _ = bench.resolve_config("tiny")
    model = NVAE(config, seed=1)
    model.build()
    x = tf.constant(bench._synthetic_batch(config, batch, seed=2))
    graph = tf.function(lambda t: model(t, training=True).nelbo
                        ).get_concrete_function(x).graph
    assert sum("FusedBatchNorm" in op.type
               for op in graph.get_operations()) == len(
                   model.batchnorm_layers())
