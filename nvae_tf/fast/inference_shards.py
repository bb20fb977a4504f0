"""Batch shards: inference on one CPU core per part of the batch.

In inference every image is independent (batch norm uses its running
statistics), so a batch can be cut into S parts that run as S independent
chains of ops in one graph. With one intra-op thread and S inter-op threads,
TensorFlow runs each chain on its own core, single-threaded: the small
convolutions of the 4x4-16x16 latent scales and the element-wise ops then
avoid splitting every op over the cores, which makes evaluation and
sampling on a CPU faster than one chain with all intra-op threads
(docs/performance.md). With the default threads (every op
split over all cores) shards gain nothing; `configure_shard_threads`
sets the threads that pair with them.

The noise of the whole batch is drawn before the cut and the parts are
concatenated in order, so a sharded call returns what the unsharded call
returns for the same noise (tests/fast/test_inference_shards.py). Tensors made from
the weights alone (weight-normalised kernels, folded batch norms: methods
marked `shared_across_shards`) are computed once per call and used by every
part, not traced and run once per part.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os

import tensorflow as tf

# Weight-derived tensors of the sharded call being traced or run:
# {key: (tensor(s), objects the key's ids refer to)}; None outside one.
_SHARED_WEIGHTS = contextvars.ContextVar("nvae_tf_shared_weights",
                                         default=None)

# What `shards=0` means for a CPU process: one shard per core.
AUTO = 0


@contextlib.contextmanager
def sharing_weights():
    """Within: `shared_across_shards` methods compute each result once."""
    token = _SHARED_WEIGHTS.set({})
    try:
        yield
    finally:
        _SHARED_WEIGHTS.reset(token)


def shared_across_shards(method):
    """Marks a layer method whose result depends on the weights only.

    Inside `sharing_weights()` a call with the same layer and arguments (by
    identity) in the same graph returns the first call's tensors; elsewhere
    the method runs as usual.
    """
    @functools.wraps(method)
    def wrapper(self, *args):
        cache = _SHARED_WEIGHTS.get()
        if cache is None:
            return method(self, *args)
        graph = tf.compat.v1.get_default_graph()
        key = (id(graph), id(self), method.__name__) + tuple(map(id, args))
        if key not in cache:
            cache[key] = (method(self, *args), (graph, self, args))
        return cache[key][0]

    return wrapper


class Parts(tuple):
    """A training batch held as consecutive parts (training shards).

    Each part is traced as its own chain of ops, so that with one intra-op
    thread per core the parts run at the same time; only batch norm, whose
    statistics cover the whole batch, combines them (`layers.norm`). Layers
    pass `Parts` on through `apply`; per-sample code maps over them with
    `each`. On plain tensors both call through, so the unsharded graph is
    unchanged.
    """


def each(fn, *args):
    """`fn` on every part of the `Parts` among `args`, as `Parts`.

    Arguments that are not `Parts` are passed to every call as they are;
    with none, this is `fn(*args)`.
    """
    sizes = {len(a) for a in args if isinstance(a, Parts)}
    if not sizes:
        return fn(*args)
    if len(sizes) > 1:
        raise ValueError(f"Parts of different lengths: {sorted(sizes)}.")
    return Parts(fn(*[a[i] if isinstance(a, Parts) else a for a in args])
                 for i in range(sizes.pop()))


def apply(layer, inputs, **kwargs):
    """`layer(inputs, **kwargs)`; on `Parts`, parts-aware.

    A layer whose class sets `HANDLES_PARTS` gets all parts at once through
    its `call` (it holds a batch norm); any other layer is called once per
    part.
    """
    if not isinstance(inputs, Parts):
        return layer(inputs, **kwargs)
    if getattr(layer, "HANDLES_PARTS", False):
        return layer.call(inputs, **kwargs)
    return Parts(layer(part, **kwargs) for part in inputs)


def default_shards() -> int:
    """One shard per CPU core available to this process."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def resolve_shards(shards: int) -> int:
    """`shards`, with `AUTO` (0) as one per core; refuses negative values."""
    if shards < 0:
        raise ValueError(f"shards must be >= 0 (0: one per CPU core), got "
                         f"{shards}.")
    return default_shards() if shards == AUTO else shards


def configure_shard_threads(shards: int) -> None:
    """Threads for a process running batch shards: 1 intra-op, `shards`
    inter-op (one single-threaded chain of ops per core).

    Must run before TensorFlow initialises its runtime (before the first
    op). Does nothing for `shards` <= 1 (TensorFlow's defaults stay).
    """
    if shards > 1:
        tf.config.threading.set_intra_op_parallelism_threads(1)
        tf.config.threading.set_inter_op_parallelism_threads(shards)


def shard_sizes(batch_size, shards: int):
    """Sizes of `shards` consecutive parts of a batch, as equal as possible.

    A Python list when `batch_size` is a Python int (at most `batch_size`
    parts, none empty), else an int32 tensor [shards] (parts may be empty
    when the batch is smaller than `shards`).
    """
    if isinstance(batch_size, int):
        parts = max(1, min(shards, batch_size))
        quotient, remainder = divmod(batch_size, parts)
        return [quotient + (i < remainder) for i in range(parts)]
    batch_size = tf.convert_to_tensor(batch_size, tf.int32)
    quotient, remainder = batch_size // shards, batch_size % shards
    return quotient + tf.cast(tf.range(shards) < remainder, tf.int32)


def static_batch_size(tensor):
    """The batch dimension as a Python int if known, else a scalar tensor."""
    size = tensor.shape[0]
    return int(size) if size is not None else tf.shape(tensor)[0]


def split(tensors, sizes):
    """Splits every tensor of a list along axis 0 into parts of `sizes`.

    Returns one list per part.
    """
    num = len(sizes) if isinstance(sizes, list) else int(sizes.shape[0])
    if num == 1:
        return [list(tensors)]
    pieces = [tf.split(t, sizes, axis=0, num=num) for t in tensors]
    return [list(part) for part in zip(*pieces)]


def concat(parts):
    """Concatenates same-structured nests of [B_i, ...] tensors on axis 0.

    `None` leaves stay `None`.
    """
    if len(parts) == 1:
        return parts[0]
    return tf.nest.map_structure(
        lambda *ts: None if ts[0] is None else tf.concat(ts, axis=0), *parts)


def run(fn, tensors, batch_size, shards: int, merge):
    """`fn` on every part of the batch, the results joined by `merge`.

    Args:
      fn: list of tensors (a part of each of `tensors`) -> result.
      tensors: list of [B, ...] tensors.
      batch_size: B, a Python int or a scalar tensor.
      shards: number of parts.
      merge: (list of results, sizes) -> result of the whole batch.

    With a batch size known only at run time, a batch smaller than `shards`
    (which would leave a part empty) runs as one part (`tf.cond`).
    """
    def sharded():
        sizes = shard_sizes(batch_size, shards)
        with sharing_weights():
            outputs = [fn(part) for part in split(tensors, sizes)]
        return merge(outputs, sizes)

    if shards == 1:
        return fn(list(tensors))
    if isinstance(batch_size, int):
        return sharded()
    return tf.cond(batch_size >= shards, sharded, lambda: fn(list(tensors)))


def batch_weighted_mean(values, sizes):
    """Mean of per-part batch means, weighted by the parts' sizes."""
    weights = tf.cast(tf.convert_to_tensor(sizes), tf.float32)
    stacked = tf.stack(values)
    weights = tf.reshape(weights, [-1] + [1] * (stacked.shape.rank - 1))
    return tf.reduce_sum(stacked * weights, axis=0) / tf.reduce_sum(weights)
