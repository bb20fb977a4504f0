"""The NVAE training objective for one batch (spec section 5).

    loss = mean_b(recon_b + beta * sum_k gamma_k KL_bk) + lambda (SR + BNreg)

beta is the KL warm-up coefficient, gamma the KL balancing coefficients
(only while beta < 1), lambda the spectral/BN regularisation weight (with its
optional geometric anneal). Trainers, the tuner and the benchmark all call
`compute_loss`, so they optimise the same function.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import tensorflow as tf

from nvae_tf import objectives

ACTIVE_UNIT_KL = 0.1  # a latent channel is "active" above this KL (nats)


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig:
    """Objective settings, official flag names.

    Attributes:
      total_steps: iterations of the whole run (drives the KL warm-up).
      kl_anneal_portion: fraction of `total_steps` over which beta reaches 1.
      kl_const_portion: fraction of `total_steps` held at `kl_const_coeff`.
      kl_const_coeff: floor of beta.
      weight_decay_norm: lambda of spectral + BN regularisation (final value
        when annealed); 0 switches both off.
      weight_decay_norm_init: initial lambda of the anneal.
      weight_decay_norm_anneal: anneal lambda geometrically with beta.
    """

    total_steps: int = 1
    kl_anneal_portion: float = 0.3
    kl_const_portion: float = 1e-4
    kl_const_coeff: float = 1e-4
    weight_decay_norm: float = 0.0
    weight_decay_norm_init: float = 10.0
    weight_decay_norm_anneal: bool = False

    def __post_init__(self):
        if self.total_steps < 1:
            raise ValueError(f"total_steps={self.total_steps}; expected >= 1.")
        for name in ("kl_anneal_portion", "kl_const_portion",
                     "kl_const_coeff"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name}={getattr(self, name)}; expected a "
                                 "value in [0, 1].")
        if self.kl_anneal_portion == 0.0:
            raise ValueError("kl_anneal_portion=0; expected a value in (0, 1].")
        if self.weight_decay_norm < 0:
            raise ValueError(f"weight_decay_norm={self.weight_decay_norm}; "
                             "expected >= 0.")
        if self.weight_decay_norm_anneal and (
                self.weight_decay_norm <= 0 or self.weight_decay_norm_init <= 0):
            raise ValueError("weight_decay_norm_anneal needs weight_decay_norm "
                             "> 0 and weight_decay_norm_init > 0.")

    @property
    def uses_regularization(self) -> bool:
        return self.weight_decay_norm > 0 or self.weight_decay_norm_anneal


class LossResult(NamedTuple):
    """Loss of one replica's batch and the metrics to log (all float32)."""

    loss: tf.Tensor
    metrics: dict


def bits_per_dim(nats, num_pixels):
    """Converts nats per image to bits per dimension."""
    return nats / (math.log(2.0) * num_pixels)


def compute_loss(model, x, step, objective: ObjectiveConfig, training=True,
                 eps=None, shards=1) -> LossResult:
    """NVAE training loss on a batch (per replica; not yet scaled).

    Args:
      model: an `NVAE`.
      x: images [B, H, W, C] in [0, 1].
      step: global step (scalar), drives beta and lambda.
      objective: the `ObjectiveConfig`.
      training: BN mode and whether the spectral power iteration advances.
      eps: optional per-group noise (see `NVAE.call`).
      shards: batch shards of the forward pass (`NVAE.call`; same loss).

    Returns:
      `LossResult` with the scalar loss and a dict of scalar metrics and the
      per-group vectors `kl_per_group` [G] and `kl_gamma` [G].
    """
    out = model(x, training=training, eps=eps, shards=shards)
    beta = objectives.kl_coeff(step, objective.total_steps,
                               objective.kl_anneal_portion,
                               objective.kl_const_portion,
                               objective.kl_const_coeff)
    alpha = objectives.kl_balancing_alpha(
        model.config.groups_per_decoder_scale)
    kl_term, gamma, kl_means = objectives.balanced_kl(
        out.kl_per_group, beta, alpha)
    loss = tf.reduce_mean(out.recon_loss + kl_term)
    metrics = {}
    if objective.uses_regularization:
        lam = objectives.weight_decay_norm_coeff(
            beta, objective.weight_decay_norm,
            objective.weight_decay_norm_init,
            objective.weight_decay_norm_anneal)
        spectral = model.spectral_regularization(update_state=training)
        bn_reg = objectives.batchnorm_regularization(
            [bn.gamma for bn in model.batchnorm_layers()])
        loss = loss + lam * (spectral + bn_reg)
        metrics.update(spectral_reg=spectral, bn_reg=bn_reg,
                       weight_decay_norm=lam)
    kl_total = tf.add_n(out.kl_per_group)
    active = tf.add_n([
        tf.reduce_sum(tf.cast(g.kl_per_channel > ACTIVE_UNIT_KL, tf.float32))
        for g in out.groups])
    nelbo = tf.reduce_mean(out.nelbo)
    metrics.update(
        loss=loss, nelbo=nelbo, recon=tf.reduce_mean(out.recon_loss),
        kl=tf.reduce_mean(kl_total), kl_coeff=beta, active_units=active,
        bpd=bits_per_dim(nelbo, model.config.num_pixels),
        kl_per_group=kl_means, kl_gamma=gamma)
    return LossResult(loss=loss, metrics=metrics)
