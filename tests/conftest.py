"""Shared fixtures and NumPy references for the nvae_tf tests.

`tiny_config` builds configs small enough for a CPU test (8x8 images, 2
latent scales of 2 groups, 8 channels); `regime` runs a function eagerly and
inside `tf.function`, as TFP's `test_all_tf_execution_regimes` does. The
plain functions below (`conv2d_reference`, `randomize_weights`, ...) are
imported by the layer tests as `from tests.conftest import ...`.
"""

import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from nvae_tf.config import NVAEConfig

TINY_CONFIG = dict(
    dataset="cifar10", image_size=8, num_channels_enc=8, num_channels_dec=8,
    num_latent_scales=2, num_groups_per_scale=2, num_latent_per_group=3,
    num_preprocess_blocks=1, num_preprocess_cells=1,
    num_postprocess_blocks=1, num_postprocess_cells=1,
    num_cell_per_cond_enc=1, num_cell_per_cond_dec=1, num_mixture_dec=2,
    use_se=True, res_dist=True, num_nf=0)


def make_tiny_config(**overrides):
    """An `NVAEConfig` of `TINY_CONFIG` with `overrides` applied."""
    return NVAEConfig(**{**TINY_CONFIG, **overrides})


def inference_test_config(head):
    """A model of the inference-path tests (batch shards, constant weights):
    "tiny" is the benchmark's hidden preset (8-bit mixture head, flows, 2
    scales), "binary" a Bernoulli head on MNIST (28x28 padded to 32)."""
    if head == "tiny":
        from benchmarks import bench
        return bench.resolve_config("tiny")[0]
    return NVAEConfig(
        dataset="mnist", num_channels_enc=8, num_channels_dec=8,
        num_latent_scales=2, num_groups_per_scale=2, num_latent_per_group=4,
        num_preprocess_blocks=1, num_postprocess_blocks=1,
        num_preprocess_cells=1, num_postprocess_cells=1, use_se=True,
        res_dist=True, num_nf=0)


def run_fresh_python(code: str, timeout: float = 120) -> str:
    """Runs `code` in a new Python process at the repository root (for
    settings that must precede TensorFlow's runtime); returns its stdout."""
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=os.path.dirname(
            os.path.dirname(os.path.abspath(__file__))),
        capture_output=True, text=True, timeout=timeout, check=False)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def assert_nested_close(actual, expected, what, rtol):
    """Every tensor of two nests agrees to `rtol` x max(|expected|, 1)."""
    flat_a, flat_e = tf.nest.flatten(actual), tf.nest.flatten(expected)
    assert len(flat_a) == len(flat_e), what
    for i, (a, e) in enumerate(zip(flat_a, flat_e)):
        a, e = np.asarray(a), np.asarray(e)
        assert a.shape == e.shape, f"{what}[{i}]: {a.shape} vs {e.shape}"
        scale = max(float(np.abs(e).max()), 1.0) if e.size else 1.0
        err = float(np.abs(a - e).max()) if a.size else 0.0
        assert err <= rtol * scale, f"{what}[{i}]: error {err:.3g}"


@pytest.fixture
def tiny_config():
    """Factory: `tiny_config(num_nf=1, dataset="mnist", ...)`."""
    return make_tiny_config


@pytest.fixture(autouse=True)
def _seed():
    keras.utils.set_random_seed(1234)


@pytest.fixture(params=["eager", "tf_function"])
def regime(request):
    """`regime(fn, *args)` calls fn eagerly or through a fresh `tf.function`.

    Build layers (eagerly) before calling them here: a `tf.function` may only
    create variables on its first trace.
    """
    if request.param == "eager":
        return lambda fn, *args, **kwargs: fn(*args, **kwargs)
    return lambda fn, *args, **kwargs: tf.function(fn)(*args, **kwargs)


# ------------------------------------------------------------- helpers

def randomize_weights(layer, seed=0, low=-1.0, high=1.0):
    """Sets every variable of `layer` to U(low, high) (BN variances > 0).

    Keeps tests from passing because a weight happens to be 0 or 1 at init.
    """
    rng = np.random.default_rng(seed)
    for v in layer.weights:
        if not v.dtype.startswith("float"):
            continue
        value = rng.uniform(low, high, v.shape)
        if "variance" in v.path:
            value = rng.uniform(0.5, 2.0, v.shape)
        v.assign(value.astype(v.dtype))


def rebuild_from_config(layer, *input_shapes):
    """A fresh copy from `get_config()` with the same weights."""
    clone = layer.__class__.from_config(layer.get_config())
    clone.build(*input_shapes)
    assert len(clone.weights) == len(layer.weights)
    for dst, src in zip(clone.weights, layer.weights):
        assert dst.shape == src.shape, (dst.path, src.path)
        dst.assign(src)
    return clone


def conv2d_reference(x, kernel, bias=None, stride=1, padding=0, dilation=1,
                     depthwise=False):
    """Direct NumPy convolution with PyTorch's symmetric zero padding.

    x [B, H, W, Cin]; kernel [k, k, Cin, Cout] (or [k, k, C, 1] depthwise).
    """
    x = np.pad(np.asarray(x, np.float64),
               [(0, 0), (padding, padding), (padding, padding), (0, 0)])
    kernel = np.asarray(kernel, np.float64)
    k = kernel.shape[0]
    span = dilation * (k - 1)
    out_h = (x.shape[1] - span - 1) // stride + 1
    out_w = (x.shape[2] - span - 1) // stride + 1
    cout = x.shape[3] if depthwise else kernel.shape[3]
    y = np.zeros((x.shape[0], out_h, out_w, cout))
    for i in range(out_h):
        for j in range(out_w):
            patch = x[:, i * stride:i * stride + span + 1:dilation,
                      j * stride:j * stride + span + 1:dilation, :]
            if depthwise:
                y[:, i, j, :] = np.einsum("bhwc,hwc->bc", patch,
                                          kernel[..., 0])
            else:
                y[:, i, j, :] = np.einsum("bhwc,hwco->bo", patch, kernel)
    if bias is not None:
        y = y + np.asarray(bias)
    return y


def weight_norm_reference(v, log_gain, depthwise=False):
    """exp(g) v / (||v|| + 1e-5), norm per output channel (NumPy)."""
    v = np.asarray(v, np.float64)
    axes = (0, 1, 3) if depthwise else (0, 1, 2)
    norm = np.sqrt((v ** 2).sum(axis=axes, keepdims=True))
    gain = np.exp(np.asarray(log_gain, np.float64))
    gain = gain.reshape((1, 1, -1, 1) if depthwise else (1, 1, 1, -1))
    return gain * v / (norm + 1e-5)


def swish(x):
    return x / (1.0 + np.exp(-x))


def batchnorm_reference(x, gamma, beta, mean=None, variance=None, eps=1e-5):
    """BN over N, H, W; batch statistics (biased variance) if not given."""
    x = np.asarray(x, np.float64)
    if mean is None:
        mean = x.mean(axis=(0, 1, 2))
        variance = x.var(axis=(0, 1, 2))
    return (x - mean) / np.sqrt(variance + eps) * gamma + beta


def effective_kernel(conv):
    return np.asarray(conv.effective_kernel(), np.float64)


def conv_layer_reference(conv, x):
    """NumPy output of a `WeightNormConv2D` (or subclass) on x."""
    bias = np.asarray(conv.bias) if conv.use_bias else None
    return conv2d_reference(x, effective_kernel(conv), bias, conv.strides,
                            conv.padding, conv.dilation_rate, conv.depthwise)
