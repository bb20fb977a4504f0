"""Multiply-adds of a traced function, and the machine's rate for them.

The convolutions and matrix products of a `tf.function` fix how much
arithmetic a call must do; divided by the fastest float32 multiply-add rate
this machine reaches (`peak_rate`), they give a lower bound of the call's
time that no kernel, thread or graph setting can beat without changing the
arithmetic (another algorithm or a narrower dtype). The benchmark reports
both (`python -m benchmarks.bench`, `*_gmacs`, `*_bound_s`).

Counted ops (one multiply-add per kernel tap, input channel and output
element): `Conv2D` and its two gradients, `DepthwiseConv2dNative` and its
gradients, `MatMul`, `BatchMatMul`. Everything else (element-wise ops,
reductions, normals) is memory-bound work that comes on top. A called
function is counted at each call, a loop's body (`while_loop`) once and
both branches of a conditional.
"""

from __future__ import annotations

import collections
import time

# Op type -> (kind, input index of the kernel (None: the op's output is
# the kernel gradient), input index of the output gradient dy (None: the
# op's output is the convolution's output)).
_CONVOLUTIONS = {
    "Conv2D": ("convolution", 1, None),
    "_FusedConv2D": ("convolution", 1, None),
    "Conv2DBackpropInput": ("convolution gradient", 1, 2),
    "Conv2DBackpropFilter": ("convolution gradient", None, 2),
    "DepthwiseConv2dNative": ("depthwise", 1, None),
    "DepthwiseConv2dNativeBackpropInput": ("depthwise gradient", 1, 2),
    "DepthwiseConv2dNativeBackpropFilter": ("depthwise gradient", None, 2),
}
_MATMULS = {"MatMul": "transpose_a", "_FusedMatMul": "transpose_a",
            "BatchMatMul": "adj_x", "BatchMatMulV2": "adj_x",
            "BatchMatMulV3": "adj_x"}

# Call, loop and conditional ops -> attributes naming the functions run.
_FUNCTION_ATTRS = {"PartitionedCall": ("f",),
                   "StatefulPartitionedCall": ("f",),
                   "While": ("body",), "StatelessWhile": ("body",),
                   "If": ("then_branch", "else_branch"),
                   "StatelessIf": ("then_branch", "else_branch")}

# `peak_rate`: float32 matrix products of this size, one per core.
PEAK_MATRIX_SIZE = 512
PEAK_CALLS = 30


def _dims(shape, op) -> list:
    dims = shape.as_list() if shape.rank is not None else None
    if dims is None or None in dims:
        raise ValueError(
            f"op {op.name} ({op.type}) has the shape {shape}, not known "
            f"when the function was traced: count the multiply-adds of a "
            f"function traced with fully defined input shapes.")
    return dims


def _product(values) -> int:
    result = 1
    for value in values:
        result *= int(value)
    return result


def _op_multiply_adds(op):
    """(kind, multiply-adds) of one op, or None for an uncounted op."""
    if op.type in _CONVOLUTIONS:
        kind, kernel_at, dy_at = _CONVOLUTIONS[op.type]
        kernel = (_dims(op.outputs[0].shape, op) if kernel_at is None
                  else _dims(op.inputs[kernel_at].shape, op))
        out = _dims(op.inputs[dy_at].shape if dy_at is not None
                    else op.outputs[0].shape, op)
        taps = kernel[0] * kernel[1]
        kind = f"{kind} {kernel[0]}x{kernel[1]}"
        if kind.startswith("depthwise"):  # taps per output element
            return kind, _product(out) * taps
        return kind, _product(out) * taps * kernel[2]
    if op.type in _MATMULS:
        a = _dims(op.inputs[0].shape, op)
        transposed = op.get_attr(_MATMULS[op.type])
        inner = a[-2] if transposed else a[-1]
        return "matmul", _product(_dims(op.outputs[0].shape, op)) * inner
    return None


def count(graph, _library=None) -> dict:
    """Multiply-adds of the graph (a `FuncGraph` or `tf.Graph`) by kind.

    Args:
      graph: e.g. `concrete_function.graph`.

    Returns:
      {kind: multiply-adds} for the kinds present, kinds: `matmul` and
      `convolution KHxKW`, `convolution gradient KHxKW`, `depthwise
      KHxKW`, `depthwise gradient KHxKW` by kernel size (both gradients
      of a convolution under one kind).

    Raises:
      ValueError: a counted op's shape was not known at trace time.
    """
    # The graphs of called functions, loop bodies and branches, by name,
    # as the graph that calls them keeps them (a private FuncGraph
    # attribute).
    library = dict(_library or {})
    for name, function in getattr(graph, "_functions", {}).items():
        if getattr(function, "graph", None) is not None:
            library[name] = function.graph
    totals = collections.Counter()
    for op in graph.get_operations():
        counted = _op_multiply_adds(op)
        if counted is not None:
            totals[counted[0]] += counted[1]
        for attr in _FUNCTION_ATTRS.get(op.type, ()):
            name = op.get_attr(attr).name
            name = name.decode() if isinstance(name, bytes) else name
            if name not in library:
                raise ValueError(
                    f"op {op.name} ({op.type}) calls the function {name}, "
                    f"whose graph is not available to count.")
            totals.update(count(library[name], library))
    return dict(totals)


def function_multiply_adds(concrete_function) -> int:
    """Total multiply-adds of one call of a concrete function."""
    return sum(count(concrete_function.graph).values())


def peak_rate(parallel: int, size: int = PEAK_MATRIX_SIZE,
              calls: int = PEAK_CALLS) -> float:
    """Float32 multiply-adds per second of `parallel` independent matmuls.

    One `tf.function` runs `parallel` [size, size] products at once (one per
    core with `parallel` = cores; TensorFlow's executor spreads them over
    its threads, as it does a call's independent ops): the fastest rate
    these oneDNN kernels reach with the process' thread settings.

    Returns:
      multiply-adds per second of the fastest of `calls` calls (a floor
      must not assume a rate slower than the machine can reach).
    """
    import tensorflow as tf

    generator = tf.random.Generator.from_seed(0)
    matrices = [generator.normal([size, size]) for _ in range(parallel)]

    @tf.function
    def products():
        return [tf.matmul(m, m) for m in matrices]

    concrete = products.get_concrete_function()
    work = function_multiply_adds(concrete)
    _ = [p.numpy() for p in products()]  # traces and warms up
    seconds = []
    for _ in range(calls):
        start = time.perf_counter()
        _ = [p.numpy() for p in products()]
        seconds.append(time.perf_counter() - start)
    return work / min(seconds)
