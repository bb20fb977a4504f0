"""Tests of nvae_tf.objectives: hand-worked values, NumPy references, and
`compute_loss` recomputed by hand from its metrics."""

import math

import numpy as np
import pytest
import tensorflow as tf

from nvae_tf import objectives
from nvae_tf.objectives import (
    balanced_kl, batchnorm_regularization, kl_coeff, kl_balancing_alpha,
    ObjectiveConfig, bits_per_dim, compute_loss, weight_decay_norm_coeff)
from nvae_tf.model import NVAE
from tests.conftest import make_tiny_config


# ---------------------------------------------------------------- kl_coeff

@pytest.mark.parametrize("step, expected", [
    (0, 1e-4),          # (0 - 1) / 3000 < 0 -> floor
    (1, 1e-4),          # end of the constant part: ramp = 0 -> floor
    (301, 0.1),         # (301 - 1) / 3000
    (1501, 0.5),
    (3001, 1.0),        # end of the anneal
    (9999, 1.0),
])
def test_kl_coeff_defaults(step, expected):
    # N = 10000: constant for 1e-4 * N = 1 step, anneal over 0.3 * N = 3000.
    assert float(kl_coeff(step, 10000)) == pytest.approx(expected, rel=1e-6)
    as_int64 = kl_coeff(tf.constant(step, tf.int64), tf.constant(10000))
    assert as_int64.dtype == tf.float32
    assert float(as_int64) == pytest.approx(expected, rel=1e-6)


def test_kl_coeff_custom_portions_in_tf_function():
    fn = tf.function(lambda s: kl_coeff(s, 100, kl_anneal_portion=0.5,
                                        kl_const_portion=0.1,
                                        kl_const_coeff=0.01))
    # (step - 10) / 50, floored at 0.01, capped at 1.
    for step, expected in [(0, 0.01), (10, 0.01), (20, 0.2), (35, 0.5),
                           (60, 1.0), (90, 1.0)]:
        assert float(fn(tf.constant(step, tf.int64))) == pytest.approx(
            expected, rel=1e-6)


@pytest.mark.parametrize("kwargs, name", [
    (dict(total_steps=0), "total_steps"),
    (dict(total_steps=10, kl_anneal_portion=0.0), "kl_anneal_portion"),
])
def test_kl_coeff_errors(kwargs, name):
    with pytest.raises(ValueError, match=name):
        kl_coeff(0, **kwargs)


# ------------------------------------------------------ kl_balancing_alpha

@pytest.mark.parametrize("groups, expected", [
    ((5, 10), [1] * 5 + [2] * 10),                              # MNIST
    ((5, 10, 20), [1] * 5 + [2] * 10 + [4] * 20),               # CelebA-64
    ((4, 4, 4, 8, 16),                                          # CelebA-HQ
     [1] * 4 + [4] * 4 + [16] * 4 + [32] * 8 + [64] * 16),
    ((10,), [1] * 10),                                          # one scale
    ((1,), [1]),
])
def test_kl_balancing_alpha(groups, expected):
    alpha = kl_balancing_alpha(groups)
    assert alpha.dtype == np.float32
    np.testing.assert_array_equal(alpha, np.array(expected, np.float32))


def test_kl_balancing_alpha_errors():
    for bad in ((), (3, 0)):
        with pytest.raises(ValueError, match="groups_per_decoder_scale"):
            kl_balancing_alpha(bad)


# ------------------------------------------------------------- balanced_kl

def _two_group_kl():
    return [tf.constant([1.0, 3.0]), tf.constant([-2.0, 6.0])]


def test_balanced_kl_hand_worked_two_groups():
    kl = _two_group_kl()
    alpha = np.array([1.0, 2.0], np.float32)
    kl_term, gamma, kl_means = balanced_kl(kl, 0.5, alpha)
    # a_0 = (mean|KL_0| + 0.01) / 1 = 2.01; a_1 = (4 + 0.01) / 2 = 2.005.
    a = np.array([2.01, 2.005])
    expected_gamma = a / a.mean()
    np.testing.assert_allclose(gamma, expected_gamma, rtol=1e-6)
    np.testing.assert_allclose(kl_means, [2.0, 2.0], rtol=1e-6)
    expected_term = 0.5 * (expected_gamma[0] * np.array([1.0, 3.0])
                           + expected_gamma[1] * np.array([-2.0, 6.0]))
    np.testing.assert_allclose(kl_term, expected_term, rtol=1e-6)


def test_balanced_kl_gamma_has_mean_one():
    rng = np.random.default_rng(0)
    kl = [tf.constant(rng.gamma(2.0, s, size=8).astype(np.float32))
          for s in (0.1, 5.0, 20.0, 1.0, 3.0)]
    _, gamma, _ = balanced_kl(kl, 0.2, kl_balancing_alpha((2, 3)))
    assert float(tf.reduce_mean(gamma)) == pytest.approx(1.0, abs=1e-6)
    assert not np.allclose(gamma, 1.0)


def test_balanced_kl_gamma_is_stop_gradient():
    kl = _two_group_kl()
    alpha = tf.constant([1.0, 2.0])
    with tf.GradientTape() as tape:
        for k in kl:
            tape.watch(k)
        kl_term, gamma, _ = balanced_kl(kl, 0.25, alpha)
        total = tf.reduce_sum(kl_term)
    grads = tape.gradient(total, kl)
    for k, grad in enumerate(grads):
        np.testing.assert_allclose(grad, [0.25 * gamma[k]] * 2, rtol=1e-6)


@pytest.mark.parametrize("beta", [1.0, 1.5])
def test_balanced_kl_off_after_warmup(beta):
    kl_term, gamma, kl_means = balanced_kl(
        _two_group_kl(), beta, tf.constant([1.0, 2.0]))
    np.testing.assert_array_equal(gamma, [1.0, 1.0])
    np.testing.assert_allclose(kl_term, beta * np.array([-1.0, 9.0]),
                               rtol=1e-6)
    np.testing.assert_allclose(kl_means, [2.0, 2.0])


def test_balanced_kl_in_tf_function_with_tensor_beta():
    alpha = tf.constant([1.0, 2.0])
    fn = tf.function(lambda kl, beta: balanced_kl(kl, beta, alpha))
    kl = _two_group_kl()
    warm, gamma_warm, _ = fn(kl, tf.constant(0.5))
    done, gamma_done, _ = fn(kl, tf.constant(1.0))
    eager, _, _ = balanced_kl(kl, 0.5, alpha)
    np.testing.assert_allclose(warm, eager, rtol=1e-6)
    assert not np.allclose(gamma_warm, 1.0)
    np.testing.assert_allclose(done, [-1.0, 9.0], rtol=1e-6)
    np.testing.assert_array_equal(gamma_done, [1.0, 1.0])
    # One trace serves both regimes: no python branching on beta.
    assert fn.experimental_get_tracing_count() == 1


# ------------------------------------------------ weight_decay_norm_coeff

def test_weight_decay_norm_coeff_anneal_is_geometric():
    def lam(beta):
        return float(weight_decay_norm_coeff(beta, 1e-2, 1.0, anneal=True))
    assert lam(0.0) == pytest.approx(1.0, rel=1e-6)
    assert lam(1.0) == pytest.approx(1e-2, rel=1e-6)
    assert lam(0.5) == pytest.approx(1e-1, rel=1e-6)  # sqrt(1 * 1e-2)
    assert lam(tf.constant(0.25)) == pytest.approx(10 ** -0.5, rel=1e-6)


def test_weight_decay_norm_coeff_constant_without_anneal():
    value = weight_decay_norm_coeff(0.3, 1e-1, weight_decay_norm_init=10.)
    assert value.dtype == tf.float32
    assert float(value) == pytest.approx(1e-1, rel=1e-7)
    assert float(weight_decay_norm_coeff(0.3, 0.0)) == 0.0  # official default


@pytest.mark.parametrize("args, name", [
    ((0.0, 1.0, True), "weight_decay_norm"),
    ((1e-2, 0.0, True), "weight_decay_norm_init"),
    ((-1.0, 1.0, False), "weight_decay_norm"),
])
def test_weight_decay_norm_coeff_errors(args, name):
    with pytest.raises(ValueError, match=f"^{name}: "):
        weight_decay_norm_coeff(0.5, *args[:2], anneal=args[2])


def test_batchnorm_regularization():
    gammas = [tf.constant([1.0, -3.0, 2.0]), tf.constant([0.5])]
    assert float(batchnorm_regularization(gammas)) == pytest.approx(3.5)
    assert float(batchnorm_regularization([tf.ones([4])] * 7)) == 7.0
    assert float(batchnorm_regularization([])) == 0.0


# ------------------------------------------------------------ compute_loss

BATCH = 2


def _built(**overrides):
    model = NVAE(make_tiny_config(**overrides))
    model.build()
    return model


@pytest.fixture(scope="module")
def model():
    """Tiny RGB model without flows (analytic KL >= 0), groups (2, 2)."""
    return _built()


@pytest.fixture(scope="module")
def batch(model):
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(BATCH, 8, 8, 3)).astype(np.float32)
    eps = [tf.constant(rng.normal(size=(BATCH,) + s[1:]), tf.float32)
           for s in model.latent_shapes()]
    return x, eps


def _np(metrics):
    return {k: np.asarray(v, np.float64) for k, v in metrics.items()}


def test_balancing_alpha_of_the_tiny_model(model):
    # Decoder scales (2, 2): alpha = 4^i / n_i = [1/2]*2 + [2]*2, / min.
    np.testing.assert_array_equal(
        objectives.kl_balancing_alpha(model.config.groups_per_decoder_scale),
        [1.0, 1.0, 4.0, 4.0])


def test_without_weight_decay_norm_there_is_no_regulariser(model, batch):
    x, eps = batch
    result = compute_loss(model, x, 10**6, ObjectiveConfig(total_steps=10),
                          training=False, eps=eps)
    for key in ("spectral_reg", "bn_reg", "weight_decay_norm"):
        assert key not in result.metrics
    m = _np(result.metrics)
    # After warm-up (beta = 1): no balancing, the loss is the mean NELBO.
    assert m["kl_coeff"] == 1.0
    np.testing.assert_array_equal(m["kl_gamma"], np.ones(4))
    np.testing.assert_allclose(m["loss"], m["nelbo"], rtol=1e-6)
    out = model(x, training=False, eps=eps)
    np.testing.assert_allclose(m["nelbo"], np.mean(out.nelbo), rtol=1e-6)
    np.testing.assert_allclose(m["recon"], np.mean(out.recon_loss),
                               rtol=1e-6)
    np.testing.assert_allclose(m["kl"], np.mean(tf.add_n(out.kl_per_group)),
                               rtol=1e-5)
    np.testing.assert_allclose(m["nelbo"], m["recon"] + m["kl"], rtol=1e-5)
    np.testing.assert_allclose(
        m["kl_per_group"], [np.mean(k) for k in out.kl_per_group], rtol=1e-5)


def test_kl_balancing_during_warm_up(model, batch):
    x, eps = batch
    objective = ObjectiveConfig(total_steps=1000)
    result = compute_loss(model, x, 100, objective, training=False, eps=eps)
    m = _np(result.metrics)
    # beta = (100 - 1e-4 * 1000) / (0.3 * 1000).
    np.testing.assert_allclose(m["kl_coeff"], (100 - 0.1) / 300, rtol=1e-5)
    # Analytic KL >= 0, so mean |KL| = mean KL: gamma from the metrics.
    assert np.all(m["kl_per_group"] >= 0)
    a = (m["kl_per_group"] + 0.01) / np.array([1.0, 1.0, 4.0, 4.0])
    gamma = a / a.mean()
    np.testing.assert_allclose(m["kl_gamma"], gamma, rtol=1e-5)
    assert np.abs(gamma - 1).max() > 1e-2
    np.testing.assert_allclose(m["kl_gamma"].mean(), 1.0, rtol=1e-6)
    expected = m["recon"] + m["kl_coeff"] * np.sum(gamma * m["kl_per_group"])
    np.testing.assert_allclose(m["loss"], expected, rtol=1e-5)
    assert abs(m["loss"] - m["nelbo"]) > 1.0  # beta << 1 shrinks the KL


def test_loss_with_spectral_and_batchnorm_regularisation(batch):
    model = _built()
    x, eps = batch
    assert int(model.spectral_regularizer.initialized) == 0
    objective = ObjectiveConfig(total_steps=1000, weight_decay_norm=1e-2)
    result = compute_loss(model, x, 100, objective, training=True, eps=eps)
    m = _np(result.metrics)
    assert m["weight_decay_norm"] == pytest.approx(1e-2, rel=1e-6)
    expected = (m["recon"] +
                m["kl_coeff"] * np.sum(m["kl_gamma"] * m["kl_per_group"]) +
                1e-2 * (m["spectral_reg"] + m["bn_reg"]))
    np.testing.assert_allclose(m["loss"], expected, rtol=1e-5)
    # BN-reg = sum of max |gamma| = number of BN layers at init: 2 per
    # res_bnswish cell (down_pre, 4 normal_enc, down_enc) and 4 per
    # inverted-residual cell (3 normal_dec, up_dec, up_post).
    bns = model.batchnorm_layers()
    assert m["bn_reg"] == len(bns) == 2 * 6 + 4 * 5
    # SR ~ sum of the largest singular values of every effective kernel
    # (power iteration approaches it from below).
    sigma = sum(np.linalg.svd(np.asarray(c.spectral_matrix(), np.float64),
                              compute_uv=False)[0]
                for c in model.conv_layers())
    assert 0.95 * sigma <= m["spectral_reg"] <= sigma * (1 + 1e-5)
    # training=True advanced the persistent power iteration.
    assert int(model.spectral_regularizer.initialized) == 1
    # The regulariser's gradient reaches the BN scales and conv gains.
    gammas = [bn.gamma for bn in bns]
    with tf.GradientTape() as tape:
        loss = compute_loss(model, x, 100, objective, training=True,
                            eps=eps).loss
    grads = tape.gradient(loss, gammas)
    assert all(g is not None for g in grads)


def test_weight_decay_norm_anneal(model, batch):
    x, eps = batch
    objective = ObjectiveConfig(total_steps=1000, weight_decay_norm=1e-2,
                                weight_decay_norm_init=1.0,
                                weight_decay_norm_anneal=True)
    m = _np(compute_loss(model, x, 100, objective, training=False,
                         eps=eps).metrics)
    beta = m["kl_coeff"]
    expected = math.exp((1 - beta) * math.log(1.0) +
                        beta * math.log(1e-2))
    np.testing.assert_allclose(m["weight_decay_norm"], expected, rtol=1e-5)
    assert 1e-2 < m["weight_decay_norm"] < 1.0


def test_bits_per_dim(model, batch):
    assert bits_per_dim(100.0, 784) == pytest.approx(
        100.0 / (math.log(2.0) * 784), rel=1e-12)
    assert bits_per_dim(math.log(2.0) * 3072, 3072) == pytest.approx(1.0)
    x, eps = batch
    m = _np(compute_loss(model, x, 0, ObjectiveConfig(), training=False,
                         eps=eps).metrics)
    np.testing.assert_allclose(m["bpd"],
                               m["nelbo"] / (math.log(2.0) * 8 * 8 * 3),
                               rtol=1e-6)


def test_active_units(model, batch):
    x, eps = batch
    m = _np(compute_loss(model, x, 0, ObjectiveConfig(), training=False,
                         eps=eps).metrics)
    out = model(x, training=False, eps=eps)
    per_channel = np.concatenate([np.asarray(g.kl_per_channel)
                                  for g in out.groups])
    assert per_channel.shape == (4 * 3,)
    assert m["active_units"] == np.sum(per_channel > 0.1)


def test_compute_loss_in_tf_function_matches_eager(model, batch, regime):
    x, eps = batch
    objective = ObjectiveConfig(total_steps=1000)

    def loss_fn(x, step):
        result = compute_loss(model, x, step, objective, training=False,
                              eps=eps)
        return result.loss, result.metrics["kl_gamma"]

    eager_loss, eager_gamma = loss_fn(tf.constant(x), tf.constant(50))
    loss, gamma = regime(loss_fn, tf.constant(x), tf.constant(50))
    np.testing.assert_allclose(loss, eager_loss, rtol=1e-5)
    np.testing.assert_allclose(gamma, eager_gamma, rtol=1e-5)


@pytest.mark.parametrize("kwargs, message", [
    (dict(total_steps=0), "^total_steps: 0 is invalid"),
    (dict(kl_anneal_portion=1.5), "^kl_anneal_portion: 1.5 is invalid"),
    (dict(kl_anneal_portion=0.0),
     r"^kl_anneal_portion: 0.0 is invalid.*\(0, 1\]"),
    (dict(kl_const_portion=-0.1), "^kl_const_portion: -0.1 is invalid"),
    (dict(kl_const_coeff=2.0), "^kl_const_coeff: 2.0 is invalid"),
    (dict(weight_decay_norm=-1e-2), "^weight_decay_norm: -0.01 is invalid"),
    (dict(weight_decay_norm_anneal=True),
     "^weight_decay_norm: 0.0 is invalid.*weight_decay_norm_anneal"),
    (dict(weight_decay_norm_anneal=True, weight_decay_norm=1e-2,
          weight_decay_norm_init=0.0), "^weight_decay_norm_init: 0.0 is inv"),
])
def test_objective_config_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ObjectiveConfig(**kwargs)


def test_objective_config_regularisation_switch():
    assert not ObjectiveConfig().uses_regularization
    assert ObjectiveConfig(weight_decay_norm=1e-2).uses_regularization
    assert objectives.ACTIVE_UNIT_KL == 0.1
