"""Training objective pieces of NVAE: KL warm-up, KL balancing, regularisers.

Small functions of tensors and the training step, each testable alone, plus the
`SpectralRegularizer` layer that keeps the persistent power-iteration state.
Formulas follow NVAE (Vahdat & Kautz, "NVAE: A Deep Hierarchical Variational
Autoencoder", NeurIPS 2020, arXiv:2007.03898) as the official code computes
them (NVAE_SPEC.md sections 5.2-5.6). Everything is float32, also under a mixed
precision policy.

The full training loss per replica is

    loss = mean_b(recon_b + kl_term_b) + lambda * (SR + BNreg)

with `kl_term` from `balanced_kl`, lambda from `weight_decay_norm_coeff`, SR
from `SpectralRegularizer` and BNreg from `batchnorm_regularization`.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from nvae_tf.layers.tracking import CheckpointableCollections

# KL balancing: floor added to each group's mean |KL| so that groups with
# (nearly) zero KL still get a finite, positive coefficient.
KL_BALANCE_OFFSET = 0.01
# KL balancing prior 'square' rule: each decoder scale down the hierarchy has
# 2x the resolution, i.e. 4x the latent positions, of the scale above it.
KL_BALANCE_SCALE_BASE = 4.0
# Power iteration: normalize(x) = x / max(||x||, eps).
POWER_ITERATION_EPS = 1e-3
# The first call (fresh u, v) runs this many times `num_power_iterations`.
FIRST_CALL_ITERATION_MULTIPLIER = 10


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
      step: the global step (per-process iteration count, spec pitfall 24);
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
    if weight_decay_norm < 0:
        raise ValueError("`weight_decay_norm` must be >= 0. "
                         f"Received: weight_decay_norm={weight_decay_norm}")
    if not anneal:
        return tf.constant(weight_decay_norm, tf.float32)
    for name, value in (("weight_decay_norm", weight_decay_norm),
                        ("weight_decay_norm_init", weight_decay_norm_init)):
        if value <= 0:
            raise ValueError(f"`{name}` must be > 0 when annealing. "
                             f"Received: {name}={value}")
    beta = _as_float32(beta)
    return tf.exp((1.0 - beta) * float(np.log(weight_decay_norm_init))
                  + beta * float(np.log(weight_decay_norm)))


def batchnorm_regularization(gammas: Sequence[tf.Tensor]) -> tf.Tensor:
    """BN regulariser sum_l max_c |gamma_{l,c}| over batch-norm layers.

    Args:
      gammas: the scale vectors gamma [C_l] of all affine BN layers.

    Returns:
      float32 scalar (0 for an empty list).
    """
    terms = [tf.reduce_max(tf.abs(_as_float32(g))) for g in gammas]
    return tf.add_n(terms) if terms else tf.constant(0.0, tf.float32)


def _normalize(x: tf.Tensor) -> tf.Tensor:
    """x / max(||x||, eps) along the last axis."""
    norm = tf.norm(x, axis=-1, keepdims=True)
    return x / tf.maximum(norm, POWER_ITERATION_EPS)


@keras.saving.register_keras_serializable(package="nvae_tf")
class SpectralRegularizer(CheckpointableCollections, keras.layers.Layer):
    """Spectral regulariser SR = sum_i sigma(W_i) by persistent power iteration.

    For each matrix W [rows, cols] (a conv kernel reshaped to
    [C_out, C_in/groups * kh * kw]) the layer keeps unit vectors u [rows],
    v [cols]. One power iteration (no gradient) is

        v <- normalize(W^T u),   u <- normalize(W v),
        normalize(x) = x / max(||x||, 1e-3),

    and the estimate is sigma(W) = u^T W v with u, v constant, so
    d sigma / d W = u v^T. The first call runs
    `FIRST_CALL_ITERATION_MULTIPLIER * num_power_iterations` (40) iterations
    from u, v ~ N(0, 1) normalised; every later call continues from the
    stored u, v with `num_power_iterations` (4) iterations.

    Matrices of equal shape share a bucket and are iterated together as one
    batched matmul. `build(shapes)` fixes the list of shapes; every call must
    pass matrices of those shapes in the same order. Per bucket the state is
    two non-trainable weights `u_RxC` [n, rows] and `v_RxC` [n, cols]
    (aggregation "mean", so replicas of a `tf.distribute` strategy stay
    identical), plus one flag `initialized` for the whole layer. Unlike the
    official code, the state is saved with the model's weights, so a resumed
    run continues with 4 iterations (a converted PyTorch checkpoint has none:
    the flag stays 0 and the first call runs 40).

    The layer computes in float32 whatever the global dtype policy.

    Args:
      num_power_iterations: iterations per call after the first.
      seed: seed of the N(0, 1) initial u, v.
    """

    def __init__(self, num_power_iterations: int = 4, seed: int | None = None,
                 **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        if int(num_power_iterations) != num_power_iterations or (
                num_power_iterations < 1):
            raise ValueError("`num_power_iterations` must be an int >= 1. "
                             f"Received: num_power_iterations="
                             f"{num_power_iterations}")
        self.num_power_iterations = int(num_power_iterations)
        self.seed = seed
        self._buckets: list[list[int]] = []  # matrix indices per bucket
        self._bucket_shapes: list[tuple[int, int]] = []
        self._u: list[keras.Variable] = []
        self._v: list[keras.Variable] = []

    def build(self, shapes):
        """Creates the bucket state for matrices of the given 2-D `shapes`."""
        shapes = [tuple(int(d) for d in s) for s in shapes]
        for s in shapes:
            if len(s) != 2:
                raise ValueError("Every matrix must be 2-D [rows, cols]. "
                                 f"Received shape: {s}")
        index = {}
        for i, s in enumerate(shapes):
            if s not in index:
                index[s] = len(self._buckets)
                self._buckets.append([])
                self._bucket_shapes.append(s)
            self._buckets[index[s]].append(i)
        self._num_matrices = len(shapes)
        seed = self.seed
        for b, (rows, cols) in enumerate(self._bucket_shapes):
            n = len(self._buckets[b])
            for store, width, tag in ((self._u, rows, "u"),
                                      (self._v, cols, "v")):
                init_seed = None if seed is None else seed + 2 * b + (
                    tag == "v")
                store.append(self.add_weight(
                    shape=(n, width), name=f"{tag}_{rows}x{cols}",
                    initializer=keras.initializers.RandomNormal(
                        stddev=1.0, seed=init_seed),
                    trainable=False, aggregation="mean"))
        # All replicas set the same value; "only_first_replica" also works for
        # an integer variable, where "mean" would not.
        self.initialized = self.add_weight(
            shape=(), dtype="int32", name="initialized", initializer="zeros",
            trainable=False, aggregation="only_first_replica")

    def _power_iterate(self, weight, u, v, num_iterations):
        """Runs `num_iterations` batched power iterations; weight [n, r, c]."""
        def body(i, u, v):
            v = _normalize(tf.linalg.matvec(weight, u, transpose_a=True))
            u = _normalize(tf.linalg.matvec(weight, v))
            return i + 1, u, v

        _, u, v = tf.while_loop(
            lambda i, u, v: i < num_iterations, body,
            (tf.constant(0, tf.int32), u, v))
        return u, v

    def call(self, matrices, update_state: bool = True):
        """Returns sum_i sigma(W_i) (float32 scalar) for the list `matrices`.

        Args:
          matrices: the 2-D tensors W_i [rows, cols], shapes and order as in
            `build`.
          update_state: store the new u, v (and mark the state initialized);
            False leaves the state untouched (e.g. for logging).
        """
        if len(matrices) != self._num_matrices:
            raise ValueError(f"Expected {self._num_matrices} matrices, "
                             f"received {len(matrices)}.")
        initialized = tf.cast(self.initialized, tf.bool)
        num_iterations = tf.where(
            initialized, self.num_power_iterations,
            FIRST_CALL_ITERATION_MULTIPLIER * self.num_power_iterations)
        total = tf.constant(0.0, tf.float32)
        for b, indices in enumerate(self._buckets):
            weight = tf.stack([tf.cast(matrices[i], tf.float32)
                               for i in indices])  # [n, rows, cols]
            u0 = tf.convert_to_tensor(self._u[b])  # [n, rows]
            v0 = tf.convert_to_tensor(self._v[b])  # [n, cols]
            # Fresh N(0, 1) vectors are normalised once before iterating.
            u0 = tf.where(initialized, u0, _normalize(u0))
            v0 = tf.where(initialized, v0, _normalize(v0))
            u, v = self._power_iterate(
                tf.stop_gradient(weight), u0, v0, num_iterations)
            u, v = tf.stop_gradient(u), tf.stop_gradient(v)
            if update_state:
                self._u[b].assign(u)
                self._v[b].assign(v)
            # sigma_i = u_i^T W_i v_i, gradient u_i v_i^T.
            total += tf.reduce_sum(u * tf.linalg.matvec(weight, v))
        if update_state:
            self.initialized.assign(1)
        return total

    def compute_output_shape(self, shapes):
        return ()

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(),
                "num_power_iterations": self.num_power_iterations,
                "seed": self.seed}
