"""Cells that merge the encoder and decoder paths (official combiner cells)."""

import keras
import tensorflow as tf

from nvae_tf.layers.conv import WeightNormConv2D


@keras.saving.register_keras_serializable(package="nvae_tf")
class EncoderCombinerCell(keras.layers.Layer):
    """Posterior features: encoder feature + 1x1 conv(decoder state).

    Called as `cell(encoder_feature, decoder_state)`; the output has the
    encoder feature's channels.
    """

    def build(self, encoder_feature_shape, decoder_state_shape):
        self.conv = WeightNormConv2D(encoder_feature_shape[-1], 1,
                                     name="conv", dtype=self.dtype_policy)
        self.conv.build(decoder_state_shape)

    def call(self, encoder_feature, decoder_state):
        return encoder_feature + self.conv(decoder_state)

    def compute_output_shape(self, encoder_feature_shape,
                             decoder_state_shape):
        return encoder_feature_shape


@keras.saving.register_keras_serializable(package="nvae_tf")
class DecoderCombinerCell(keras.layers.Layer):
    """Merges a latent sample into the decoder: 1x1 conv(concat[state, z])."""

    def build(self, decoder_state_shape, z_shape):
        channels = decoder_state_shape[-1]
        self.conv = WeightNormConv2D(channels, 1, name="conv",
                                     dtype=self.dtype_policy)
        self.conv.build(tuple(decoder_state_shape[:-1]) +
                        (channels + z_shape[-1],))

    def call(self, decoder_state, z):
        z = tf.cast(z, decoder_state.dtype)
        return self.conv(tf.concat([decoder_state, z], axis=-1))

    def compute_output_shape(self, decoder_state_shape, z_shape):
        return decoder_state_shape
