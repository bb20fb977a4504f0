"""Inference shards: one CPU core per part of the batch, at the model boundary.

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

`forward` and `sample` wrap an `NVAE`: they draw the noise of the whole batch
first, call the model on every part and join the parts in order, so a
sharded call returns what the unsharded call returns for the same noise.
The model knows nothing of shards. Tensors made from the weights alone
(weight-normalised kernels, folded batch norms) are computed by every part's
call; with the weights as graph constants (`constant_weights`, the default of
evaluation and export) constant folding computes them once when the graph is
optimised.
"""

from __future__ import annotations

import os

import tensorflow as tf

from nvae_tf.fast import graph_options
from nvae_tf.model import NVAESample

# What `shards=0` means for a CPU process: one shard per core.
AUTO = 0


def default_shards() -> int:
    """One shard per CPU core available to this process on a CPU-only host;
    1 where a GPU or TPU is visible (the accelerator runs the whole batch
    as one call; shards only pay on CPU cores)."""
    if graph_options.accelerator_visible():
        return 1
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
        return merge([fn(part) for part in split(tensors, sizes)], sizes)

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


def _check_shards(shards):
    if not isinstance(shards, int) or shards < 1:
        raise ValueError(f"shards must be a positive int, got {shards!r}; "
                         "pass 1 for an unsharded call.")
    return shards


def merge_outputs(outputs, sizes):
    """One `NVAEOutput` from those of consecutive parts of a batch.

    Per-image fields are concatenated; the per-channel KL of each group (a
    batch mean) is the mean over the whole batch, not over the parts.
    """
    groups = concat([[g._replace(kl_per_channel=None) for g in out.groups]
                     for out in outputs])
    per_channel = [batch_weighted_mean(
        [out.groups[k].kl_per_channel for out in outputs], sizes)
        for k in range(len(groups))]
    merged = concat([out._replace(groups=None) for out in outputs])
    return merged._replace(groups=[
        g._replace(kl_per_channel=kl) for g, kl in zip(groups, per_channel)])


def forward(model, x, shards: int, eps=None, seed=None):
    """`model(x, training=False, eps=eps, seed=seed)`, the batch in parts.

    Args:
      model: an `NVAE`.
      x: float images [B, H, W, C] in [0, 1].
      shards: number of parts (1: the model's own call).
      eps, seed: the noise, as for `NVAE.call`; drawn for the whole batch
        before the cut.

    Returns:
      The `NVAEOutput` of the whole batch.
    """
    if _check_shards(shards) == 1:
        return model(x, training=False, eps=eps, seed=seed)
    x = tf.convert_to_tensor(x)
    batch_size = static_batch_size(x)
    noise = model.latent_noise(batch_size, eps, seed)
    return run(lambda part: model(part[0], training=False, eps=part[1:]),
               [x] + noise, batch_size, shards, merge_outputs)


def sample(model, num_samples, shards: int, temperature=1.0, eps=None,
           seed=None, latents_given=None):
    """`model.sample(...)` in inference mode, the batch decoded in parts.

    The noise (and the given latents) are cut into parts, each part is
    decoded on its own, and the images are drawn from the joined logits, so
    the result equals the unsharded one.

    Args:
      model: an `NVAE`.
      num_samples: N, a Python int or scalar int tensor.
      shards: number of parts (1: the model's own `sample`).
      temperature, eps, seed, latents_given: as for `NVAE.sample`.

    Returns:
      `NVAESample` of the whole batch.
    """
    if _check_shards(shards) == 1:
        return model.sample(num_samples, temperature, eps=eps, seed=seed,
                            latents_given=latents_given)
    if isinstance(num_samples, int):
        batch_size = num_samples
    else:
        batch_size = tf.convert_to_tensor(num_samples, tf.int32)
    noise = model.latent_noise(batch_size, eps, seed)
    groups = len(noise)
    given = latents_given or [None] * groups
    if len(given) != groups:
        raise ValueError(f"latents_given has {len(given)} entries; the "
                         f"model has {groups} groups.")
    # Given latents are cut with the noise; a None entry is replaced by the
    # group's noise for the cut and dropped again.
    is_given = [z is not None for z in given]
    logits, zs = run(
        lambda part: model.decode_prior(
            part[:groups], temperature, latents_given=[
                z if g else None for z, g in zip(part[groups:], is_given)]),
        noise + [z if g else n for z, n, g in zip(given, noise, is_given)],
        batch_size, shards, lambda parts, _: concat(parts))
    return NVAESample(images=model.images_from_logits(logits, seed),
                      logits=logits, z=zs)
