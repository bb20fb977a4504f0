"""Autoregressive shift flows on the latent groups (official `num_nf`).

Each `num_nf` unit is a `PairedAutoregressiveFlow`: two volume-preserving
cells z <- z - mu(z), the second one with the reversed raster order. mu is a
masked inverted-residual network, causal in raster order over positions and
in channel order at the same position, so the Jacobian is unit triangular and
log|det| = 0 (Vahdat & Kautz, 2020, section 3.2 and the official code).
"""


import keras
import numpy as np
import tensorflow as tf

from nvae_tf.layers.conv import WeightNormConv2D

FLOW_EXPANSION = 6  # hidden width of the mu network = 6 * latent channels
FLOW_KERNEL = 5  # depthwise kernel of the mu network
MU_GAIN_INIT_SCALE = 0.1  # official: keeps mu near 0 at initialisation


def autoregressive_mask(kernel_size, in_channels, out_channels, depthwise,
                        zero_diag, mirror):
    """0/1 mask in Keras kernel layout for a causal (raster, channel) conv.

    Args:
      kernel_size: odd kernel side k.
      in_channels, out_channels: channel counts of the convolution.
      depthwise: one filter per channel (layout [k, k, C, 1]).
      zero_diag: a channel may not see itself at the centre tap.
      mirror: reverse the spatial raster order (channel order unchanged).

    Returns:
      float32 array [k, k, in, out] (or [k, k, C, 1] if depthwise).
    """
    m = (kernel_size - 1) // 2
    if depthwise:
        centre = np.full((in_channels, 1), 0.0 if zero_diag else 1.0)
    else:
        centre = np.zeros((in_channels, out_channels))
        if out_channels >= in_channels:
            ratio = out_channels // in_channels
            for i in range(in_channels):
                seen = i if zero_diag else i + 1
                centre[:seen, i * ratio:(i + 1) * ratio] = 1.0
        else:
            ratio = in_channels // out_channels
            for o in range(out_channels):
                seen = o * ratio if zero_diag else (o + 1) * ratio
                centre[:seen, o] = 1.0
    mask = np.zeros((kernel_size, kernel_size) + centre.shape, np.float32)
    mask[:m] = 1.0  # rows above the centre
    mask[m, :m] = 1.0  # left of the centre on its row
    mask[m, m] = centre
    if mirror:
        mask = mask[::-1, ::-1].copy()
    return mask


@keras.saving.register_keras_serializable(package="nvae_tf")
class MaskedConv2D(WeightNormConv2D):
    """Weight-normalised conv whose kernel is masked before normalisation."""

    def __init__(self, filters, kernel_size, zero_diag=False, mirror=False,
                 **kwargs):
        super().__init__(filters, kernel_size,
                         padding=kwargs.pop("padding", (kernel_size - 1) // 2),
                         **kwargs)
        self.zero_diag = zero_diag
        self.mirror = mirror

    def kernel_mask(self, in_channels):
        return autoregressive_mask(self.kernel_size, in_channels, self.filters,
                                   self.depthwise, self.zero_diag, self.mirror)

    def convolve(self, inputs, kernel, bias=None):
        """The masked convolution without its all-zero kernel rows.

        Rows below the centre (above it if mirrored) are masked out, so a
        k x k kernel is a (k + 1) / 2 x k one with one-sided padding: the
        same output for about half the multiply-adds. Depthwise convolutions
        keep the full kernel (their fast 'SAME' gradient needs it).
        """
        m = (self.kernel_size - 1) // 2
        if self.depthwise or m == 0 or self.strides != 1 or \
                self.dilation_rate != 1:
            return super().convolve(inputs, kernel, bias)
        rows = kernel[m:] if self.mirror else kernel[:m + 1]
        vertical = [0, m] if self.mirror else [m, 0]
        return super().convolve(inputs, rows, bias,
                                padding=[[0, 0], vertical, [m, m], [0, 0]])

    def get_config(self):
        config = super().get_config()
        config.update(zero_diag=self.zero_diag, mirror=self.mirror)
        return config


@keras.saving.register_keras_serializable(package="nvae_tf")
class AutoregressiveShiftCell(keras.layers.Layer):
    """z <- z - mu(z) with a masked inverted-residual mu network.

    mu = conv1x1(elu(elu(dw5x5(elu(conv3x3(z)))))): the official block ends
    with an ELU and its mu head starts with one, so ELU is applied twice.
    """

    def __init__(self, mirror=False, **kwargs):
        super().__init__(**kwargs)
        self.mirror = mirror

    def build(self, z_shape):
        latent = z_shape[-1]
        hidden = FLOW_EXPANSION * latent
        kw = dict(mirror=self.mirror, dtype=self.dtype_policy)
        self.conv_in = MaskedConv2D(hidden, 3, zero_diag=True,
                                    use_bias=False, name="conv_in", **kw)
        self.conv_depthwise = MaskedConv2D(hidden, FLOW_KERNEL,
                                           depthwise=True, use_bias=False,
                                           name="conv_depthwise", **kw)
        self.conv_mu = MaskedConv2D(latent, 1, use_bias=True,
                                    gain_init_scale=MU_GAIN_INIT_SCALE,
                                    name="conv_mu", **kw)
        hidden_shape = tuple(z_shape[:-1]) + (hidden,)
        self.conv_in.build(z_shape)
        self.conv_depthwise.build(hidden_shape)
        self.conv_mu.build(hidden_shape)

    def call(self, z):
        h = tf.nn.elu(self.conv_in(z))
        h = tf.nn.elu(self.conv_depthwise(h))
        mu = self.conv_mu(tf.nn.elu(h))
        return z - mu

    def compute_output_shape(self, z_shape):
        return z_shape

    def get_config(self):
        config = super().get_config()
        config.update(mirror=self.mirror)
        return config


@keras.saving.register_keras_serializable(package="nvae_tf")
class PairedAutoregressiveFlow(keras.layers.Layer):
    """Two shift cells, raster order then reversed order (one `num_nf` unit).

    Returns the transformed z and log|det dz'/dz|, which is 0 (volume
    preserving), shaped like z so that flows with a log-det could be added.
    """

    def build(self, z_shape):
        self.cell1 = AutoregressiveShiftCell(mirror=False, name="cell1",
                                             dtype=self.dtype_policy)
        self.cell2 = AutoregressiveShiftCell(mirror=True, name="cell2",
                                             dtype=self.dtype_policy)
        self.cell1.build(z_shape)
        self.cell2.build(z_shape)

    def call(self, z):
        z = self.cell2(self.cell1(z))
        return z, tf.zeros_like(z)

    def compute_output_shape(self, z_shape):
        return z_shape, z_shape


