"""Batch normalisation with the official NVAE (PyTorch) conventions.

Keras' `BatchNormalization` updates its moving variance with the biased batch
variance; PyTorch (and so the official NVAE) uses the unbiased one. NVAE also
fuses BN with Swish and synchronises statistics across GPUs. This layer does
all three: it normalises with the biased variance, keeps PyTorch's running
statistics, and with `synchronized=True` reduces the batch moments over all
replicas of a `tf.distribute` strategy.
"""

import keras
import tensorflow as tf

from nvae_tf.layers.remat import recomputing

BN_MOMENTUM = 0.95  # Keras convention; PyTorch/NVAE momentum 0.05.
BN_EPSILON = 1e-5

ACTIVATIONS = (None, "swish")


def _normalize(x, gamma, beta, mean, variance, epsilon):
    """x normalised with the given statistics (biased variance), fused."""
    y, *_ = tf.raw_ops.FusedBatchNormV3(
        x=x, scale=gamma, offset=beta, mean=mean, variance=variance,
        epsilon=epsilon, is_training=False)
    return y


def _biased(unbiased, count):
    """The biased variance of `count` values from the unbiased one."""
    return unbiased * tf.maximum(count - 1.0, 0.0) / count


def _swish_backprop(d_out, y):
    """The gradient at Swish's input y from the gradient at its output."""
    sig = tf.sigmoid(y)
    return d_out * sig * (1.0 + y * (1.0 - sig))


def _batch_norm_swish_training(x, gamma, beta, epsilon):
    """Training-mode BN (batch statistics) then Swish, keeping only `x`.

    Returns (Swish(BN(x)), batch mean, unbiased batch variance). The
    gradient recomputes BN(x) from `x` and the batch statistics instead of
    keeping it from the forward pass, as the official fused BN-Swish does:
    one tensor less per pair held for the backward pass (its memory saving:
    docs/performance.md) for one inference-mode BN pass in the backward pass. No gradient flows back
    from the statistics outputs (they only feed the moving averages).
    """

    @tf.custom_gradient
    def forward(x, gamma, beta):
        if tf.executing_eagerly():
            # An eager tape records a custom gradient's forward ops too and
            # would keep BN(x) for Swish; the forward's inputs cut them off.
            x, gamma, beta = [tf.stop_gradient(t) for t in (x, gamma, beta)]
        y, mean, unbiased, *reserve = tf.raw_ops.FusedBatchNormV3(
            x=x, scale=gamma, offset=beta, mean=tf.zeros([0]),
            variance=tf.zeros([0]), epsilon=epsilon, is_training=True)

        def grad(d_out, *unused_statistics_grads):
            count = tf.cast(tf.reduce_prod(tf.shape(x)[:-1]), tf.float32)
            biased = _biased(unbiased, count)
            # Not before the backward pass reaches this layer: the executor
            # would run it as soon as x is ready and keep the result.
            with tf.control_dependencies([d_out]):
                y = _normalize(x, gamma, beta, mean, biased, epsilon)
            d_y = _swish_backprop(d_out, y)
            d_x, d_gamma, d_beta, *_ = tf.raw_ops.FusedBatchNormGradV3(
                y_backprop=d_y, x=x, scale=gamma, reserve_space_1=reserve[0],
                reserve_space_2=reserve[1], reserve_space_3=reserve[2],
                epsilon=epsilon, is_training=True)
            return d_x, d_gamma, d_beta

        return (tf.nn.silu(y), mean, unbiased), grad

    return forward(x, gamma, beta)


@keras.saving.register_keras_serializable(package="nvae_tf")
class BatchNorm(keras.layers.Layer):
    """Batch normalisation over N, H, W of NHWC input, optionally + Swish.

    Args:
      activation: `None` or `"swish"` (the official fused BN-Swish).
      synchronized: reduce batch moments across replicas (official SyncBN).
      momentum: Keras-style momentum of the moving statistics.
      epsilon: added to the variance.
    """

    def __init__(self, activation=None, synchronized=False,
                 momentum=BN_MOMENTUM, epsilon=BN_EPSILON, **kwargs):
        super().__init__(**kwargs)
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation={activation!r}; expected one of "
                             f"{ACTIVATIONS}.")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum={momentum!r}; expected [0, 1).")
        self.activation = activation
        self.synchronized = synchronized
        self.momentum = momentum
        self.epsilon = epsilon

    def build(self, input_shape):
        channels = input_shape[-1]
        # autocast=False: statistics and affine parameters stay float32
        # under a mixed-precision policy (the fused kernel needs them so).
        self.gamma = self.add_weight(shape=(channels,), initializer="ones",
                                     name="gamma", autocast=False)
        self.beta = self.add_weight(shape=(channels,), initializer="zeros",
                                    name="beta", autocast=False)
        self.moving_mean = self.add_weight(
            shape=(channels,), initializer="zeros", trainable=False,
            aggregation="mean", name="moving_mean", autocast=False)
        self.moving_variance = self.add_weight(
            shape=(channels,), initializer="ones", trainable=False,
            aggregation="mean", name="moving_variance", autocast=False)

    def _batch_moments(self, x):
        """Mean, biased and unbiased variance over N, H, W (all replicas)."""
        count = tf.cast(tf.reduce_prod(tf.shape(x)[:-1]), tf.float32)
        total = tf.reduce_sum(x, axis=(0, 1, 2))
        total_sq = tf.reduce_sum(tf.square(x), axis=(0, 1, 2))
        ctx = tf.distribute.get_replica_context()
        if ctx is not None and ctx.num_replicas_in_sync > 1:
            total, total_sq, count = ctx.all_reduce(
                tf.distribute.ReduceOp.SUM, [total, total_sq, count])
        mean = total / count
        variance = tf.maximum(total_sq / count - tf.square(mean), 0.0)
        unbiased = variance * count / tf.maximum(count - 1.0, 1.0)
        return mean, variance, unbiased

    def call(self, inputs, training=None):
        x = tf.cast(inputs, tf.float32)
        gamma = tf.convert_to_tensor(self.gamma)
        beta = tf.convert_to_tensor(self.beta)
        fused_swish = False  # Swish applied with the statistics
        if training:
            ctx = tf.distribute.get_replica_context()
            if self.synchronized and ctx is not None \
                    and ctx.num_replicas_in_sync > 1:
                mean, variance, unbiased = self._batch_moments(x)
                y = tf.nn.batch_normalization(x, mean, variance, beta, gamma,
                                              self.epsilon)
            elif self.activation == "swish":
                y, mean, unbiased = _batch_norm_swish_training(
                    x, gamma, beta, self.epsilon)
                fused_swish = True
            else:
                # The fused kernel returns the Bessel-corrected variance, as
                # PyTorch uses for its running statistics.
                y, mean, unbiased = tf.compat.v1.nn.fused_batch_norm(
                    x, gamma, beta, epsilon=self.epsilon, is_training=True)
            self._update_moving_statistics(mean, unbiased)
        else:
            y, _, _ = tf.compat.v1.nn.fused_batch_norm(
                x, gamma, beta, mean=self.moving_mean,
                variance=self.moving_variance, epsilon=self.epsilon,
                is_training=False)
        if self.activation == "swish" and not fused_swish:
            y = tf.nn.silu(y)
        return tf.cast(y, self.compute_dtype)

    def _update_moving_statistics(self, mean, unbiased):
        if recomputing():  # the forward pass already updated them
            return
        decay = 1.0 - self.momentum
        self.moving_mean.assign(self.moving_mean * self.momentum +
                                decay * tf.stop_gradient(mean))
        self.moving_variance.assign(self.moving_variance * self.momentum +
                                    decay * tf.stop_gradient(unbiased))

    def inference_affine(self):
        """(scale, shift) with inference-mode BN(x) = x * scale + shift."""
        scale = self.gamma * tf.math.rsqrt(self.moving_variance + self.epsilon)
        return scale, self.beta - self.moving_mean * scale

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(activation=self.activation,
                      synchronized=self.synchronized,
                      momentum=self.momentum, epsilon=self.epsilon)
        return config
