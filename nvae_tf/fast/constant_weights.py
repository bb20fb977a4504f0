"""Inference functions that read the model's weights as graph constants.

In inference much of every NVAE call depends on the weights alone: the
weight-normalised kernels, the batch norms folded into convolutions, the
inverted residuals' folded expansions (about 2,000 small ops per mnist-small
call). Read from variables, these are recomputed on every call. Traced with
the weights' current values as constants, TensorFlow's constant folding
(a Grappler pass) computes them once, when the function is first optimised,
and every later call runs only the image-dependent ops: shorter calls
(docs/performance.md) with the same results to float32 rounding
(bit-identical on the benchmark presets; tests/fast/test_constant_weights.py).

The function is a snapshot: it keeps the weights of the moment it was made
and must be made again after they change (training, a restored checkpoint,
re-estimated batch norm statistics). It must not change model state either:
the model's noise counter would not advance, so such a function refuses to
trace; pass explicit seeds (all of `inference`, `evaluate` and `export` do).
Memory: the graph, its optimised copy and the kernels each hold the
constants, and the folded tensors come on top (the peak memory of the
benchmark presets: docs/performance.md). Weights over `MAX_CONSTANT_BYTES`
are refused (a graph is a protocol buffer of at most 2 GB); such models
read their variables.
"""

from __future__ import annotations

import functools

import keras
import numpy as np
import tensorflow as tf

# A graph is one protocol buffer of at most 2 GB, and optimising it holds
# more copies of its constants: larger weights stay variables.
MAX_CONSTANT_BYTES = 1 << 30


def with_substituted_weights(fn, substitutes):
    """`fn` with each given model variable read as its substitute.

    The substitutes take effect through a `keras.StatelessScope` entered
    each time the returned function is traced: only the traced graph sees
    them, and the variables themselves are never touched.

    Args:
      fn: a function of tensors; trace the returned function in a
        `tf.function`.
      substitutes: [(Keras variable, value)]; a value is an array or tensor
        of the variable's shape, a graph constant of the trace.

    Returns:
      A function with `fn`'s signature and results.

    Raises:
      ValueError: (when traced) `fn` assigned one of the substituted
        variables, e.g. drew noise from the model's counter instead of a
        given seed.
    """
    substitutes = list(substitutes)

    @functools.wraps(fn)
    def traced_with_substitutes(*args, **kwargs):
        tensors = [tf.constant(value, dtype=variable.dtype)
                   for variable, value in substitutes]
        variables = [variable for variable, _ in substitutes]
        with keras.StatelessScope(
                state_mapping=list(zip(variables, tensors))) as scope:
            result = fn(*args, **kwargs)
        assigned = [v.path for v, t in zip(variables, tensors)
                    if scope.get_current_value(v) is not t]
        if assigned:
            raise ValueError(
                f"{fn.__name__} assigned the model variables {assigned}; a "
                "function with substituted weights must not change model "
                "state. Pass an explicit seed (the noise counter cannot "
                "advance) and run batch norm in inference mode.")
        return result

    return traced_with_substitutes


def with_constant_weights(model: keras.Model, fn, substitutes=()):
    """`fn` with every variable of `model` read as a constant of its value now.

    Args:
      model: the Keras model whose variables `fn` reads.
      fn: a function of tensors; trace the returned function in a
        `tf.function` (constant folding happens when the graph is optimised).
      substitutes: [(variable of `model`, value)] read instead of those
        variables' current values (e.g. re-estimated batch norm statistics).

    Returns:
      A function with `fn`'s signature and results.

    Raises:
      ValueError: the weights take more than `MAX_CONSTANT_BYTES`; or (when
        traced) `fn` assigned one of the model's variables, e.g. drew noise
        from the model's counter instead of a given seed.
    """
    replaced = {id(variable): value for variable, value in substitutes}
    variables = list(model.variables)
    # The snapshot.
    values = [replaced[id(v)] if id(v) in replaced else v.numpy()
              for v in variables]
    size = sum(np.asarray(value).nbytes for value in values)
    if size > MAX_CONSTANT_BYTES:
        raise ValueError(
            f"{model.name} has {size / 2**20:.0f} MB of weights, more than "
            f"graph constants may hold ({MAX_CONSTANT_BYTES / 2**20:.0f} MB);"
            " read them as variables instead (constant_weights=False, "
            "--noconstant_weights).")
    return with_substituted_weights(fn, zip(variables, values))
