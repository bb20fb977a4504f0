"""Inference functions that read the model's weights as graph constants.

In inference much of every NVAE call depends on the weights alone: the
weight-normalised kernels, the batch norms folded into convolutions, the
inverted residuals' folded expansions (about 2,000 small ops per mnist-small
call). Read from variables, these are recomputed on every call. Traced with
the weights' current values as constants, TensorFlow's constant folding
(a Grappler pass) computes them once, when the function is first optimised,
and every later call runs only the image-dependent ops. On the 2-core
machine of issue 7 this made mnist-small evaluation 0.90x and sampling
0.93x as long per call, with bit-identical results (docs/performance.md,
tests/test_constant_weights.py).

The function is a snapshot: it keeps the weights of the moment it was made
and must be made again after they change (training, a restored checkpoint,
re-estimated batch norm statistics). It must not change model state either:
the model's noise counter would not advance, so such a function refuses to
trace; pass explicit seeds (all of `inference`, `evaluate` and `export` do).
The constants hold a copy of the weights (and the folded tensors one more):
about 3x the weights' memory, 10-15 MB for the benchmark presets.
"""

from __future__ import annotations

import functools

import keras
import tensorflow as tf


def with_constant_weights(model: keras.Model, fn):
    """`fn` with every variable of `model` read as a constant of its value now.

    Args:
      model: the Keras model whose variables `fn` reads.
      fn: a function of tensors; trace the returned function in a
        `tf.function` (constant folding happens when the graph is optimised).

    Returns:
      A function with `fn`'s signature and results.

    Raises:
      ValueError (when traced): `fn` assigned one of the model's variables,
        e.g. drew noise from the model's counter instead of a given seed.
    """
    variables = list(model.variables)
    values = [v.numpy() for v in variables]  # the snapshot

    @functools.wraps(fn)
    def traced_with_constants(*args, **kwargs):
        constants = [tf.constant(value) for value in values]
        with keras.StatelessScope(
                state_mapping=list(zip(variables, constants))) as scope:
            result = fn(*args, **kwargs)
        assigned = [v.path for v, c in zip(variables, constants)
                    if scope.get_current_value(v) is not c]
        if assigned:
            raise ValueError(
                f"{fn.__name__} assigned the model variables {assigned}; a "
                "function with constant weights must not change model state. "
                "Pass an explicit seed (the noise counter cannot advance) and "
                "run batch norm in inference mode.")
        return result

    return traced_with_constants
