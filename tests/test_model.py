"""The NVAE model: training gradients, sampling, temperature, input checks,
encode/decode, and the parameter counts of the official configurations."""

import numpy as np
import pytest
import tensorflow as tf

from benchmarks import bench

from nvae_tf import objectives
from nvae_tf.config import NVAEConfig
from nvae_tf.model import NVAE
from tests.conftest import make_tiny_config


def _built(config, seed=0):
    model = NVAE(config, seed=seed)
    model.build()
    return model


def _num_params(model):
    return sum(int(np.prod(v.shape)) for v in model.trainable_variables)


def _images(shape, seed=0, binary=False):
    x = np.random.default_rng(seed).uniform(size=shape).astype(np.float32)
    if binary:
        x = (x > 0.5).astype(np.float32)
    return x


def _eps(model, batch, seed=0, scale=1.0):
    rng = np.random.default_rng(seed)
    return [tf.constant(scale * rng.normal(size=(batch,) + s[1:]),
                        tf.float32) for s in model.latent_shapes()]


@pytest.fixture(scope="module")
def rgb_model():
    """8x8 RGB, logistic mixture, flows on, residual posterior."""
    return _built(make_tiny_config(num_nf=1))


@pytest.fixture(scope="module")
def mnist_model():
    """MNIST-like: 28x28 data padded to 32, Bernoulli, no flows."""
    return _built(make_tiny_config(dataset="mnist", image_size=None,
                                   num_latent_scales=1,
                                   num_groups_per_scale=2))


# ----------------------------------------------------------- training step

@pytest.mark.parametrize("overrides, binary", [
    (dict(num_nf=1), False),  # logistic mixture, flows
    (dict(num_nf=1, dataset="mnist"), True),  # Bernoulli, flows
])
def test_training_loss_is_finite_and_every_variable_gets_a_gradient(
        overrides, binary):
    model = _built(make_tiny_config(**overrides))
    cfg = model.config
    assert cfg.is_binary == binary
    x = _images((2,) + cfg.data_shape, binary=binary)
    objective = objectives.ObjectiveConfig(total_steps=100,
                                         weight_decay_norm=1e-2)
    with tf.GradientTape() as tape:
        result = objectives.compute_loss(model, x, 10, objective)
    grads = tape.gradient(result.loss, model.trainable_variables)
    assert np.isfinite(float(result.loss))
    missing = [v.path for v, g in zip(model.trainable_variables, grads)
               if g is None]
    assert not missing
    bad = [v.path for v, g in zip(model.trainable_variables, grads)
           if not np.all(np.isfinite(g))]
    assert not bad
    zero = [v.path for v, g in zip(model.trainable_variables, grads)
            if not np.any(np.asarray(g))]
    assert not zero
    # The flows and the residual posterior are in the graph.
    assert any("flow_" in v.path for v in model.trainable_variables)
    assert len(model.flows) == cfg.num_groups * cfg.num_nf


def test_training_mode_updates_batchnorm_and_draws_new_noise(rgb_model):
    model = rgb_model
    x = _images((2, 8, 8, 3))
    bn = model.batchnorm_layers()[0]
    before = np.asarray(bn.moving_mean).copy()
    first = model(x, training=True)
    second = model(x, training=True)
    assert np.abs(np.asarray(bn.moving_mean) - before).max() > 0
    # A step counter feeds the noise: two calls sample different z.
    assert np.abs(np.asarray(first.groups[0].z_sampled) -
                  np.asarray(second.groups[0].z_sampled)).max() > 1e-3
    after = np.asarray(bn.moving_mean).copy()
    model(x, training=False)
    np.testing.assert_array_equal(bn.moving_mean, after)


# ------------------------------------------------------------------ forward

def test_eval_forward_with_fixed_eps_is_deterministic(rgb_model, regime):
    model = rgb_model
    x = tf.constant(_images((2, 8, 8, 3)))
    eps = _eps(model, 2)

    def forward(x, eps):
        out = model(x, training=False, eps=eps)
        return out.logits, out.nelbo

    logits_a, nelbo_a = forward(x, eps)
    logits_b, nelbo_b = regime(forward, x, eps)
    np.testing.assert_allclose(logits_a, logits_b, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(nelbo_a, nelbo_b, rtol=1e-5)
    other = model(x, training=False, eps=_eps(model, 2, seed=1))
    assert np.abs(np.asarray(other.nelbo) - np.asarray(nelbo_a)).max() > 1e-3


def test_forward_outputs_are_consistent(rgb_model):
    model = rgb_model
    cfg = model.config
    out = model(_images((2, 8, 8, 3)), training=False, eps=_eps(model, 2))
    assert out.logits.shape == (2, 8, 8, cfg.output_channels)
    assert len(out.kl_per_group) == len(out.groups) == cfg.num_groups == 4
    for group, shape in zip(out.groups, model.latent_shapes(2)):
        assert tuple(group.z.shape) == shape
    # With flows the KL is the one-sample log q - log p.
    np.testing.assert_allclose(tf.add_n(out.kl_per_group),
                               out.log_q - out.log_p, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(out.nelbo,
                               out.recon_loss + tf.add_n(out.kl_per_group),
                               rtol=1e-6)
    # The top prior is N(0, 1.01^2).
    np.testing.assert_array_equal(out.groups[0].prior_loc, 0.0)
    np.testing.assert_allclose(out.groups[0].prior_scale, 1.01, rtol=1e-6)
    # Flows move z away from the Gaussian sample.
    assert np.abs(np.asarray(out.groups[1].z) -
                  np.asarray(out.groups[1].z_sampled)).max() > 1e-4


def test_analytic_kl_without_flows(mnist_model):
    model = mnist_model
    out = model(_images((2, 28, 28, 1), binary=True), training=False,
                eps=_eps(model, 2))
    for group, kl in zip(out.groups, out.kl_per_group):
        mq, sq = np.asarray(group.post_loc, np.float64), np.asarray(
            group.post_scale, np.float64)
        mp, sp = np.asarray(group.prior_loc, np.float64), np.asarray(
            group.prior_scale, np.float64)
        expected = (0.5 * (((mq - mp) / sp) ** 2 + (sq / sp) ** 2) - 0.5 -
                    np.log(sq / sp)).sum(axis=(1, 2, 3))
        np.testing.assert_allclose(kl, expected, rtol=1e-4)


def test_bernoulli_reconstruction_is_cropped_to_28(mnist_model):
    model = mnist_model
    x = _images((2, 28, 28, 1), binary=True)
    out = model(x, training=False, eps=_eps(model, 2))
    assert out.logits.shape == (2, 32, 32, 1)
    logits = np.asarray(out.logits, np.float64)[:, 2:30, 2:30]
    # -log Bernoulli(x | sigmoid(l)) = softplus(l) - x l, over 28x28 only.
    nll = (np.logaddexp(0.0, logits) - x * logits).sum(axis=(1, 2, 3))
    np.testing.assert_allclose(out.recon_loss, nll, rtol=1e-5)


def test_28x28_input_is_zero_padded_to_32(mnist_model):
    model = mnist_model
    x = _images((2, 28, 28, 1), binary=True)
    eps = _eps(model, 2)
    small = model(x, training=False, eps=eps)
    padded = model(np.pad(x, [(0, 0), (2, 2), (2, 2), (0, 0)]),
                   training=False, eps=eps)
    np.testing.assert_allclose(small.logits, padded.logits, rtol=1e-6,
                               atol=1e-6)
    np.testing.assert_allclose(small.nelbo, padded.nelbo, rtol=1e-6)
    # Padding with ones instead would change the encoder input.
    ones = model(np.pad(x, [(0, 0), (2, 2), (2, 2), (0, 0)],
                        constant_values=1.0), training=False, eps=eps)
    assert np.abs(np.asarray(ones.logits) -
                  np.asarray(small.logits)).max() > 1e-4


# ------------------------------------------------------------ input checks

def test_uint8_input_raises_type_error(mnist_model):
    x = np.zeros((2, 28, 28, 1), np.uint8)
    with pytest.raises(TypeError, match="/ 255"):
        mnist_model(x, training=False)


@pytest.mark.parametrize("shape", [(2, 28, 28, 3), (2, 30, 30, 1),
                                   (2, 28, 32, 1), (28, 28, 1)])
def test_wrong_shape_raises_value_error_naming_expected_shape(mnist_model,
                                                              shape):
    with pytest.raises(ValueError, match=r"\[B, 28, 28, 1\]"):
        mnist_model(np.zeros(shape, np.float32), training=False)


def test_wrong_number_of_eps_raises(rgb_model):
    eps = _eps(rgb_model, 2)[:3]
    with pytest.raises(ValueError, match="eps has 3 tensors"):
        rgb_model(_images((2, 8, 8, 3)), training=False, eps=eps)
    with pytest.raises(ValueError, match="eps has 3 tensors"):
        rgb_model.sample(2, eps=eps)


def test_config_type_checked():
    with pytest.raises(TypeError, match="NVAEConfig"):
        NVAE("mnist")


# ----------------------------------------------------------------- sampling

def test_sample_mnist_like_is_cropped_to_28(mnist_model):
    out = mnist_model.sample(3, 0.8)
    assert out.images.shape == (3, 28, 28, 1)
    assert out.logits.shape == (3, 32, 32, 1)
    images = np.asarray(out.images)
    assert images.min() >= 0.0 and images.max() <= 1.0
    assert [tuple(z.shape) for z in out.z] == mnist_model.latent_shapes(3)


def test_sample_rgb_shapes_and_range(rgb_model, regime):
    images = regime(lambda: rgb_model.sample(3, 0.7).images)
    assert images.shape == (3, 8, 8, 3)
    images = np.asarray(images)
    assert images.min() >= 0.0 and images.max() <= 1.0
    assert images.std() > 0


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_top_latent_scales_with_temperature(rgb_model, temperature, regime):
    eps = _eps(rgb_model, 2)
    z = regime(lambda: rgb_model.sample(2, temperature, eps=eps).z)
    # Top prior N(0, 1.01^2): z = 1.01 t eps exactly.
    np.testing.assert_allclose(z[0], 1.01 * temperature * eps[0].numpy(),
                               rtol=1e-6, atol=1e-7)
    # Lower groups: z_k = mu_k + t sigma_k eps_k, so at t -> 0 z_k = mu_k.
    zero_t = rgb_model.sample(2, 0.0, eps=eps).z
    np.testing.assert_array_equal(zero_t[0], 0.0)
    assert np.abs(np.asarray(zero_t[1]) - np.asarray(z[1])).max() > 1e-3


def test_sample_with_eps_is_deterministic(rgb_model):
    eps = _eps(rgb_model, 2)
    a = rgb_model.sample(2, 0.8, eps=eps, seed=tf.constant([1, 2]))
    b = rgb_model.sample(2, 0.8, eps=eps, seed=tf.constant([1, 2]))
    np.testing.assert_array_equal(a.logits, b.logits)
    np.testing.assert_array_equal(a.images, b.images)


# ----------------------------------------------------------- encode/decode

def test_encode_decode_round_trip(rgb_model):
    model = rgb_model
    x = _images((2, 8, 8, 3))
    latents, scales = model.encode(x)
    assert len(latents) == len(scales) == model.config.num_groups
    zeros = [tf.zeros_like(e) for e in _eps(model, 2)]
    forward = model(x, training=False, eps=zeros)
    for z, group, scale in zip(latents, forward.groups, scales):
        np.testing.assert_allclose(z, group.z, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(scale, group.post_scale, rtol=1e-6)
    decoded = model.decode(latents)
    np.testing.assert_allclose(decoded.logits, forward.logits, rtol=1e-5,
                               atol=1e-5)
    assert decoded.images.shape == (2, 8, 8, 3)
    # Only the top group given: the rest come from the prior (differs).
    partial = model.decode([latents[0]] + [None] * 3, temperature=0.0)
    np.testing.assert_array_equal(partial.z[0], latents[0])
    assert np.abs(np.asarray(partial.logits) -
                  np.asarray(forward.logits)).max() > 1e-4
    with pytest.raises(ValueError, match="latents_given has 2 entries"):
        model.sample(2, latents_given=latents[:2])


def test_model_from_config_round_trip(rgb_model):
    clone = NVAE.from_config(rgb_model.get_config())
    assert clone.config == rgb_model.config
    clone.build()
    assert len(clone.weights) == len(rgb_model.weights)
    for dst, src in zip(clone.weights, rgb_model.weights):
        dst.assign(src)
    x = _images((2, 8, 8, 3))
    eps = _eps(rgb_model, 2)
    np.testing.assert_array_equal(
        clone(x, training=False, eps=eps).logits,
        rgb_model(x, training=False, eps=eps).logits)


# ------------------------------------------------------- parameter counts

README_COMMON = dict(use_se=True, res_dist=True, num_latent_per_group=20,
                     num_cell_per_cond_enc=2, num_cell_per_cond_dec=2,
                     num_preprocess_blocks=1, num_postprocess_blocks=1,
                     num_preprocess_cells=2, num_postprocess_cells=2)
# Spec sections 10 and 2.14: config, parameters, conv layers, BN layers.
README_CONFIGS = {
    "mnist": (dict(dataset="mnist", num_channels_enc=32,
                   num_channels_dec=32, num_preprocess_blocks=2,
                   num_postprocess_blocks=2, num_preprocess_cells=3,
                   num_postprocess_cells=3, num_latent_scales=2,
                   num_groups_per_scale=10, ada_groups=True, num_nf=0),
              33_363_134, 255, 214),
    "cifar10": (dict(dataset="cifar10", num_channels_enc=128,
                     num_channels_dec=128, num_latent_scales=1,
                     num_groups_per_scale=30, num_nf=1),
                130_852_480, 610, 364),
    "celeba_64": (dict(dataset="celeba_64", num_channels_enc=64,
                       num_channels_dec=64, num_latent_scales=3,
                       num_groups_per_scale=20, ada_groups=True, num_nf=1),
                  153_281_364, 730, 436),
    "imagenet_32": (dict(dataset="imagenet_32", num_channels_enc=192,
                         num_channels_dec=192, num_latent_scales=1,
                         num_groups_per_scale=28, num_nf=1),
                    268_509_444, 570, 340),
    "celeba_256": (dict(dataset="celeba_256", num_channels_enc=30,
                        num_channels_dec=30, num_latent_scales=5,
                        num_groups_per_scale=16, ada_groups=True,
                        min_groups_per_scale=4, num_nf=2, num_x_bits=5),
                   330_798_664, 986, 460),
}


def test_parameter_count_mnist_small():
    # The configurations of issue 7, as the benchmark defines them.
    model = _built(bench.PRESETS["mnist-small"][0])
    assert _num_params(model) == 2_402_702
    assert len(model.conv_layers()) == 101
    assert len(model.batchnorm_layers()) == 68


def test_parameter_count_cifar_small():
    model = _built(bench.PRESETS["cifar-small"][0])
    assert _num_params(model) == 3_654_176
    assert len(model.flows) == 10


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(README_CONFIGS))
def test_parameter_count_readme_configs(name):
    overrides, params, convs, bns = README_CONFIGS[name]
    model = _built(NVAEConfig(**{**README_COMMON, **overrides}))
    assert _num_params(model) == params
    assert len(model.conv_layers()) == convs
    assert len(model.batchnorm_layers()) == bns
