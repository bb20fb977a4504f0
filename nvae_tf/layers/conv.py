"""Weight-normalised convolutions and the two convolution units of NVAE.

`WeightNormConv2D` is NVAE's own `Conv2D`: the kernel direction v is a free
parameter and the per-output-channel gain is stored in log space,

    W[o] = exp(log_weight_norm[o]) * v[o] / (||v[o]|| + 1e-5),

initialised with PyTorch's default U(+-1/sqrt(fan_in)) kernel and bias and
`log_weight_norm = log(||v|| + 0.01)` (Vahdat & Kautz, 2020, and the official
code). Padding is symmetric as in PyTorch.
"""

import math

import keras
import tensorflow as tf

from nvae_tf.layers.norm import BatchNorm

WEIGHT_NORM_EPS = 1e-5  # added to ||v|| in the denominator
LOG_WEIGHT_NORM_INIT_EPS = 0.01  # log_weight_norm starts at log(||v|| + 0.01)


def _pytorch_uniform(bound):
    return keras.initializers.RandomUniform(-bound, bound)


def _depthwise_kernel_grad(inputs, grad_output, kernel_size):
    """d loss / d kernel of a stride-1 'SAME' depthwise conv, [k, k, C, 1].

    grad[i, j, c] = sum_{b, h, w} x_pad[b, h + i, w + j, c] dy[b, h, w, c],
    for each image b a 'VALID' depthwise convolution of the padded image with
    dy[b] as the kernel, summed over the batch: with oneDNN, faster than
    `DepthwiseConv2dNativeBackpropFilter` (docs/performance.md). Without a
    static batch size the batch is folded into the channels instead (one
    convolution [1, H', W', B*C] by [H, W, B*C, 1], also faster).
    """
    pad = (kernel_size - 1) // 2
    batch, height, width, channels = grad_output.shape
    padded = tf.pad(inputs, [[0, 0], [pad, pad], [pad, pad], [0, 0]])
    strides = (1, 1, 1, 1)
    if batch is not None:
        images = tf.split(padded, batch, axis=0)  # B x [1, H', W', C]
        kernels = tf.split(grad_output, batch, axis=0)  # B x [1, H, W, C]
        grads = [tf.nn.depthwise_conv2d(
            image, tf.reshape(kernel, [height, width, channels, 1]),
            strides, "VALID") for image, kernel in zip(images, kernels)]
        return tf.reshape(tf.add_n(grads),
                          [kernel_size, kernel_size, channels, 1])
    image = tf.reshape(tf.transpose(padded, (1, 2, 0, 3)),
                       [1, height + 2 * pad, width + 2 * pad, -1])
    kernel = tf.reshape(tf.transpose(grad_output, (1, 2, 0, 3)),
                        [height, width, -1, 1])
    out = tf.nn.depthwise_conv2d(image, kernel, strides, "VALID")
    out = tf.reshape(out, [kernel_size, kernel_size, -1, channels])
    return tf.reduce_sum(out, axis=2)[..., None]


@tf.custom_gradient
def depthwise_conv2d_same(inputs, kernel):
    """Stride-1 'SAME' depthwise convolution with a faster gradient.

    The same function as `tf.nn.depthwise_conv2d(inputs, kernel, 1, 'SAME')`
    for an odd square kernel [k, k, C, 1] and static spatial input shape; the
    input gradient is the convolution of dy with the flipped kernel, the
    kernel gradient `_depthwise_kernel_grad`.
    """
    strides = (1, 1, 1, 1)
    outputs = tf.nn.depthwise_conv2d(inputs, kernel, strides, "SAME")

    def grad(grad_output):
        grad_inputs = tf.nn.depthwise_conv2d(
            grad_output, tf.reverse(kernel, (0, 1)), strides, "SAME")
        grad_kernel = _depthwise_kernel_grad(inputs, grad_output,
                                             kernel.shape[0])
        return grad_inputs, grad_kernel

    return outputs, grad


def weight_normalize(kernel, log_weight_norm, axes, gain_shape):
    """exp(log_weight_norm) * kernel / (||kernel|| + eps), norms over `axes`.

    The gradient is written out so that the backward pass needs only the
    kernel and per-output-channel values: automatic differentiation would
    keep `gain * kernel`, a full copy of every kernel, from the forward to
    the backward pass. With t = sum(dw * v), d = ||v|| + eps, s = g / d:

        dv = s dw - s t / (d ||v||) v,    d log_weight_norm = s t.

    Args:
      kernel: the kernel direction v (float32).
      log_weight_norm: [out] logarithm of the gains g.
      axes: the kernel axes reduced by the norm (all but the output channel).
      gain_shape: shape that broadcasts a per-output value over the kernel.

    Returns:
      The weight-normalised kernel, shaped like `kernel`.
    """

    @tf.custom_gradient
    def normalize(kernel, log_weight_norm):
        if tf.executing_eagerly():
            # An eager tape records the ops of a custom gradient's forward
            # too, and would keep `gain * kernel` (a kernel-sized copy)
            # until it is deleted; the forward's inputs cut them off.
            kernel, log_weight_norm = tf.stop_gradient(kernel), \
                tf.stop_gradient(log_weight_norm)
        gain = tf.reshape(tf.exp(log_weight_norm), gain_shape)
        norm = tf.sqrt(tf.reduce_sum(tf.square(kernel), axis=axes,
                                     keepdims=True))
        denom = norm + WEIGHT_NORM_EPS
        weight = gain * kernel / denom

        def grad(grad_weight):
            scale = gain / denom
            dot = tf.reduce_sum(grad_weight * kernel, axis=axes, keepdims=True)
            grad_kernel = scale * grad_weight - (
                scale * dot / (denom * norm)) * kernel
            return grad_kernel, tf.reshape(scale * dot, [-1])

        return weight, grad

    return normalize(kernel, tf.convert_to_tensor(log_weight_norm))


@keras.saving.register_keras_serializable(package="nvae_tf")
class WeightNormConv2D(keras.layers.Layer):
    """2-D convolution with NVAE weight normalisation and symmetric padding.

    Args:
      filters: output channels (must equal the input channels if depthwise).
      kernel_size: odd square kernel side.
      strides: 1 or 2.
      padding: symmetric zero padding in pixels (PyTorch's `padding`).
      dilation_rate: kernel dilation.
      depthwise: one filter per input channel (PyTorch `groups=C_in`).
      use_bias: add a bias.
      weight_norm: apply weight normalisation (else the raw kernel is used).
      gain_init_scale: multiplies the initial gain (flows use 0.1).
    """

    def __init__(self, filters, kernel_size, strides=1, padding=0,
                 dilation_rate=1, depthwise=False, use_bias=True,
                 weight_norm=True, gain_init_scale=1.0, **kwargs):
        super().__init__(**kwargs)
        if filters < 1 or kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"filters={filters}, kernel_size={kernel_size}: "
                             "expected filters >= 1 and an odd kernel size.")
        if strides not in (1, 2):
            raise ValueError(f"strides={strides!r}; expected 1 or 2.")
        if padding < 0 or dilation_rate < 1:
            raise ValueError(f"padding={padding}, dilation_rate="
                             f"{dilation_rate}: expected >= 0 and >= 1.")
        if gain_init_scale <= 0:
            raise ValueError(f"gain_init_scale={gain_init_scale}; expected > 0.")
        self.filters = filters
        self.kernel_size = kernel_size
        self.strides = strides
        self.padding = padding
        self.dilation_rate = dilation_rate
        self.depthwise = depthwise
        self.use_bias = use_bias
        self.weight_norm = weight_norm
        self.gain_init_scale = gain_init_scale

    # A subclass may return a 0/1 array shaped like the kernel (masked convs).
    def kernel_mask(self, in_channels):
        del in_channels
        return None

    def build(self, input_shape):
        in_channels = input_shape[-1]
        k = self.kernel_size
        if self.depthwise:
            if in_channels != self.filters:
                raise ValueError(
                    f"{self.name}: depthwise conv needs filters == input "
                    f"channels, got {self.filters} and {in_channels}.")
            shape = (k, k, in_channels, 1)
            fan_in = k * k
        else:
            shape = (k, k, in_channels, self.filters)
            fan_in = in_channels * k * k
        bound = 1.0 / math.sqrt(fan_in)
        mask = self.kernel_mask(in_channels)
        self._mask = None if mask is None else tf.constant(mask, tf.float32)
        # Weight normalisation runs in float32 (autocast off); `call` casts
        # the effective kernel to the compute dtype.
        self.kernel = self.add_weight(shape=shape,
                                      initializer=_pytorch_uniform(bound),
                                      name="kernel", autocast=False)
        if self.use_bias:
            self.bias = self.add_weight(shape=(self.filters,),
                                        initializer=_pytorch_uniform(bound),
                                        name="bias", autocast=False)
        if self.weight_norm:
            scale = self.gain_init_scale

            def init_gain(shape, dtype=None):
                norm = tf.reshape(self._kernel_norm(self._masked_kernel()),
                                  shape)
                return tf.math.log(norm + LOG_WEIGHT_NORM_INIT_EPS) + \
                    math.log(scale)

            self.log_weight_norm = self.add_weight(
                shape=(self.filters,), initializer=init_gain,
                name="log_weight_norm", autocast=False)

    @property
    def _norm_axes(self):
        # Everything except the output-channel axis of the Keras layout.
        return (0, 1, 3) if self.depthwise else (0, 1, 2)

    def _masked_kernel(self):
        kernel = tf.convert_to_tensor(self.kernel)
        if self._mask is not None:
            kernel = kernel * self._mask
        return kernel

    def _kernel_norm(self, kernel):
        return tf.sqrt(tf.reduce_sum(tf.square(kernel), axis=self._norm_axes,
                                     keepdims=True))

    def effective_kernel(self):
        """The kernel the convolution uses (masked and weight-normalised)."""
        kernel = self._masked_kernel()
        if not self.weight_norm:
            return kernel
        gain_shape = (1, 1, -1, 1) if self.depthwise else (1, 1, 1, -1)
        return weight_normalize(kernel, self.log_weight_norm, self._norm_axes,
                                gain_shape)

    def spectral_matrix(self):
        """Effective kernel as [out, in/groups * kh * kw] for spectral reg."""
        kernel = self.effective_kernel()
        perm = (2, 0, 1, 3) if self.depthwise else (3, 0, 1, 2)
        rows = self.filters
        return tf.reshape(tf.transpose(kernel, perm), (rows, -1))

    def transposed_spectral_matrix(self):
        """The transpose of `spectral_matrix()`, [in/groups * kh * kw, out].

        A reshape of the effective kernel, so no copy: the kernel's layout
        [kh, kw, in/groups, out] already orders the columns of
        `spectral_matrix()` as (kh, kw, in/groups).
        """
        return tf.reshape(self.effective_kernel(), (-1, self.filters))

    def _padding_arg(self):
        span = self.dilation_rate * (self.kernel_size - 1)
        if self.padding == 0:
            return "VALID"
        if self.strides == 1 and 2 * self.padding == span:
            return "SAME"  # identical to symmetric padding at stride 1
        p = self.padding
        return [[0, 0], [p, p], [p, p], [0, 0]]

    def folded_kernel_and_bias(self, scale, shift):
        """Kernel and bias of this conv followed by `y * scale + shift`.

        Folds a per-output-channel affine map (an inference-mode BN) into
        the convolution; exact for any padding or stride.
        """
        gain_shape = (1, 1, -1, 1) if self.depthwise else (1, 1, 1, -1)
        kernel = self.effective_kernel() * tf.reshape(scale, gain_shape)
        bias = shift if not self.use_bias else self.bias * scale + shift
        return kernel, bias

    def call(self, inputs):
        return self.convolve(inputs, self.effective_kernel(),
                             self.bias if self.use_bias else None)

    def convolve(self, inputs, kernel, bias=None, padding=None):
        """This layer's convolution with a given kernel and optional bias.

        `padding` overrides the layer's own (a kernel of another shape may
        need another one).
        """
        kernel = tf.cast(kernel, inputs.dtype)
        padding = self._padding_arg() if padding is None else padding
        dilations = (self.dilation_rate, self.dilation_rate)
        if self.depthwise and padding == "SAME" and \
                self.dilation_rate == 1 and None not in inputs.shape[1:3]:
            y = depthwise_conv2d_same(inputs, kernel)
        elif self.depthwise:
            if isinstance(padding, list):
                # Explicit paddings on DepthwiseConv2dNative abort the process
                # in Grappler's layout pass inside tf.function (TF 2.21):
                # pad first, then a 'VALID' convolution.
                inputs = tf.pad(inputs, padding)
                padding = "VALID"
            y = tf.nn.depthwise_conv2d(
                inputs, kernel, (1, self.strides, self.strides, 1), padding,
                dilations=dilations)
        else:
            y = tf.nn.conv2d(inputs, kernel, self.strides, padding,
                             dilations=dilations)
        if bias is not None:
            y = tf.nn.bias_add(y, tf.cast(bias, y.dtype))
        return y

    def compute_output_shape(self, input_shape):
        size = input_shape[1]
        if size is not None:
            span = self.dilation_rate * (self.kernel_size - 1)
            size = (size + 2 * self.padding - span - 1) // self.strides + 1
        return (input_shape[0], size, size, self.filters)

    def get_config(self):
        config = super().get_config()
        config.update(filters=self.filters, kernel_size=self.kernel_size,
                      strides=self.strides, padding=self.padding,
                      dilation_rate=self.dilation_rate,
                      depthwise=self.depthwise, use_bias=self.use_bias,
                      weight_norm=self.weight_norm,
                      gain_init_scale=self.gain_init_scale)
        return config


def upsample_nearest(x):
    """Nearest-neighbour x2 up-sampling (NHWC)."""
    return tf.repeat(tf.repeat(x, 2, axis=1), 2, axis=2)


@keras.saving.register_keras_serializable(package="nvae_tf")
class ConvBNSwish(keras.layers.Layer):
    """Conv (no weight norm, no bias) -> BN -> Swish (official ConvBNSwish).

    Args:
      filters: output channels.
      kernel_size: odd kernel side; padding is `dilation * (k - 1) // 2`.
      strides: 1 or 2.
      depthwise: depthwise convolution (official `groups = channels`).
      dilation_rate: kernel dilation.
      sync_batchnorm: synchronise BN statistics across replicas.
    """

    def __init__(self, filters, kernel_size=3, strides=1, depthwise=False,
                 dilation_rate=1, sync_batchnorm=False, **kwargs):
        super().__init__(**kwargs)
        self.filters = filters
        self.kernel_size = kernel_size
        self.strides = strides
        self.depthwise = depthwise
        self.dilation_rate = dilation_rate
        self.sync_batchnorm = sync_batchnorm
        self.conv = WeightNormConv2D(
            filters, kernel_size, strides=strides,
            padding=dilation_rate * (kernel_size - 1) // 2,
            dilation_rate=dilation_rate, depthwise=depthwise, use_bias=False,
            weight_norm=False, name="conv", dtype=self.dtype_policy)
        self.bn = BatchNorm(activation="swish", synchronized=sync_batchnorm,
                            name="bn", dtype=self.dtype_policy)

    def build(self, input_shape):
        self.conv.build(input_shape)
        self.bn.build(self.conv.compute_output_shape(input_shape))

    def call(self, inputs, training=None):
        if not training:
            return self.inference(inputs)
        return self.bn(self.conv(inputs), training=training)

    def inference(self, inputs):
        """Inference mode with the BN folded into the convolution."""
        kernel, bias = self.conv.folded_kernel_and_bias(
            *self.bn.inference_affine())
        return tf.nn.silu(self.conv.convolve(inputs, kernel, bias))

    def compute_output_shape(self, input_shape):
        return self.conv.compute_output_shape(input_shape)

    def get_config(self):
        config = super().get_config()
        config.update(filters=self.filters, kernel_size=self.kernel_size,
                      strides=self.strides, depthwise=self.depthwise,
                      dilation_rate=self.dilation_rate,
                      sync_batchnorm=self.sync_batchnorm)
        return config


@keras.saving.register_keras_serializable(package="nvae_tf")
class BNSwishConv(keras.layers.Layer):
    """BN -> Swish -> [nearest x2 up] -> weight-normalised conv with bias.

    Args:
      filters: output channels.
      kernel_size: odd kernel side (official: 3).
      strides: 1, or 2 for a down-sampling conv.
      upsample: nearest x2 up-sampling before the conv (strides must be 1).
      dilation_rate: 1 (`res_bnswish`) or 2 (`res_bnswish5`); padding keeps
        the size at stride 1.
      sync_batchnorm: synchronise BN statistics across replicas.
    """

    def __init__(self, filters, kernel_size=3, strides=1, dilation_rate=1,
                 sync_batchnorm=False, upsample=False, **kwargs):
        super().__init__(**kwargs)
        if strides not in (1, 2) or (upsample and strides != 1):
            raise ValueError(f"strides={strides!r}, upsample={upsample!r}; "
                             "expected strides 1 or 2, and 1 to upsample.")
        self.filters = filters
        self.kernel_size = kernel_size
        self.strides = strides
        self.upsample = upsample
        self.dilation_rate = dilation_rate
        self.sync_batchnorm = sync_batchnorm
        self.bn = BatchNorm(activation="swish", synchronized=sync_batchnorm,
                            name="bn", dtype=self.dtype_policy)
        self.conv = WeightNormConv2D(
            filters, kernel_size, strides=strides,
            padding=dilation_rate * (kernel_size - 1) // 2,
            dilation_rate=dilation_rate, use_bias=True, weight_norm=True,
            name="conv", dtype=self.dtype_policy)

    def build(self, input_shape):
        self.bn.build(input_shape)
        shape = list(input_shape)
        if self.upsample and shape[1] is not None:
            shape[1], shape[2] = 2 * shape[1], 2 * shape[2]
        self.conv.build(tuple(shape))

    def call(self, inputs, training=None):
        y = self.bn(inputs, training=training)
        if self.upsample:
            y = upsample_nearest(y)
        return self.conv(y)

    def inference(self, inputs, normalized=False, next_bn=None):
        """Inference mode; BNs folded where that is exact.

        Args:
          inputs: the unit's input.
          normalized: `inputs` already had this unit's BN applied (folded
            into the previous convolution): only Swish remains.
          next_bn: a `BatchNorm` applied to this unit's output; it is folded
            into the convolution.
        """
        y = tf.nn.silu(inputs) if normalized else \
            self.bn(inputs, training=False)
        if self.upsample:
            y = upsample_nearest(y)
        if next_bn is None:
            return self.conv(y)
        kernel, bias = self.conv.folded_kernel_and_bias(
            *next_bn.inference_affine())
        return self.conv.convolve(y, kernel, bias)

    def compute_output_shape(self, input_shape):
        size = input_shape[1]
        if size is not None:
            size = size * 2 if self.upsample else \
                (size - 1) // self.strides + 1
        return (input_shape[0], size, size, self.filters)

    def get_config(self):
        config = super().get_config()
        config.update(filters=self.filters, kernel_size=self.kernel_size,
                      strides=self.strides, dilation_rate=self.dilation_rate,
                      sync_batchnorm=self.sync_batchnorm,
                      upsample=self.upsample)
        return config
