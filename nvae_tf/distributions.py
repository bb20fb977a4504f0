"""Latent and image distributions of NVAE (Vahdat & Kautz, NeurIPS 2020).

Latents are diagonal Normals with soft-clamped parameters (`latent_normal`).
Images use one of three heads sharing one interface (`pixel_log_prob` ->
[B, H, W], `log_prob` -> [B], `mean`, `sample_with_temperature`):
`DiscretizedLogisticMixture` (colour or grayscale data, PixelCNN++ coupling),
`BernoulliImage` (binary data) and `NormalImage` (the official NormalDecoder).
Images are NHWC with pixels in [0, 1]; image log-probabilities are computed
in float32 whatever the dtype of the decoder output.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

tfd = tfp.distributions

# Latent Normals: loc and log-scale are soft-clamped to (-5, 5), and this
# floor is added to exp(log-scale), so the top prior N(0, 0) has scale 1.01.
LATENT_SOFT_CLAMP = 5.0
MIN_LATENT_SCALE = 0.01
# Hard lower clamp on the mixture's log-scales.
LOG_SCALE_MIN = -7.0
# Edge tests on y = 2x - 1. Official quirk kept for parity: the upper test is
# `y > 0.99`, not `y > 1 - 1/max_val`, so for 8-bit data pixel 254
# (y = 253/255 = 0.992) also gets the open upper tail [253.5, inf).
LOWER_EDGE = -0.999
UPPER_EDGE = 0.99
# Sampling uniforms lie in this open range so that both logs stay finite.
UNIFORM_MIN = 1e-5
UNIFORM_MAX = 1.0 - 1e-5
# A bin of probability <= DELTA_THRESHOLD is scored by its centre density
# times the bin width; PROB_FLOOR keeps log() finite in the other branch.
PROB_FLOOR = 1e-10
DELTA_THRESHOLD = 1e-5

IMAGE_DISTRIBUTIONS = ("bernoulli", "logistic_mixture", "normal")


def soft_clamp(x, limit: float = LATENT_SOFT_CLAMP):
    """Smoothly clamps `x` to (-limit, limit): `limit * tanh(x / limit)`."""
    return limit * tf.tanh(x / limit)


def latent_normal(raw_loc, raw_log_scale, temperature=1.0) -> tfd.Normal:
    """The official `Normal(mu, log_sigma, temp)`, element-wise.

    loc = soft_clamp(raw_loc); scale = (exp(soft_clamp(raw_log_scale)) +
    MIN_LATENT_SCALE) * temperature, t applied after the offset. The result
    keeps the inputs' dtype (callers cast to float32 under mixed precision).

    Args:
        raw_loc: raw network output for the mean (mu), any shape.
        raw_log_scale: raw network output for log-sigma, same shape.
        temperature: float or tensor broadcastable to the scale.
    """
    scale = tf.exp(soft_clamp(raw_log_scale)) + MIN_LATENT_SCALE
    return tfd.Normal(loc=soft_clamp(raw_loc), scale=scale * temperature)


def _stateless_seed(seed):
    """None stays None; a Python int becomes [seed, 0]; else int32 [2]."""
    if seed is None:
        return None
    if isinstance(seed, (int, np.integer)):
        seed = [seed, 0]
    return tf.cast(tf.convert_to_tensor(seed), tf.int32)


def _uniform(shape, seed):
    """U(UNIFORM_MIN, UNIFORM_MAX), stateless (exportable) when seeded."""
    if seed is None:
        return tf.random.uniform(shape, UNIFORM_MIN, UNIFORM_MAX)
    return tf.random.stateless_uniform(shape, seed, UNIFORM_MIN, UNIFORM_MAX)


def _to_unit_interval(y):
    """Clips to [-1, 1] and maps to [0, 1]."""
    return tf.clip_by_value(y, -1.0, 1.0) / 2.0 + 0.5


def _check_channels(logits, expected: int, what: str):
    """Raises ValueError unless `logits` has `expected` last-axis channels."""
    channels = logits.shape[-1]
    if channels is not None and channels != expected:
        raise ValueError(
            f"{what} expects {expected} channels in the last axis of "
            f"`logits`. Received: logits.shape={logits.shape}")


def _couple_sequentially(locs, coeffs):
    """Sequential RGB coupling with clipping (sampling and mean).

    `locs` [..., C] are per-colour locations, `coeffs` [..., 3] the tanh'd
    coefficients or None (C = 1). Returns [..., C] in [-1, 1]:
    R = clip(l_R), G = clip(l_G + a_0 R), B = clip(l_B + a_1 R + a_2 G).
    """
    if coeffs is None:
        return tf.clip_by_value(locs, -1.0, 1.0)
    red = tf.clip_by_value(locs[..., 0], -1.0, 1.0)
    green = tf.clip_by_value(locs[..., 1] + coeffs[..., 0] * red, -1.0, 1.0)
    blue = tf.clip_by_value(
        locs[..., 2] + coeffs[..., 1] * red + coeffs[..., 2] * green,
        -1.0, 1.0)
    return tf.stack([red, green, blue], axis=-1)


def _discretized_logistic_log_prob(y, loc, log_scale, num_bits: int):
    """Element-wise log-mass of the bin of data `y` in [-1, 1].

    `loc` and `log_scale` (clamped) parametrise one logistic; bins have
    half-width 1 / (2**num_bits - 1), edge bins are open-ended.
    """
    max_val = 2.0**num_bits - 1.0
    centered = y - loc
    inv_scale = tf.exp(-log_scale)
    plus = inv_scale * (centered + 1.0 / max_val)
    minus = inv_scale * (centered - 1.0 / max_val)
    log_cdf_plus = plus - tf.nn.softplus(plus)  # log sigmoid(plus)
    log_one_minus_cdf_minus = -tf.nn.softplus(minus)
    delta = tf.sigmoid(plus) - tf.sigmoid(minus)
    mid = inv_scale * centered
    log_pdf_mid = mid - log_scale - 2.0 * tf.nn.softplus(mid)
    log_bin = tf.where(delta > DELTA_THRESHOLD,
                       tf.math.log(tf.maximum(delta, PROB_FLOOR)),
                       log_pdf_mid - np.log(max_val / 2.0))
    return tf.where(
        y < LOWER_EDGE, log_cdf_plus,
        tf.where(y > UPPER_EDGE, log_one_minus_cdf_minus, log_bin))


class _PixelwiseImage:
    """Mixin: `log_prob` is `pixel_log_prob` summed over H and W."""

    def log_prob(self, x):
        """Log-likelihood of images `x` [B, H, W, C] in [0, 1] -> [B]."""
        return tf.reduce_sum(self.pixel_log_prob(x), axis=[1, 2])


class DiscretizedLogisticMixture(tfd.Distribution):
    """Discretized mixture of logistics over images (official DiscMixLogistic).

    Layout of `logits` [B, H, W, K], M = `num_mixtures` (official): `[0, M)`
    mixture logits shared by a pixel's colours, then for colour c the block
    `M + block * c + [0, block)` of [M locs, M log-scales, M raw coupling
    coefficients] (C = 3: block = 3M, K = 10M). For C = 1 there is no
    coupling: block = [M locs, M log-scales], K = 3M.
    Batch shape [B], event shape [H, W, C].

    Args:
        logits: [B, H, W, K] raw image-head output, cast to float32.
        num_mixtures: M, the number of logistic components.
        num_bits: bit depth of the data (8, or 5 for 5-bit datasets).
        num_channels: C, 3 (RGB with coupling) or 1 (grayscale).
        validate_args, allow_nan_stats, name: as in `tfd.Distribution`.

    Raises:
        ValueError: if `num_channels` is not 1 or 3, or K does not match.
    """

    def __init__(self, logits, num_mixtures: int, num_bits: int = 8,
                 num_channels: int = 3, validate_args: bool = False,
                 allow_nan_stats: bool = True,
                 name: str = "DiscretizedLogisticMixture"):
        parameters = dict(locals())
        if num_channels not in (1, 3):
            raise ValueError(
                f"`num_channels` must be 1 or 3. Received: {num_channels}")
        with tf.name_scope(name) as name:
            self._logits = tf.cast(tf.convert_to_tensor(logits), tf.float32)
            self._num_mixtures = int(num_mixtures)
            self._num_bits = int(num_bits)
            self._num_channels = int(num_channels)
            block = (3 if num_channels == 3 else 2) * self._num_mixtures
            _check_channels(
                self._logits, self._num_mixtures + num_channels * block,
                f"A {num_mixtures}-component logistic mixture over "
                f"{num_channels} channel(s)")
            super().__init__(
                dtype=tf.float32,
                reparameterization_type=tfd.NOT_REPARAMETERIZED,
                validate_args=validate_args, allow_nan_stats=allow_nan_stats,
                parameters=parameters, name=name)

    @property
    def logits(self):
        """The raw decoder output [B, H, W, K], float32."""
        return self._logits

    def _batch_shape(self):
        return self._logits.shape[:1]

    def _event_shape(self):
        return self._logits.shape[1:3].concatenate([self._num_channels])

    def _batch_shape_tensor(self):
        return tf.shape(self._logits)[:1]

    def _event_shape_tensor(self):
        return tf.concat([tf.shape(self._logits)[1:3], [self._num_channels]],
                         axis=0)

    def _split_params(self):
        """Splits `logits` into mixture parameters (layout: class docstring).

        Returns:
            mixture_logits [B, H, W, M]; locs, clamped log_scales and tanh'd
            coeffs (None if C = 1), each [B, H, W, C, M].
        """
        # tf.split rather than strided slices: the gradient of a split is a
        # concat, that of a slice a scatter into a full-size zero tensor.
        m = self._num_mixtures
        mixture_logits, rest = tf.split(self._logits, [m, -1], axis=-1)
        per_colour = tf.reshape(  # colour-major: [B, H, W, C, block]
            rest, tf.concat([tf.shape(self._logits)[:3],
                             [self._num_channels, -1]], axis=0))
        if self._num_channels == 3:
            locs, log_scales, coeffs = tf.split(per_colour, 3, axis=-1)
            coeffs = tf.tanh(coeffs)
        else:
            (locs, log_scales), coeffs = tf.split(per_colour, 2, axis=-1), None
        log_scales = tf.maximum(log_scales, LOG_SCALE_MIN)
        return mixture_logits, locs, log_scales, coeffs

    def pixel_log_prob(self, x):
        """Log-probabilities [B, H, W] (nats) of pixels x [B, H, W, C].

        x is in [0, 1] on the 2**num_bits grid; colours are summed per
        component before the log-sum-exp over the mixture.
        """
        mixture_logits, locs, log_scales, coeffs = self._split_params()
        y = 2.0 * tf.cast(x, tf.float32) - 1.0  # [B, H, W, C]
        if coeffs is not None:  # data values shift G's and B's locations
            red, green = y[..., 0:1], y[..., 1:2]
            loc_r, loc_g, loc_b = tf.unstack(locs, axis=-2)
            coef_rg, coef_rb, coef_gb = tf.unstack(coeffs, axis=-2)
            locs = tf.stack([
                loc_r, loc_g + coef_rg * red,
                loc_b + coef_rb * red + coef_gb * green], axis=-2)
        log_probs = _discretized_logistic_log_prob(
            y[..., None], locs, log_scales, self._num_bits)  # [B,H,W,C,M]
        log_probs = (tf.reduce_sum(log_probs, axis=-2)
                     + tf.nn.log_softmax(mixture_logits, axis=-1))
        return tf.reduce_logsumexp(log_probs, axis=-1)

    _log_prob = _PixelwiseImage.log_prob  # [B, H, W] summed -> [B]

    def _sample_n(self, n, seed=None, temperature=1.0):
        """Draws [n, B, H, W, C] samples in [0, 1] as the official `sample`."""
        temperature = tf.convert_to_tensor(temperature, tf.float32)
        seed = _stateless_seed(seed)
        choice_seed, noise_seed = (
            (None, None) if seed is None
            else tf.unstack(tf.random.experimental.stateless_split(seed, 2)))
        mixture_logits, locs, log_scales, coeffs = self._split_params()
        # Gumbel-max choice of one component per pixel, sharpened by 1 / t.
        shape = tf.concat([[n], tf.shape(mixture_logits)], axis=0)
        gumbel = -tf.math.log(-tf.math.log(_uniform(shape, choice_seed)))
        component = tf.argmax(mixture_logits / temperature + gumbel, axis=-1)
        one_hot = tf.one_hot(component, self._num_mixtures)[..., None, :]

        def select(params):  # [B, H, W, C, M] -> [n, B, H, W, C]
            return tf.reduce_sum(params * one_hot, axis=-1)

        # Logistic noise. The official divides the scale by t: t < 1 adds
        # MORE noise.
        u = _uniform(tf.concat([shape[:-1], [self._num_channels]], axis=0),
                     noise_seed)
        noisy = select(locs) + (tf.exp(select(log_scales)) / temperature
                                * (tf.math.log(u) - tf.math.log(1.0 - u)))
        coeffs = None if coeffs is None else select(coeffs)
        return _to_unit_interval(_couple_sequentially(noisy, coeffs))

    def sample_with_temperature(self, temperature=1.0, seed=None):
        """One sample per image, [B, H, W, C] in [0, 1] (not on the grid).

        Args:
            temperature: t, float or scalar tensor. Component logits and
                logistic scales are both divided by t (official: t < 1
                sharpens the component choice but widens the noise).
            seed: None (stateful `tf.random.uniform`) or a stateless seed,
                an int32 [2] tensor/pair or a Python int used as [seed, 0].
        """
        return self._sample_n(1, seed=seed, temperature=temperature)[0]

    def _mean(self):
        """Official `mean()` (used for FID), [B, H, W, C] in [0, 1].

        Softmax-weighted locations and coefficients (scales ignored), then
        the sequential coupling with clipping: not the mixture's true mean.
        """
        mixture_logits, locs, _, coeffs = self._split_params()
        weights = tf.nn.softmax(mixture_logits, axis=-1)[..., None, :]
        if coeffs is not None:
            coeffs = tf.reduce_sum(weights * coeffs, axis=-1)
        return _to_unit_interval(_couple_sequentially(
            tf.reduce_sum(weights * locs, axis=-1), coeffs))


class BernoulliImage(_PixelwiseImage):
    """Independent Bernoulli pixels for binary images.

    Args:
        logits: [B, H, W, C] logits of p(pixel = 1), cast to float32.
        num_channels: C, checked against `logits` when given.
    """

    def __init__(self, logits, num_channels: int | None = None):
        self.logits = tf.cast(tf.convert_to_tensor(logits), tf.float32)
        if num_channels is not None:
            _check_channels(self.logits, num_channels, "A Bernoulli head")

    def pixel_log_prob(self, x):
        """`x log s(l) + (1 - x) log(1 - s(l))` summed over C -> [B, H, W]."""
        return -tf.reduce_sum(tf.nn.sigmoid_cross_entropy_with_logits(
            labels=tf.cast(x, tf.float32), logits=self.logits), axis=-1)

    def mean(self):
        """sigmoid(logits), [B, H, W, C]."""
        return tf.sigmoid(self.logits)

    def sample_with_temperature(self, temperature=1.0, seed=None):
        """Returns `mean()`, as the official code displays; ignores t, seed."""
        del temperature, seed
        return self.mean()


class NormalImage(_PixelwiseImage):
    """Continuous Gaussian pixels over y = 2x - 1 (official NormalDecoder).

    Args:
        logits: [B, H, W, 2C]: C raw means then C raw log-stds, parametrised
            as `latent_normal` (soft clamp, +MIN_LATENT_SCALE).
        num_channels: C.

    Raises:
        ValueError: if the last axis of `logits` is not 2C.
    """

    def __init__(self, logits, num_channels: int = 3):
        logits = tf.cast(tf.convert_to_tensor(logits), tf.float32)
        _check_channels(logits, 2 * num_channels,
                        f"A Normal image head over {num_channels} channel(s)")
        self.normal = latent_normal(logits[..., :num_channels],
                                    logits[..., num_channels:])

    def pixel_log_prob(self, x):
        """Gaussian log-density of 2x - 1, x [B, H, W, C] -> [B, H, W].

        Continuous, not discretised: its bits/dim are not comparable.
        """
        y = 2.0 * tf.cast(x, tf.float32) - 1.0
        return tf.reduce_sum(self.normal.log_prob(y), axis=-1)

    def mean(self):
        """The location clipped to [-1, 1], mapped to [0, 1]; [B, H, W, C]."""
        return _to_unit_interval(self.normal.loc)

    def sample_with_temperature(self, temperature=1.0, seed=None):
        """A sample clipped to [-1, 1] and mapped to [0, 1]; [B, H, W, C].

        The temperature is ignored, as in the official NormalDecoder. `seed`
        is as in `DiscretizedLogisticMixture.sample_with_temperature`.
        """
        del temperature
        seed = _stateless_seed(seed)
        shape = tf.shape(self.normal.loc)
        noise = (tf.random.normal(shape) if seed is None
                 else tf.random.stateless_normal(shape, seed))
        return _to_unit_interval(self.normal.loc + self.normal.scale * noise)


def image_distribution(logits, kind: str, num_channels: int,
                       num_mixtures: int = 10, num_bits: int = 8):
    """Builds the image distribution of the decoder output.

    Args:
        logits: [B, H, W, K] raw output of the image head.
        kind: "bernoulli" (K = C), "logistic_mixture" (K = 10M for C = 3,
            3M for C = 1) or "normal" (K = 2C).
        num_channels: C, image channels.
        num_mixtures, num_bits: M and bit depth, for "logistic_mixture".

    Returns:
        `BernoulliImage`, `DiscretizedLogisticMixture` or `NormalImage`.

    Raises:
        ValueError: for an unknown `kind` or a mismatched channel count.
    """
    if kind == "bernoulli":
        return BernoulliImage(logits, num_channels=num_channels)
    if kind == "logistic_mixture":
        return DiscretizedLogisticMixture(
            logits, num_mixtures, num_bits=num_bits,
            num_channels=num_channels)
    if kind == "normal":
        return NormalImage(logits, num_channels=num_channels)
    raise ValueError(f"`kind` must be one of {IMAGE_DISTRIBUTIONS}. "
                     f"Received: kind={kind!r}")
