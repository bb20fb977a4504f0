"""Training objective pieces of NVAE: KL warm-up, KL balancing, regularisers.

Small functions of tensors and the training step, each testable alone, plus the
`SpectralRegularizer` layer that keeps the persistent power-iteration state.
Formulas follow NVAE (Vahdat & Kautz, "NVAE: A Deep Hierarchical Variational
Autoencoder", NeurIPS 2020, arXiv:2007.03898) as the official code computes
them. Everything is float32, also under a mixed precision policy.

The full training loss per replica is

    loss = mean_b(recon_b + kl_term_b) + lambda * (SR + BNreg)

with `kl_term` from `balanced_kl`, lambda from `weight_decay_norm_coeff`, SR
from `SpectralRegularizer` and BNreg from `batchnorm_regularization`.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import tensorflow as tf

from nvae_tf.config import ConfigError


# KL balancing: floor added to each group's mean |KL| so that groups with
# (nearly) zero KL still get a finite, positive coefficient.
KL_BALANCE_OFFSET = 0.01
# KL balancing prior 'square' rule: each decoder scale down the hierarchy has
# 2x the resolution, i.e. 4x the latent positions, of the scale above it.
KL_BALANCE_SCALE_BASE = 4.0


def _as_float32(x) -> tf.Tensor:
    return tf.cast(tf.convert_to_tensor(x), tf.float32)


def kl_coeff(step, total_steps, kl_anneal_portion: float = 0.3,
             kl_const_portion: float = 1e-4,
             kl_const_coeff: float = 1e-4) -> tf.Tensor:
    """KL warm-up coefficient beta at a training step.

        beta = max(min((step - c N) / (a N), 1), beta_min)

    with N = `total_steps`, a = `kl_anneal_portion`, c = `kl_const_portion`
    and beta_min = `kl_const_coeff`: beta stays at beta_min for the first
    c N steps, then rises linearly to 1 at (a + c) N steps and stays at 1.

    Args:
      step: the global step (the official counts a process's iterations);
        a python number or a scalar tensor of any numeric dtype (e.g. the
        optimizer's int64 `iterations`).
      total_steps: N, iterations per process over the whole run
        (`steps_per_epoch * epochs`); number or scalar tensor.
      kl_anneal_portion: a, fraction of N over which beta rises to 1.
      kl_const_portion: c, fraction of N held at `kl_const_coeff`.
      kl_const_coeff: beta_min, the floor on beta.

    Returns:
      beta as a float32 scalar tensor.

    Raises:
      ValueError: if `kl_anneal_portion <= 0`, or `total_steps` is a python
        number `<= 0`.
    """
    if kl_anneal_portion <= 0:
        raise ValueError("`kl_anneal_portion` must be > 0. "
                         f"Received: kl_anneal_portion={kl_anneal_portion}")
    if isinstance(total_steps, numbers.Real) and total_steps <= 0:
        raise ValueError("`total_steps` must be > 0. "
                         f"Received: total_steps={total_steps}")
    step = _as_float32(step)
    total_steps = _as_float32(total_steps)
    ramp = ((step - kl_const_portion * total_steps)
            / (kl_anneal_portion * total_steps))
    return tf.maximum(tf.minimum(ramp, 1.0), kl_const_coeff)


def kl_balancing_alpha(groups_per_decoder_scale: Sequence[int]) -> np.ndarray:
    """Per-group KL balancing prior alpha with the official 'square' rule.

    Decoder scale i (i = 0 is the top, coarsest scale) with n_i groups gives
    each of its groups alpha = 4^i / n_i: the group's spatial size relative to
    the top divided by the number of groups sharing that scale. The vector is
    then divided by its minimum.

    Args:
      groups_per_decoder_scale: n_i, groups per decoder scale, top-down (the
        reverse of the encoder's groups per scale; see
        `NVAEConfig.groups_per_decoder_scale`).

    Returns:
      float32 array [G], G = sum(n_i), in top-down group order. E.g. (5, 10)
      gives [1]*5 + [2]*10.

    Raises:
      ValueError: if the sequence is empty or a count is < 1.
    """
    counts = [int(n) for n in groups_per_decoder_scale]
    if not counts or min(counts) < 1:
        raise ValueError("`groups_per_decoder_scale` must be a non-empty list "
                         "of counts >= 1. Received: "
                         f"groups_per_decoder_scale={groups_per_decoder_scale}")
    alpha = np.concatenate([
        np.full(n, KL_BALANCE_SCALE_BASE ** i / n, dtype=np.float64)
        for i, n in enumerate(counts)])
    return (alpha / alpha.min()).astype(np.float32)


def balanced_kl(kl_per_group: Sequence[tf.Tensor], beta, alpha):
    """KL term of the loss with KL balancing during warm-up.

    While beta < 1 each group k gets a balancing coefficient

        a_k     = (mean_b |KL_{b,k}| + 0.01) / alpha_k
        gamma_k = stop_gradient(a_k / mean_j a_j)        (mean_k gamma_k = 1)

    so groups with little KL (relative to their size alpha_k) are pushed to
    encode more. Once beta >= 1 balancing is off: gamma = 1. In both cases

        kl_term_b = beta * sum_k gamma_k KL_{b,k}.

    For evaluation (unbalanced KL) pass beta = 1. The switch is a `tf.where`,
    so `beta` may be a tensor inside `tf.function`.

    Under a `tf.distribute` strategy the batch mean in a_k is over the local
    (per-replica) batch, as in the official code where each GPU balances with
    its own batch; gamma may then differ slightly between replicas.

    Args:
      kl_per_group: G tensors [B], KL of each latent group summed over its
        dimensions, in top-down order (k = 0 is the coarsest group).
      beta: KL warm-up coefficient (`kl_coeff`), number or scalar tensor.
      alpha: [G] balancing prior (`kl_balancing_alpha`).

    Returns:
      (kl_term [B], gamma [G], kl_means [G]), all float32; `kl_means` is
      mean_b KL_{b,k} (for logging).
    """
    kl = tf.stack([_as_float32(k) for k in kl_per_group], axis=1)  # [B, G]
    beta = _as_float32(beta)
    alpha = _as_float32(alpha)
    kl_means = tf.reduce_mean(kl, axis=0)  # [G]
    group_weight = (tf.reduce_mean(tf.abs(kl), axis=0)
                    + KL_BALANCE_OFFSET) / alpha  # [G]
    gamma = tf.stop_gradient(group_weight / tf.reduce_mean(group_weight))
    gamma = tf.where(beta < 1.0, gamma, tf.ones_like(gamma))  # [G]
    kl_term = beta * tf.reduce_sum(kl * gamma, axis=1)  # [B]
    return kl_term, gamma, kl_means


def weight_decay_norm_coeff(beta, weight_decay_norm: float,
                            weight_decay_norm_init: float = 10.,
                            anneal: bool = False) -> tf.Tensor:
    """Coefficient lambda of the spectral and batch-norm regularisers.

    Without annealing lambda = `weight_decay_norm`. With annealing it moves
    geometrically from `weight_decay_norm_init` (beta = 0) to
    `weight_decay_norm` (beta = 1), driven by the KL warm-up beta:

        lambda = exp((1 - beta) ln(init) + beta ln(weight_decay_norm)).

    Args:
      beta: KL warm-up coefficient, number or scalar tensor.
      weight_decay_norm: final lambda (official default 0: regularisers off).
      weight_decay_norm_init: lambda at beta = 0 (used only with `anneal`).
      anneal: the official `--weight_decay_norm_anneal` switch.

    Returns:
      lambda as a float32 scalar tensor.

    Raises:
      ValueError: if `weight_decay_norm < 0`, or with `anneal` if either
        coefficient is not > 0.
    """
    check_weight_decay_norm(weight_decay_norm, weight_decay_norm_init,
                            anneal)
    if not anneal:
        return tf.constant(weight_decay_norm, tf.float32)
    beta = _as_float32(beta)
    return tf.exp((1.0 - beta) * float(np.log(weight_decay_norm_init))
                  + beta * float(np.log(weight_decay_norm)))


def check_weight_decay_norm(weight_decay_norm: float,
                            weight_decay_norm_init: float,
                            anneal: bool) -> None:
    """Checks lambda's settings: >= 0, and > 0 at both ends of the anneal
    (the geometric anneal interpolates their logarithms).

    Raises:
      ConfigError: naming the offending setting.
    """
    if weight_decay_norm < 0:
        raise ConfigError.invalid("weight_decay_norm", weight_decay_norm,
                                  ">= 0")
    if not anneal:
        return
    for name, value in (("weight_decay_norm", weight_decay_norm),
                        ("weight_decay_norm_init", weight_decay_norm_init)):
        if value <= 0:
            raise ConfigError.invalid(
                name, value, "> 0 with weight_decay_norm_anneal (the "
                "geometric anneal interpolates logarithms)")


def batchnorm_regularization(gammas: Sequence[tf.Tensor]) -> tf.Tensor:
    """BN regulariser sum_l max_c |gamma_{l,c}| over batch-norm layers.

    Args:
      gammas: the scale vectors gamma [C_l] of all affine BN layers.

    Returns:
      float32 scalar (0 for an empty list).
    """
    terms = [tf.reduce_max(tf.abs(_as_float32(g))) for g in gammas]
    return tf.add_n(terms) if terms else tf.constant(0.0, tf.float32)

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
            raise ConfigError.invalid("total_steps", self.total_steps,
                                      "an integer >= 1")
        for name in ("kl_anneal_portion", "kl_const_portion",
                     "kl_const_coeff"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError.invalid(name, getattr(self, name),
                                          "a value in [0, 1]")
        if self.kl_anneal_portion == 0.0:
            raise ConfigError.invalid("kl_anneal_portion", 0.0,
                                      "a value in (0, 1]")
        check_weight_decay_norm(self.weight_decay_norm,
                                self.weight_decay_norm_init,
                                self.weight_decay_norm_anneal)

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
                 eps=None) -> LossResult:
    """NVAE training loss on a batch (per replica; not yet scaled).

    Args:
      model: an `NVAE`.
      x: images [B, H, W, C] in [0, 1].
      step: global step (scalar), drives beta and lambda.
      objective: the `ObjectiveConfig`.
      training: BN mode and whether the spectral power iteration advances.
      eps: optional per-group noise (see `NVAE.call`).

    Returns:
      `LossResult` with the scalar loss and a dict of scalar metrics and the
      per-group vectors `kl_per_group` [G] and `kl_gamma` [G].
    """
    out = model(x, training=training, eps=eps)
    beta = kl_coeff(step, objective.total_steps,
                               objective.kl_anneal_portion,
                               objective.kl_const_portion,
                               objective.kl_const_coeff)
    alpha = kl_balancing_alpha(
        model.config.groups_per_decoder_scale)
    kl_term, gamma, kl_means = balanced_kl(
        out.kl_per_group, beta, alpha)
    loss = tf.reduce_mean(out.recon_loss + kl_term)
    metrics = {}
    if objective.uses_regularization:
        lam = weight_decay_norm_coeff(
            beta, objective.weight_decay_norm,
            objective.weight_decay_norm_init,
            objective.weight_decay_norm_anneal)
        spectral = model.spectral_regularization(update_state=training)
        bn_reg = batchnorm_regularization(
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
