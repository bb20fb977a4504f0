"""Latent-group bookkeeping shared by the model's forward pass and sampler.

A latent group k (top-down, k = 0 is the coarsest) has a prior p_k and, when
encoding, a posterior q_k. Both are `tfd.Normal`s with the official
parametrisation (soft-clamped mean and log-scale, scale + 0.01); with
`res_dist` the posterior adds the encoder's raw outputs to the prior's raw
outputs before clamping (Vahdat & Kautz, 2020, section 3.2).
"""

from typing import NamedTuple

import tensorflow as tf
import tensorflow_probability as tfp

from nvae_tf import distributions

tfd = tfp.distributions


class LatentGroup(NamedTuple):
    """Per-group tensors of one forward pass (shapes [B, h, w, L] unless noted).

    Attributes:
      prior_loc, prior_scale: parameters of p_k (group 0: 0 and 1.01).
      post_loc, post_scale: parameters of q_k.
      z_sampled: posterior sample before the flows.
      z: latent after the flows, fed to the decoder.
      log_q, log_p: [B] log q_k(z_sampled) - sum log-det, log p_k(z).
      kl: [B] KL of the group (analytic without flows, log q - log p with).
      kl_per_channel: [L] KL summed over h, w and averaged over the batch.
    """

    prior_loc: tf.Tensor
    prior_scale: tf.Tensor
    post_loc: tf.Tensor
    post_scale: tf.Tensor
    z_sampled: tf.Tensor
    z: tf.Tensor
    log_q: tf.Tensor
    log_p: tf.Tensor
    kl: tf.Tensor
    kl_per_channel: tf.Tensor


def split_params(params):
    """Splits a sampler output [.., 2L] into raw (loc, log_scale)."""
    loc, log_scale = tf.split(tf.cast(params, tf.float32), 2, axis=-1)
    return loc, log_scale


def top_prior_params(shape):
    """Raw (loc, log_scale) of the fixed top prior: zeros, i.e. N(0, 1.01^2)."""
    zeros = tf.zeros(shape, tf.float32)
    return zeros, zeros


def posterior_and_prior(prior_params, encoder_params, residual):
    """Builds (q_k, p_k) from raw prior and encoder-sampler outputs."""
    prior_loc, prior_log_scale = prior_params
    enc_loc, enc_log_scale = encoder_params
    if residual:
        enc_loc = enc_loc + prior_loc
        enc_log_scale = enc_log_scale + prior_log_scale
    posterior = distributions.latent_normal(enc_loc, enc_log_scale)
    prior = distributions.latent_normal(prior_loc, prior_log_scale)
    return posterior, prior


def sample_normal(dist, eps):
    """Reparameterised sample loc + scale * eps."""
    return dist.loc + dist.scale * eps


def summarize_group(posterior, prior, z_sampled, z, log_det, analytic_kl):
    """Reduces a group's densities to a `LatentGroup` (sums over h, w, L)."""
    log_q_map = posterior.log_prob(z_sampled) - log_det
    log_p_map = prior.log_prob(z)
    if analytic_kl:
        kl_map = tfd.kl_divergence(posterior, prior)
    else:
        kl_map = log_q_map - log_p_map
    return LatentGroup(
        prior_loc=prior.loc, prior_scale=prior.scale,
        post_loc=posterior.loc, post_scale=posterior.scale,
        z_sampled=z_sampled, z=z,
        log_q=tf.reduce_sum(log_q_map, axis=(1, 2, 3)),
        log_p=tf.reduce_sum(log_p_map, axis=(1, 2, 3)),
        kl=tf.reduce_sum(kl_map, axis=(1, 2, 3)),
        kl_per_channel=tf.reduce_mean(tf.reduce_sum(kl_map, axis=(1, 2)),
                                      axis=0))
