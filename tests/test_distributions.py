"""Tests of nvae_tf.distributions: latent Normals and the image heads."""

import itertools
import math

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_probability as tfp

from nvae_tf import distributions as dists

tfd = tfp.distributions


def _dml_logits(num_mixtures, num_channels, shape=(2, 2, 2), seed=0):
    block = (3 if num_channels == 3 else 2) * num_mixtures
    rng = np.random.default_rng(seed)
    return rng.normal(
        size=shape + (num_mixtures + num_channels * block,)).astype(np.float32)


# --------------------------------------------------------------------------
# Independent NumPy reference of the official DiscMixLogistic, written
# plainly with loops.

def _np_sigmoid(z):
    return 1.0 / (1.0 + math.exp(-z)) if z >= 0 else (
        math.exp(z) / (1.0 + math.exp(z)))


def _np_softplus(z):
    return max(z, 0.0) + math.log1p(math.exp(-abs(z)))


def _np_bin_log_prob(y, mean, log_scale, max_val, branches):
    inv_scale = math.exp(-log_scale)
    plus = inv_scale * (y - mean + 1.0 / max_val)
    minus = inv_scale * (y - mean - 1.0 / max_val)
    if y < -0.999:
        branches["lower"] += 1
        return plus - _np_softplus(plus)
    if y > 0.99:
        branches["upper"] += 1
        return -_np_softplus(minus)
    delta = _np_sigmoid(plus) - _np_sigmoid(minus)
    if delta > 1e-5:
        branches["bin"] += 1
        return math.log(max(delta, 1e-10))
    branches["fallback"] += 1
    mid = inv_scale * (y - mean)
    return mid - log_scale - 2.0 * _np_softplus(mid) - math.log(max_val / 2)


def _np_pixel_log_prob(logits, x, num_mixtures, num_bits, num_channels,
                       branches):
    m, max_val = num_mixtures, 2**num_bits - 1
    block = 3 * m if num_channels == 3 else 2 * m
    batch, height, width, _ = logits.shape
    out = np.zeros((batch, height, width))
    for b, h, w in np.ndindex(batch, height, width):
        p = logits[b, h, w].astype(np.float64)
        y = 2.0 * x[b, h, w].astype(np.float64) - 1.0
        mixture_log_weights = p[:m] - np.logaddexp.reduce(p[:m])
        per_component = []
        for k in range(m):
            coeff = [math.tanh(p[m + block * c + 2 * m + k])
                     for c in range(num_channels)] if num_channels == 3 else []
            total = mixture_log_weights[k]
            for c in range(num_channels):
                mean = p[m + block * c + k]
                if c == 1:
                    mean += coeff[0] * y[0]
                if c == 2:
                    mean += coeff[1] * y[0] + coeff[2] * y[1]
                log_scale = max(p[m + block * c + m + k], -7.0)
                total += _np_bin_log_prob(y[c], mean, log_scale, max_val,
                                          branches)
            per_component.append(total)
        out[b, h, w] = np.logaddexp.reduce(per_component)
    return out


# --------------------------------------------------------------------------
# Latent Normal.

def test_soft_clamp_values():
    x = tf.constant([0.0, 1.0, -100.0])
    expected = [0.0, 5.0 * math.tanh(0.2), -5.0 * math.tanh(20.0)]
    np.testing.assert_allclose(dists.soft_clamp(x), expected, rtol=1e-6)
    np.testing.assert_allclose(dists.soft_clamp(x, limit=2.0)[1],
                               2.0 * math.tanh(0.5), rtol=1e-6)


def test_latent_normal_scale_offset_and_temperature():
    q = dists.latent_normal(tf.zeros([2]), tf.zeros([2]))
    np.testing.assert_allclose(q.loc, [0.0, 0.0])
    np.testing.assert_allclose(q.scale, [1.01, 1.01], rtol=1e-6)
    # Temperature multiplies after the +0.01: 1.01 * 0.5, not 1 * 0.5 + 0.01.
    q = dists.latent_normal(tf.constant([8.0]), tf.constant([1.0]),
                            temperature=0.5)
    np.testing.assert_allclose(q.scale, [0.505 + 0.5 * (
        math.exp(5 * math.tanh(0.2)) - 1.0)], rtol=1e-6)
    np.testing.assert_allclose(q.loc, [5 * math.tanh(1.6)], rtol=1e-6)


def test_latent_kl_matches_monte_carlo():
    q = dists.latent_normal(np.array([0.3, -1.0, 2.0]),
                            np.array([-0.5, 0.2, 1.0]))
    p = dists.latent_normal(np.array([0.0, 0.5, 1.0]),
                            np.array([0.0, -0.3, 0.5]))
    num_samples = 200_000
    z = q.sample(num_samples, seed=tf.constant([1, 2]))
    log_ratio = (q.log_prob(z) - p.log_prob(z)).numpy()  # [N, 3]
    monte_carlo = log_ratio.mean(axis=0)
    standard_error = log_ratio.std(axis=0) / math.sqrt(num_samples)
    analytic = tfd.kl_divergence(q, p).numpy()
    assert np.all(np.abs(monte_carlo - analytic) < 4.0 * standard_error)
    assert np.all(analytic > 0.01)


def test_latent_kl_is_zero_for_identical_distributions():
    raw_loc, raw_log_scale = tf.constant([0.7, -3.0]), tf.constant([2.0, -9.0])
    q = dists.latent_normal(raw_loc, raw_log_scale)
    p = dists.latent_normal(raw_loc, raw_log_scale)
    np.testing.assert_allclose(tfd.kl_divergence(q, p), [0.0, 0.0], atol=1e-7)


# --------------------------------------------------------------------------
# Discretized logistic mixture.

@pytest.mark.parametrize("num_channels", [1, 3])
def test_mixture_pixel_probabilities_sum_to_one(num_channels):
    logits = _dml_logits(3, num_channels)
    dist = dists.DiscretizedLogisticMixture(logits, 3, num_bits=3,
                                            num_channels=num_channels)
    values = np.array(list(itertools.product(range(8), repeat=num_channels)),
                      np.float32) / 7.0  # all 8**C values of one pixel
    images = np.broadcast_to(values[:, None, None, None, :],
                             (len(values), 2, 2, 2, num_channels))
    log_probs = tf.map_fn(dist.pixel_log_prob, tf.constant(images))
    np.testing.assert_allclose(np.exp(log_probs).sum(axis=0),
                               np.ones([2, 2, 2]), atol=1e-5)


@pytest.mark.parametrize("num_channels,num_bits",
                         [(3, 8), (3, 5), (1, 8), (1, 5)])
def test_mixture_log_prob_matches_numpy_reference(num_channels, num_bits):
    max_val = 2**num_bits - 1
    logits = _dml_logits(3, num_channels, shape=(2, 3, 3), seed=num_bits)
    block = (3 if num_channels == 3 else 2) * 3
    # Very small log-scales (some beyond the -7 clamp) on the first channel of
    # half the components exercise the small-probability fallback.
    for k in (0, 1):
        logits[..., 3 + 3 + k] = np.linspace(-9.0, -5.0, 18).reshape(2, 3, 3)
    logits[..., 3 + block: 3 + block + 3] *= 0.5  # keep other bins interior
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, max_val + 1, size=(2, 3, 3, num_channels))
    pixels[0, 0, 0], pixels[0, 0, 1] = 0, max_val
    pixels[0, 0, 2], pixels[0, 1, 0] = 1, max_val - 1
    pixels[1, 2, 2, 0] = 0  # a mixed edge / interior pixel
    x = (pixels / max_val).astype(np.float32)

    branches = dict(lower=0, upper=0, bin=0, fallback=0)
    expected = _np_pixel_log_prob(logits, x, 3, num_bits, num_channels,
                                  branches)
    assert min(branches.values()) > 0, branches
    dist = dists.DiscretizedLogisticMixture(logits, 3, num_bits=num_bits,
                                            num_channels=num_channels)
    np.testing.assert_allclose(dist.pixel_log_prob(x), expected,
                               rtol=1e-5, atol=5e-4)
    np.testing.assert_allclose(dist.log_prob(x), expected.sum(axis=(1, 2)),
                               rtol=1e-5, atol=1e-2)


def test_mixture_upper_edge_quirk_at_pixel_254():
    # One logistic at y = 0 with scale 1: pixels 254 and 255 both get the
    # open upper tail 1 - sigmoid(y - 1/255), as the official code.
    logits = np.zeros([1, 1, 1, 3], np.float32)
    dist = dists.DiscretizedLogisticMixture(logits, 1, num_channels=1)
    for value in (254, 255):
        y = 2.0 * value / 255 - 1.0
        expected = math.log(1.0 - _np_sigmoid(y - 1.0 / 255))
        got = dist.pixel_log_prob(np.full([1, 1, 1, 1], value / 255,
                                          np.float32))
        np.testing.assert_allclose(got[0, 0, 0], expected, rtol=1e-5)


def test_single_component_equals_logistic_cdf_difference():
    locs, log_scales = [0.1, -0.3, 0.5], [-2.0, -1.5, -2.5]
    # Layout for M = 1: logit, then per colour [loc, log-scale, coeff = 0].
    params = [0.0] + [v for c in range(3) for v in (locs[c], log_scales[c], 0)]
    logits = np.tile(np.array(params, np.float32), (2, 2, 2, 1))
    pixels = np.array([[100, 60, 200], [128, 70, 180], [150, 127, 190],
                       [140, 110, 166]]).reshape(1, 2, 2, 3)
    pixels = np.concatenate([pixels, pixels + 3])
    x = (pixels / 255).astype(np.float32)
    y = 2.0 * pixels / 255 - 1.0
    scales = np.exp(log_scales)
    half_width = 1.0 / 255

    def cdf(v):
        return 1.0 / (1.0 + np.exp(-(v - np.array(locs)) / scales))

    bin_probs = cdf(y + half_width) - cdf(y - half_width)
    assert bin_probs.min() > 1e-4  # away from the fallback branch
    expected = np.log(bin_probs).sum(-1)
    dist = dists.DiscretizedLogisticMixture(logits, 1)
    np.testing.assert_allclose(dist.pixel_log_prob(x), expected, rtol=1e-5)


def test_mixture_shapes_and_float16_logits():
    logits = _dml_logits(3, 3)
    dist = dists.DiscretizedLogisticMixture(tf.cast(logits, tf.float16), 3)
    assert dist.batch_shape == [2] and dist.event_shape == [2, 2, 3]
    assert dist.batch_shape_tensor().numpy().tolist() == [2]
    assert dist.event_shape_tensor().numpy().tolist() == [2, 2, 3]
    assert dist.reparameterization_type == tfd.NOT_REPARAMETERIZED
    x = np.full([2, 2, 2, 3], 0.5, np.float32)
    log_prob = dist.log_prob(x)
    assert log_prob.dtype == tf.float32 and log_prob.shape == [2]
    reference = dists.DiscretizedLogisticMixture(
        tf.cast(tf.cast(logits, tf.float16), tf.float32), 3)
    np.testing.assert_allclose(log_prob, reference.log_prob(x), rtol=1e-6)
    np.testing.assert_allclose(
        log_prob, tf.reduce_sum(dist.pixel_log_prob(x), [1, 2]), rtol=1e-6)


@pytest.mark.parametrize("num_channels,channels,expected", [
    (3, 29, "30"), (1, 10, "9"), (2, 30, "1 or 3")])
def test_mixture_rejects_wrong_channel_count(num_channels, channels, expected):
    with pytest.raises(ValueError, match=expected):
        dists.DiscretizedLogisticMixture(
            tf.zeros([1, 2, 2, channels]), 3, num_channels=num_channels)


def test_mixture_samples_shape_range_and_seed():
    dist = dists.DiscretizedLogisticMixture(_dml_logits(3, 3) * 3.0, 3)
    samples = dist.sample_with_temperature(0.7, seed=[3, 4])
    assert samples.shape == [2, 2, 2, 3]
    assert 0.0 <= samples.numpy().min() and samples.numpy().max() <= 1.0
    np.testing.assert_array_equal(
        samples, dist.sample_with_temperature(0.7, seed=[3, 4]))
    assert not np.allclose(samples,
                           dist.sample_with_temperature(0.7, seed=[3, 5]))
    np.testing.assert_array_equal(dist.sample_with_temperature(seed=7),
                                  dist.sample_with_temperature(seed=[7, 0]))
    assert dist.sample_with_temperature().shape == [2, 2, 2, 3]  # stateful
    assert dist.sample(4, seed=[1, 2]).shape == [4, 2, 2, 2, 3]


def test_lower_temperature_widens_logistic_noise():
    # One component, loc 0, log-scale -4: no clipping, so with the same seed
    # the t = 0.5 deviations are exactly twice the t = 1 ones (the official
    # sampler divides the logistic scale by t).
    params = np.array([0.0, 0.0, -4.0], np.float32)
    dist = dists.DiscretizedLogisticMixture(np.tile(params, (2, 8, 8, 1)), 1,
                                            num_channels=1)
    seed = tf.constant([11, 12])
    deviation = {t: 2.0 * dist.sample_with_temperature(t, seed=seed) - 1.0
                 for t in (1.0, 0.5)}
    np.testing.assert_allclose(deviation[0.5], 2.0 * deviation[1.0],
                               rtol=1e-4, atol=1e-6)
    assert np.std(deviation[0.5]) > 1.9 * np.std(deviation[1.0]) > 0.0


def test_mixture_mean_single_pixel():
    logits = _dml_logits(2, 3, shape=(1, 1, 1), seed=5)
    p = logits[0, 0, 0].astype(np.float64)
    weights = np.exp(p[:2]) / np.exp(p[:2]).sum()
    loc = [weights @ p[2 + 6 * c: 4 + 6 * c] for c in range(3)]
    coeff = [weights @ np.tanh(p[6 + 6 * c: 8 + 6 * c]) for c in range(3)]
    red = np.clip(loc[0], -1, 1)
    green = np.clip(loc[1] + coeff[0] * red, -1, 1)
    blue = np.clip(loc[2] + coeff[1] * red + coeff[2] * green, -1, 1)
    expected = np.array([red, green, blue]) / 2 + 0.5
    mean = dists.DiscretizedLogisticMixture(logits, 2).mean()
    assert mean.shape == [1, 1, 1, 3]
    np.testing.assert_allclose(mean[0, 0, 0], expected, rtol=1e-5)


def test_mixture_inside_tf_function():
    logits = _dml_logits(3, 3)
    x = np.full([2, 2, 2, 3], 0.25, np.float32)

    @tf.function(input_signature=[tf.TensorSpec([None, 2, 2, 30])])
    def log_prob_and_sample(batch_logits):
        dist = dists.image_distribution(batch_logits, "logistic_mixture", 3,
                                        num_mixtures=3)
        return (dist.log_prob(x), dist.sample_with_temperature(
            0.8, seed=tf.constant([5, 6])), dist.batch_shape_tensor())

    log_prob, samples, batch_shape = log_prob_and_sample(logits)
    eager = dists.DiscretizedLogisticMixture(logits, 3)
    np.testing.assert_allclose(log_prob, eager.log_prob(x), rtol=1e-6)
    np.testing.assert_allclose(
        samples, eager.sample_with_temperature(0.8, seed=[5, 6]), rtol=1e-6)
    assert batch_shape.numpy().tolist() == [2]


# --------------------------------------------------------------------------
# Bernoulli and Normal heads, factory.

def test_bernoulli_log_prob_and_mean():
    logits = np.array([0.5, -2.0, 3.0, 0.0], np.float32).reshape(1, 2, 2, 1)
    x = np.array([1.0, 0.0, 0.0, 1.0], np.float32).reshape(1, 2, 2, 1)
    prob = 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))
    expected = (x * np.log(prob) + (1 - x) * np.log(1 - prob))[..., 0]
    dist = dists.image_distribution(logits, "bernoulli", 1)
    np.testing.assert_allclose(dist.pixel_log_prob(x), expected, rtol=1e-6)
    np.testing.assert_allclose(dist.log_prob(x), [expected.sum()], rtol=1e-6)
    np.testing.assert_allclose(dist.mean(), prob, rtol=1e-6)
    np.testing.assert_allclose(
        dist.sample_with_temperature(0.5, seed=[1, 2]), prob, rtol=1e-6)


def test_normal_image_log_prob_and_samples():
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(2, 2, 2, 6)).astype(np.float32)
    x = rng.uniform(size=(2, 2, 2, 3)).astype(np.float32)
    loc = 5 * np.tanh(logits[..., :3].astype(np.float64) / 5)
    scale = np.exp(5 * np.tanh(logits[..., 3:].astype(np.float64) / 5)) + 0.01
    y = 2.0 * x - 1.0
    expected = (-0.5 * ((y - loc) / scale) ** 2 - 0.5 * np.log(2 * np.pi)
                - np.log(scale)).sum(-1)
    dist = dists.image_distribution(logits, "normal", 3)
    np.testing.assert_allclose(dist.pixel_log_prob(x), expected, rtol=1e-5)
    np.testing.assert_allclose(dist.log_prob(x), expected.sum((1, 2)),
                               rtol=1e-5)
    np.testing.assert_allclose(dist.mean(), np.clip(loc, -1, 1) / 2 + 0.5,
                               rtol=1e-6)
    samples = dist.sample_with_temperature(1.0, seed=[1, 2])
    assert samples.shape == [2, 2, 2, 3]
    assert 0.0 <= samples.numpy().min() and samples.numpy().max() <= 1.0
    # The official NormalDecoder ignores the temperature.
    np.testing.assert_array_equal(
        samples, dist.sample_with_temperature(0.3, seed=[1, 2]))


def test_factory_rejects_unknown_kind_and_bad_channels():
    with pytest.raises(ValueError, match="'gaussian'"):
        dists.image_distribution(tf.zeros([1, 2, 2, 3]), "gaussian", 3)
    with pytest.raises(ValueError, match="expects 6 channels"):
        dists.image_distribution(tf.zeros([1, 2, 2, 5]), "normal", 3)
    with pytest.raises(ValueError, match="Bernoulli head expects 1 channels"):
        dists.image_distribution(tf.zeros([1, 2, 2, 3]), "bernoulli", 1)
    with pytest.raises(ValueError, match="expects 100 channels"):
        dists.image_distribution(tf.zeros([1, 2, 2, 30]), "logistic_mixture",
                                 3)
