"""Inference shards: a sharded inference call returns the unsharded result.

`inference_shards.forward(model, x, S)` and `inference_shards.sample(model,
N, S)` cut the batch (and its noise, drawn for the whole batch first) into S
parts, call the model on each as an independent chain of ops, then join
them. Every field must equal the unsharded call's on the same noise, for
uneven parts, for a batch size known only at run time (including a batch
smaller than S), with given latents, and the batch-averaged per-channel KL
must be the mean over the whole batch, not over the parts.
"""

import numpy as np
import pytest
import tensorflow as tf

from nvae_tf.fast import inference_shards as batch_shards

from benchmarks import bench
from nvae_tf.fast.constant_weights import with_constant_weights
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
    parts = batch_shards.forward(model, x, shards, seed=SEED)
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
        lambda images: batch_shards.forward(model, images, 2,
                                            seed=SEED).nelbo,
        input_signature=[tf.TensorSpec([None] + x.shape[1:])])
    for batch in (5, 1):
        _assert_same(forward(x[:batch]),
                     model(x[:batch], training=False, seed=SEED).nelbo,
                     f"nelbo, batch {batch}")


@pytest.mark.parametrize("batch,shards", [(5, 2), (3, 3)])
def test_sharded_sample_equals_unsharded(model, batch, shards):
    whole = model.sample(batch, 0.7, seed=SEED)
    parts = batch_shards.sample(model, batch, shards, 0.7, seed=SEED)
    _assert_same(parts, whole, "NVAESample")


def test_sharded_sample_with_given_latents_and_unknown_batch(model):
    top = model.sample(3, 1.0, seed=SEED).z[0]
    given = [top] + [None] * (model.config.num_groups - 1)
    whole = model.sample(3, 1.0, seed=SEED, latents_given=given)
    np.testing.assert_array_equal(whole.z[0], top)
    parts = batch_shards.sample(model, 3, 2, 1.0, seed=SEED,
                                latents_given=given)
    _assert_same(parts, whole, "sample with given z_0")
    draw = tf.function(lambda n: batch_shards.sample(model, n, 2, 1.0,
                                                     seed=SEED).images)
    for n in (4, 1):
        _assert_same(draw(tf.constant(n)),
                     model.sample(n, 1.0, seed=SEED).images,
                     f"images, n={n}")


def test_shards_are_refused_when_not_positive_and_the_model_has_none(
        model):
    x = _images(model, 4)
    with pytest.raises(ValueError, match="positive int"):
        batch_shards.forward(model, x, 0, seed=SEED)
    with pytest.raises(ValueError, match="positive int"):
        batch_shards.sample(model, 4, 1.5, seed=SEED)
    with pytest.raises(ValueError, match="latents_given has 1 entries"):
        batch_shards.sample(model, 4, 2, seed=SEED, latents_given=[None])
    # Shards live at the model boundary only: the model takes no `shards`.
    with pytest.raises(TypeError, match="shards"):
        model(x, training=False, seed=SEED, shards=2)
    with pytest.raises(TypeError, match="shards"):
        model.sample(4, 1.0, seed=SEED, shards=2)


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


def _optimized_op_types(fn, *args):
    """Op types of `fn`'s graph after Grappler's constant folding."""
    from tensorflow.core.protobuf import config_pb2
    from tensorflow.python.grappler import tf_optimizer

    function = fn.get_concrete_function(*args)
    meta_graph = tf.compat.v1.train.export_meta_graph(
        graph_def=function.graph.as_graph_def(), graph=function.graph)
    fetches = meta_graph.collection_def["train_op"].node_list.value
    for output in function.outputs:
        fetches.append(output.name)
    config = config_pb2.ConfigProto()
    rewriter = config.graph_options.rewrite_options
    rewriter.optimizers.append("constfold")
    rewriter.meta_optimizer_iterations = 1
    graph_def = tf_optimizer.OptimizeGraph(config, meta_graph)
    nodes = list(graph_def.node) + [
        node for f in graph_def.library.function for node in f.node_def]
    return [node.op for node in nodes]


def test_weight_tensors_are_folded_once_with_constant_weights(model):
    """With the weights as constants (evaluation's and export's default),
    constant folding computes the folded BNs (one Rsqrt each) before any
    part runs, so every part's call shares them; reading the variables,
    each part computes its own."""
    x = _images(model, 4)

    def nelbo(shards):
        return lambda images: batch_shards.forward(
            model, images, shards, seed=SEED).nelbo

    def rsqrt_count(fn):
        graph = tf.function(fn).get_concrete_function(x).graph
        return [op.type for op in graph.get_operations()].count("Rsqrt")

    per_call = rsqrt_count(nelbo(1))
    assert per_call > 0
    assert rsqrt_count(nelbo(2)) == 2 * per_call  # traced once per part
    for shards in (1, 2):
        folded = _optimized_op_types(
            tf.function(with_constant_weights(model, nelbo(shards))), x)
        assert "Rsqrt" not in folded, shards
        assert folded.count("Conv2D") > 0


def test_default_shards_is_one_per_core_on_cpu_and_one_on_an_accelerator(
        monkeypatch):
    """`--inference_shards=0` splits the batch over the CPU cores only when
    no GPU/TPU is visible; with one, the batch runs as one call."""
    from nvae_tf.fast import graph_options, inference_shards
    monkeypatch.setattr(inference_shards.os, "sched_getaffinity",
                        lambda pid: {0, 1, 2})
    monkeypatch.setattr(graph_options, "accelerator_visible", lambda: False)
    assert inference_shards.resolve_shards(inference_shards.AUTO) == 3
    monkeypatch.setattr(graph_options, "accelerator_visible", lambda: True)
    assert inference_shards.resolve_shards(inference_shards.AUTO) == 1
    assert inference_shards.resolve_shards(2) == 2
