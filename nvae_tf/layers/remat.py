"""Recomputation (rematerialisation) of residual cells in the backward pass.

A training step keeps, for the backward pass, every activation of every
residual cell; for NVAE these dominate the step's memory. A recomputed
segment of cells keeps only its input: the backward pass runs the segment's
forward again (under a gradient tape) when its gradient is needed. This is
Keras' own `keras.remat` (on the TensorFlow backend `tf.recompute_grad`),
which also differentiates the variables the segment reads.

The forward of a segment therefore runs twice per step. Batch norm in
training mode updates its moving statistics as a side effect; the second,
recomputed forward must not update them again, so it runs inside
`recomputing()`, which `BatchNorm` checks. Its normalisation uses the same
batch statistics in both runs, so the recomputed activations, and with them
the loss and the gradients, equal those of a step without recomputation.
"""

import contextlib
import contextvars

import keras

# What `NVAE(remat=...)` recomputes in training: nothing; each residual
# cell on its own; or the residual cells of each latent group of the encoder
# and decoder towers as one segment (the other cells one by one).
REMAT_MODES = ("none", "cells", "groups")

_RECOMPUTING = contextvars.ContextVar("nvae_recomputing", default=False)


def recomputing() -> bool:
    """True while a recomputed forward (in the backward pass) is traced."""
    return _RECOMPUTING.get()


@contextlib.contextmanager
def _in_recomputation():
    token = _RECOMPUTING.set(True)
    try:
        yield
    finally:
        _RECOMPUTING.reset(token)


def recompute(fn):
    """`fn(*tensors)` whose activations are recomputed for its gradient.

    A wrapper is meant for one call site of one trace: its first call is the
    forward pass (state updates happen there), every later call is a
    recomputation for a gradient, inside `recomputing()`.

    Args:
      fn: a function of tensors returning a tensor or a list of tensors.

    Returns:
      The function with `keras.remat`'s custom gradient.
    """
    forward_done = []

    def once_stateful(*args):
        if not forward_done:
            forward_done.append(True)
            return fn(*args)
        with _in_recomputation():
            return fn(*args)

    return keras.remat(once_stateful)


def check_remat_mode(remat: str) -> str:
    """`remat` if it names a mode of `REMAT_MODES`, else a ValueError."""
    if remat not in REMAT_MODES:
        raise ValueError(f"remat={remat!r} is invalid: expected one of "
                         f"{', '.join(REMAT_MODES)}.")
    return remat
