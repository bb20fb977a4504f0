"""Blocks inside NVAE residual cells: SE gate, inverted residual, skip paths.

Spec sections 1.7-1.9 (Vahdat & Kautz, 2020, Fig. 3 and the official code).
"""

import math

import keras
import tensorflow as tf

from nvae_tf.layers.conv import ConvBNSwish, WeightNormConv2D, upsample_nearest
from nvae_tf.layers.norm import BatchNorm
from nvae_tf.layers.tracking import CheckpointableCollections

SE_REDUCTION = 16  # SE bottleneck = channels // 16 ...
SE_MIN_HIDDEN = 4  # ... but at least 4 units, as the official code.


def _conv_shape(input_shape, channels, size_factor=1.0):
    size = input_shape[1]
    if size is not None:
        size = int(size * size_factor)
    return (input_shape[0], size, size, channels)


@keras.saving.register_keras_serializable(package="nvae_tf")
class SqueezeExcite(keras.layers.Layer):
    """x * sigmoid(W2 relu(W1 mean_hw(x) + b1) + b2), per channel."""

    def build(self, input_shape):
        channels = input_shape[-1]
        hidden = max(channels // SE_REDUCTION, SE_MIN_HIDDEN)
        self.squeeze = keras.layers.Dense(
            hidden, activation="relu", name="squeeze",
            kernel_initializer=_uniform(channels),
            bias_initializer=_uniform(channels), dtype=self.dtype_policy)
        self.excite = keras.layers.Dense(
            channels, activation="sigmoid", name="excite",
            kernel_initializer=_uniform(hidden),
            bias_initializer=_uniform(hidden), dtype=self.dtype_policy)
        self.squeeze.build((None, channels))
        self.excite.build((None, hidden))

    def call(self, inputs, scale=1.0):
        """Gated inputs; `scale` multiplies the [B, C] gate (cheaper than
        scaling the output)."""
        gate = self.excite(self.squeeze(tf.reduce_mean(inputs, axis=(1, 2))))
        if scale != 1.0:
            gate = gate * scale
        return inputs * gate[:, None, None, :]

    def compute_output_shape(self, input_shape):
        return input_shape


def _uniform(fan_in):
    """PyTorch's default Linear/Conv initialiser, U(+-1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)
    return keras.initializers.RandomUniform(-bound, bound)


@keras.saving.register_keras_serializable(package="nvae_tf")
class InvertedResidual(keras.layers.Layer):
    """MobileNetV2 block of NVAE decoder cells (no internal skip).

    [nearest x2 up] -> BN -> 1x1 expand + BN-Swish -> depthwise kxk + BN-Swish
    -> 1x1 project -> BN. The hidden width is round(expansion * C_in).

    Args:
      filters: output channels.
      strides: 1, or 2 to down-sample.
      upsample: nearest x2 up-sampling first (strides must be 1).
      expansion: hidden width factor (6 in decoder cells, 3 in post-process).
      kernel_size: depthwise kernel side (5).
      dilation_rate: depthwise dilation.
      sync_batchnorm: synchronise BN statistics across replicas.
    """

    def __init__(self, filters, strides=1, expansion=6, kernel_size=5,
                 dilation_rate=1, sync_batchnorm=False, upsample=False,
                 **kwargs):
        super().__init__(**kwargs)
        if strides not in (1, 2) or (upsample and strides != 1):
            raise ValueError(f"strides={strides!r}, upsample={upsample!r}; "
                             "expected strides 1 or 2, and 1 to upsample.")
        if filters < 1 or expansion <= 0:
            raise ValueError(f"filters={filters}, expansion={expansion}: "
                             "expected filters >= 1 and expansion > 0.")
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size={kernel_size}; expected an odd "
                             "size >= 1.")
        self.filters = filters
        self.strides = strides
        self.upsample = upsample
        self.expansion = expansion
        self.kernel_size = kernel_size
        self.dilation_rate = dilation_rate
        self.sync_batchnorm = sync_batchnorm

    def build(self, input_shape):
        in_channels = input_shape[-1]
        hidden = int(round(in_channels * self.expansion))
        kw = dict(dtype=self.dtype_policy)
        sync = self.sync_batchnorm
        self.bn_in = BatchNorm(synchronized=sync, name="bn_in", **kw)
        self.expand = ConvBNSwish(hidden, 1, sync_batchnorm=sync,
                                  name="expand", **kw)
        self.depthwise = ConvBNSwish(
            hidden, self.kernel_size, strides=self.strides,
            depthwise=True, dilation_rate=self.dilation_rate,
            sync_batchnorm=sync, name="depthwise", **kw)
        self.project = WeightNormConv2D(self.filters, 1, use_bias=False,
                                        weight_norm=False, name="project",
                                        **kw)
        self.bn_out = BatchNorm(synchronized=sync, name="bn_out", **kw)
        up = 2.0 if self.upsample else 1.0
        shape = _conv_shape(input_shape, in_channels, up)
        self.bn_in.build(shape)
        self.expand.build(shape)
        self.depthwise.build(_conv_shape(shape, hidden))
        shape = self.depthwise.compute_output_shape(_conv_shape(shape, hidden))
        self.project.build(shape)
        self.bn_out.build(_conv_shape(shape, self.filters))

    def call(self, inputs, training=None):
        if not training:
            return self.inference(inputs)
        x = upsample_nearest(inputs) if self.upsample else inputs
        x = self.bn_in(x, training=training)
        x = self.expand(x, training=training)
        x = self.depthwise(x, training=training)
        return self.bn_out(self.project(x), training=training)

    def inference(self, inputs):
        """Inference mode: every BN folded into a convolution.

        bn_in and the expansion BN fold into the 1x1 expansion, the others
        into the depthwise and projection convolutions. The expansion and
        its Swish are pointwise, so an up-sampling cell runs them before the
        nearest-neighbour up-sampling, on a quarter of the pixels.
        """
        x = tf.nn.silu(self.expand.conv.convolve(inputs,
                                                 *self._folded_expansion()))
        if self.upsample:
            x = upsample_nearest(x)
        x = self.depthwise.inference(x)
        kernel, bias = self.project.folded_kernel_and_bias(
            *self.bn_out.inference_affine())
        return self.project.convolve(x, kernel, bias)

    def _folded_expansion(self):
        """Kernel and bias of bn_in -> 1x1 expansion -> its BN."""
        kernel, bias = self.expand.conv.folded_kernel_and_bias(
            *self.expand.bn.inference_affine())  # kernel [1, 1, C, hidden]
        # bn_in, x * s + t before a 1x1 conv K: kernel rows times s, bias
        # plus K^T t.
        in_scale, in_shift = self.bn_in.inference_affine()
        bias += tf.linalg.matvec(kernel[0, 0], in_shift, transpose_a=True)
        return kernel * in_scale[:, None], bias

    def compute_output_shape(self, input_shape):
        factor = 2.0 if self.upsample else 1.0 / self.strides
        return _conv_shape(input_shape, self.filters, factor)

    def get_config(self):
        config = super().get_config()
        config.update(filters=self.filters, strides=self.strides,
                      expansion=self.expansion, kernel_size=self.kernel_size,
                      dilation_rate=self.dilation_rate,
                      sync_batchnorm=self.sync_batchnorm,
                      upsample=self.upsample)
        return config


def _pointwise_conv(conv, inputs):
    """`conv` (a 1x1 `WeightNormConv2D`) applied at stride 1."""
    kernel = tf.cast(conv.effective_kernel(), inputs.dtype)
    outputs = tf.nn.conv2d(inputs, kernel, 1, "VALID")
    if conv.use_bias:
        outputs = tf.nn.bias_add(outputs, tf.cast(conv.bias, outputs.dtype))
    return outputs


@keras.saving.register_keras_serializable(package="nvae_tf")
class FactorizedReduce(CheckpointableCollections, keras.layers.Layer):
    """Down-sampling skip: Swish, four shifted 1x1 stride-2 convs, concat.

    The four convolutions see the input shifted by (0,0), (1,1), (0,1) and
    (1,0) pixels (rows, cols), so together they cover every input pixel.
    """

    # (row offset, column offset) of each branch, in concatenation order.
    SHIFTS = ((0, 0), (1, 1), (0, 1), (1, 0))

    def __init__(self, filters, **kwargs):
        super().__init__(**kwargs)
        if filters < 4:
            raise ValueError(f"filters={filters}; expected >= 4.")
        self.filters = filters

    def build(self, input_shape):
        quarter = self.filters // 4
        widths = (quarter, quarter, quarter, self.filters - 3 * quarter)
        self.convs = [
            WeightNormConv2D(w, 1, strides=2, name=f"conv_{i + 1}",
                             dtype=self.dtype_policy)
            for i, w in enumerate(widths)]
        for conv in self.convs:
            conv.build(input_shape)

    def call(self, inputs):
        x = tf.nn.silu(inputs)
        height, width = x.shape[1], x.shape[2]
        if height is None or width is None or height % 2 or width % 2:
            outputs = [conv(x[:, dr:, dc:, :])
                       for conv, (dr, dc) in zip(self.convs, self.SHIFTS)]
            return tf.concat(outputs, axis=-1)
        # Even sizes: a 1x1 stride-2 conv of x[:, dr:, dc:] sees exactly the
        # pixels (dr + 2i, dc + 2j), the channel block 2 dr + dc of
        # space_to_depth(x, 2). Splitting that tensor avoids four strided
        # slices, whose gradients scatter into full-size zero tensors.
        blocks = tf.split(tf.nn.space_to_depth(x, 2), 4, axis=-1)
        outputs = [_pointwise_conv(conv, blocks[2 * dr + dc])
                   for conv, (dr, dc) in zip(self.convs, self.SHIFTS)]
        return tf.concat(outputs, axis=-1)

    def compute_output_shape(self, input_shape):
        return _conv_shape(input_shape, self.filters, 0.5)

    def get_config(self):
        config = super().get_config()
        config.update(filters=self.filters)
        return config


def resize_bilinear_align_corners(images, size):
    """Bilinear resize with the corner pixels' centres aligned (float32).

    NVAE up-samples with PyTorch's `align_corners=True`, which `tf.image.resize`
    does not offer (it samples at half-pixel centres). The ResizeBilinear op
    with `align_corners=True` computes exactly that and is what the
    deprecated `tf.compat.v1.image.resize_bilinear` ran.

    Args:
      images: [B, H, W, C] float tensor.
      size: int32 [2], the output height and width.

    Returns:
      [B, size[0], size[1], C] float32.
    """
    return tf.raw_ops.ResizeBilinear(images=images, size=size,
                                     align_corners=True,
                                     half_pixel_centers=False)


@keras.saving.register_keras_serializable(package="nvae_tf")
class UpsampleSkip(keras.layers.Layer):
    """Up-sampling skip: bilinear x2 (align_corners=True), 1x1 conv, no bias."""

    def __init__(self, filters, **kwargs):
        super().__init__(**kwargs)
        if filters < 1:
            raise ValueError(f"filters={filters}; expected >= 1.")
        self.filters = filters

    def build(self, input_shape):
        self.conv = WeightNormConv2D(self.filters, 1, use_bias=False,
                                     name="conv", dtype=self.dtype_policy)
        self.conv.build(_conv_shape(input_shape, input_shape[-1], 2.0))

    def call(self, inputs):
        # The 1x1 convolution (no bias) and the bilinear resize are both
        # linear and act on different axes, so they commute: convolving
        # first works on a quarter of the pixels and resizes fewer channels.
        y = self.conv(inputs)
        size = tf.shape(inputs)[1:3] * 2
        return tf.cast(resize_bilinear_align_corners(y, size), y.dtype)

    def compute_output_shape(self, input_shape):
        return _conv_shape(input_shape, self.filters, 2.0)

    def get_config(self):
        config = super().get_config()
        config.update(filters=self.filters)
        return config
