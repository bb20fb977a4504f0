"""Spectral regularisation of NVAE: the largest singular value of each kernel.

NVAE (Vahdat & Kautz, NeurIPS 2020, section 3.3) bounds the Lipschitz constant
of the encoder and decoder by adding lambda * sum_i sigma(W_i) to the loss;
sigma is estimated by power iteration whose vectors persist across steps, so
the estimate is a layer with state.
"""

from __future__ import annotations

from typing import Any

import keras
import tensorflow as tf

from nvae_tf.layers.tracking import CheckpointableCollections

# Power iteration: normalize(x) = x / max(||x||, eps).
POWER_ITERATION_EPS = 1e-3
# The first call (fresh u, v) runs this many times `num_power_iterations`.
FIRST_CALL_ITERATION_MULTIPLIER = 10


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

    def _power_iterate(self, weight, u, v, num_iterations, transposed):
        """Runs `num_iterations` batched power iterations.

        `weight` is [n, r, c], or its transpose [n, c, r] if `transposed`.
        """
        def body(i, u, v):
            v = _normalize(tf.linalg.matvec(weight, u,
                                            transpose_a=not transposed))
            u = _normalize(tf.linalg.matvec(weight, v, transpose_a=transposed))
            return i + 1, u, v

        _, u, v = tf.while_loop(
            lambda i, u, v: i < num_iterations, body,
            (tf.constant(0, tf.int32), u, v))
        return u, v

    def call(self, matrices, update_state: bool = True,
             transposed: bool = False):
        """Returns sum_i sigma(W_i) (float32 scalar) for the list `matrices`.

        Args:
          matrices: the 2-D tensors W_i [rows, cols], shapes and order as in
            `build`; their transposes W_i^T [cols, rows] if `transposed`.
          update_state: store the new u, v (and mark the state initialized);
            False leaves the state untouched (e.g. for logging).
          transposed: `matrices` are the W_i^T (a conv kernel is W^T up to a
            reshape, so it needs no transposed copy).
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
            bucket = [tf.cast(matrices[i], tf.float32) for i in indices]
            u0 = tf.convert_to_tensor(self._u[b])  # [n, rows]
            v0 = tf.convert_to_tensor(self._v[b])  # [n, cols]
            # Fresh N(0, 1) vectors are normalised once before iterating.
            u0 = tf.where(initialized, u0, _normalize(u0))
            v0 = tf.where(initialized, v0, _normalize(v0))
            # The stacked copy [n, rows, cols] serves the power iteration
            # only (no gradient), and is freed after it.
            u, v = self._power_iterate(
                tf.stack([tf.stop_gradient(w) for w in bucket]), u0, v0,
                num_iterations, transposed)
            u, v = tf.stop_gradient(u), tf.stop_gradient(v)
            if update_state:
                self._u[b].assign(u)
                self._v[b].assign(v)
            # sigma_i = u_i^T W_i v_i, gradient u_i v_i^T, matrix by matrix:
            # through a stack, the gradient would be a stacked copy of all
            # of them, sliced into another.
            for j, weight in enumerate(bucket):
                left, right = (v[j], u[j]) if transposed else (u[j], v[j])
                total += tf.tensordot(
                    left, tf.linalg.matvec(weight, right), 1)
        if update_state:
            self.initialized.assign(1)
        return total

    def compute_output_shape(self, shapes):
        return ()

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(),
                "num_power_iterations": self.num_power_iterations,
                "seed": self.seed}
