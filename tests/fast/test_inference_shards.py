"""Batch shards: a sharded inference call returns the unsharded result.

`NVAE.call(..., shards=S)` and `NVAE.sample(..., shards=S)` cut the batch
(and its noise, drawn for the whole batch first) into S parts that run as
independent chains of ops, then join them (`nvae_tf.fast.inference_shards`). Every
field must equal the unsharded call's on the same noise, for uneven parts,
for a batch size known only at run time (including a batch smaller than S),
with given latents, and the batch-averaged per-channel KL must be the mean
over the whole batch, not over the parts.
"""

import numpy as np
import pytest
import tensorflow as tf

from nvae_tf.fast import inference_shards as batch_shards

from benchmarks import bench
from nvae_tf.model import NVAE
from tests.conftest import (assert_nested_close, inference_test_config,
                            run_fresh_python)

# Parts of a batch go through oneDNN convolutions of another batch size,
# which may sum in another order: agreement to float32 rounding.
RTOL = 1e-5
SEED = tf.constant([3, 4], tf.int64)


def _assert_same(actual, expected, what):
    assert_nested_close(actual, expected, what, RTOL)


@pytest.fixture(scope="module", params=["tiny", "binary"])
def model(request):
    net = NVAE(inference_test_config(request.param), seed=1)
    net.build()
    return net


def _images(model, batch):
    config = model.config
    return tf.constant(bench._synthetic_batch(config, batch, seed=batch))


@pytest.mark.parametrize("batch,shards", [(5, 2), (6, 3), (2, 4)])
def test_sharded_call_equals_unsharded(model, batch, shards):
    x = _images(model, batch)
    whole = model(x, training=False, seed=SEED)
    parts = model(x, training=False, seed=SEED, shards=shards)
    _assert_same(parts, whole, "NVAEOutput")
    # The per-channel KL is a batch mean over all images, not a mean of the
    # parts' means: summed over channels it is the batch mean of the KL.
    for group in parts.groups:
        np.testing.assert_allclose(np.sum(group.kl_per_channel),
                                   np.mean(group.kl), rtol=1e-5)


def test_sharded_call_in_a_function_with_unknown_batch(model):
    """A run-time batch size: uneven parts, and a batch smaller than S."""
    x = _images(model, 5)
    forward = tf.function(
        lambda images: model(images, training=False, seed=SEED,
                             shards=2).nelbo,
        input_signature=[tf.TensorSpec([None] + x.shape[1:])])
    for batch in (5, 1):
        _assert_same(forward(x[:batch]),
                     model(x[:batch], training=False, seed=SEED).nelbo,
                     f"nelbo, batch {batch}")


@pytest.mark.parametrize("batch,shards", [(5, 2), (3, 3)])
def test_sharded_sample_equals_unsharded(model, batch, shards):
    whole = model.sample(batch, 0.7, seed=SEED)
    parts = model.sample(batch, 0.7, seed=SEED, shards=shards)
    _assert_same(parts, whole, "NVAESample")


def test_sharded_sample_with_given_latents_and_unknown_batch(model):
    top = model.sample(3, 1.0, seed=SEED).z[0]
    given = [top] + [None] * (model.config.num_groups - 1)
    whole = model.sample(3, 1.0, seed=SEED, latents_given=given)
    np.testing.assert_array_equal(whole.z[0], top)
    parts = model.sample(3, 1.0, seed=SEED, latents_given=given, shards=2)
    _assert_same(parts, whole, "sample with given z_0")
    draw = tf.function(lambda n: model.sample(n, 1.0, seed=SEED,
                                              shards=2).images)
    for n in (4, 1):
        _assert_same(draw(tf.constant(n)),
                     model.sample(n, 1.0, seed=SEED).images,
                     f"images, n={n}")


def test_shards_are_refused_in_training_sampling_and_when_not_positive(
        model):
    x = _images(model, 4)
    with pytest.raises(ValueError, match="decodes unsharded"):
        model.sample(4, 1.0, training=True, shards=2)
    with pytest.raises(ValueError, match="positive int"):
        model(x, training=False, shards=0)
    with pytest.raises(ValueError, match="positive int"):
        model(x, training=True, shards=0)


def test_shard_sizes():
    assert batch_shards.shard_sizes(5, 2) == [3, 2]
    assert batch_shards.shard_sizes(7, 3) == [3, 2, 2]
    assert batch_shards.shard_sizes(1, 2) == [1]  # never an empty part
    sizes = batch_shards.shard_sizes(tf.constant(7), 3)
    np.testing.assert_array_equal(sizes, [3, 2, 2])
    np.testing.assert_array_equal(
        batch_shards.shard_sizes(tf.constant(1), 2), [1, 0])
    with pytest.raises(ValueError, match="shards must be >= 0"):
        batch_shards.resolve_shards(-1)
    assert batch_shards.resolve_shards(0) == batch_shards.default_shards()
    assert batch_shards.resolve_shards(3) == 3


def test_inference_threads_in_a_fresh_process():
    """One intra-op thread and one inter-op thread per shard."""
    code = ("import tensorflow as tf\n"
            "from nvae_tf.fast import inference_shards as batch_shards\n"
            "batch_shards.configure_shard_threads(3)\n"
            "print(tf.config.threading.get_intra_op_parallelism_threads(),"
            " tf.config.threading.get_inter_op_parallelism_threads())\n")
    assert run_fresh_python(code).split() == ["1", "3"]


def test_weight_tensors_are_computed_once_for_all_parts(model):
    """Folded BNs (one Rsqrt each) and weight-normalised kernels (one
    reduction of the squared kernel each) are not repeated per part."""
    x = _images(model, 4)

    def op_counts(shards):
        graph = tf.function(
            lambda images: model(images, training=False, seed=SEED,
                                 shards=shards).nelbo
        ).get_concrete_function(x).graph
        types = [op.type for op in graph.get_operations()]
        return types.count("Rsqrt"), types.count("Square"), len(types)

    (rsqrt_1, square_1, ops_1), (rsqrt_2, square_2, ops_2) = \
        op_counts(1), op_counts(2)
    assert rsqrt_1 > 0 and square_1 > 0
    assert (rsqrt_2, square_2) == (rsqrt_1, square_1)
    assert ops_2 > ops_1  # the activations' ops do run per part
