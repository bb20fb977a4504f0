"""Training shards: a training step on a batch cut into parts is the same.

`NVAE.call(x, training=True, shards=S)` runs S parts of the batch as
separate chains of ops; every batch norm combines the parts' statistics
(`layers.norm._batch_norm_parts_training`). The outputs, the loss, the
gradient of every trainable variable and the updated moving statistics must
equal the unsharded step's on the same weights and noise, for uneven parts,
both image heads and normalizing flows. A batch norm that normalised each
part with its own statistics would fail every comparison.
"""

import numpy as np
import pytest
import tensorflow as tf

from benchmarks import bench

from nvae_tf import objectives
from nvae_tf.fast.inference_shards import Parts, apply, each
from nvae_tf.layers.norm import BatchNorm
from nvae_tf.model import NVAE
from tests.conftest import (assert_nested_close, inference_test_config,
                            run_fresh_python)

# Parts run through kernels of another batch size, which may sum in another
# order: agreement to float32 rounding of a deep network.
RTOL = 1e-4


@pytest.fixture(scope="module", params=["tiny", "binary"])
def model(request):
    net = NVAE(inference_test_config(request.param), seed=1)
    net.build()
    rng = np.random.default_rng(0)
    for bn in net.batchnorm_layers():  # BN affine away from (1, 0)
        bn.gamma.assign(rng.uniform(0.5, 1.5, bn.gamma.shape))
        bn.beta.assign(rng.normal(0.0, 0.3, bn.beta.shape))
    return net


def _step(model, x, eps, shards):
    """Outputs, loss, gradients and moving statistics of one training
    step from the model's current weights (which are restored after)."""
    state = [v.numpy() for v in model.non_trainable_variables]
    objective = objectives.ObjectiveConfig(total_steps=100)

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            result = objectives.compute_loss(model, x, tf.constant(10),
                                           objective, eps=eps, shards=shards)
        return result, tape.gradient(result.loss, model.trainable_variables)

    result, grads = step()
    moving = [bn.moving_variance.numpy() + bn.moving_mean.numpy()
              for bn in model.batchnorm_layers()]
    for variable, value in zip(model.non_trainable_variables, state):
        variable.assign(value)
    return result, grads, moving


@pytest.mark.parametrize("batch,shards", [
    (5, 2), pytest.param(6, 3, marks=pytest.mark.slow)])
def test_sharded_training_step_equals_unsharded(model, batch, shards):
    config = model.config
    x = tf.constant(bench._synthetic_batch(config, batch, seed=batch))
    eps = [tf.random.stateless_normal([batch] + list(shape[1:]),
                                      seed=[batch, k])
           for k, shape in enumerate(model.latent_shapes())]
    whole, whole_grads, whole_moving = _step(model, x, eps, 1)
    parts, part_grads, part_moving = _step(model, x, eps, shards)
    assert_nested_close(parts.metrics, whole.metrics, "metrics", RTOL)
    assert_nested_close(part_moving, whole_moving, "moving statistics", RTOL)
    scale = max(float(np.abs(g).max()) for g in whole_grads)
    for variable, a, e in zip(model.trainable_variables, part_grads,
                              whole_grads):
        # Relative to the variable's own gradient; gradients that are zero
        # in exact arithmetic (a bias before a batch norm) are float noise.
        tol = RTOL * float(np.abs(e).max()) + 1e-7 * scale
        np.testing.assert_allclose(a, e, rtol=0, atol=tol,
                                   err_msg=variable.path)


def test_sharded_call_outputs_equal_unsharded(model):
    x = tf.constant(bench._synthetic_batch(model.config, 5, seed=1))
    seed = tf.constant([1, 2], tf.int64)
    state = [v.numpy() for v in model.non_trainable_variables]
    whole = model(x, training=True, seed=seed)
    for variable, value in zip(model.non_trainable_variables, state):
        variable.assign(value)
    parts = model(x, training=True, seed=seed, shards=2)
    for variable, value in zip(model.non_trainable_variables, state):
        variable.assign(value)
    assert_nested_close(parts, whole, "NVAEOutput", RTOL)


@pytest.mark.parametrize("activation", [None, "swish"])
def test_batch_norm_on_parts_uses_the_whole_batch(activation):
    rng = np.random.default_rng(1)
    bn = BatchNorm(activation=activation)
    bn.build((None, 4, 4, 3))
    bn.gamma.assign([0.5, 1.0, 2.0])
    bn.beta.assign([0.1, -0.2, 0.3])
    x = tf.constant(rng.normal(2.0, 3.0, (7, 4, 4, 3)), tf.float32)
    weights = tf.constant(rng.normal(size=(7, 4, 4, 3)), tf.float32)

    def run(cut):
        bn.moving_mean.assign(tf.zeros(3))
        bn.moving_variance.assign(tf.ones(3))
        with tf.GradientTape() as tape:
            tape.watch(x)
            if cut:
                y = tf.concat(list(apply(bn, Parts([x[:1], x[1:4], x[4:]]),
                                         training=True)), axis=0)
            else:
                y = bn(x, training=True)
            loss = tf.reduce_sum(y * weights + tf.square(y))
        grads = tape.gradient(loss, [x, bn.gamma, bn.beta])
        return [y] + grads + [bn.moving_mean.numpy(),
                              bn.moving_variance.numpy()]

    assert_nested_close(run(True), run(False), "BN on parts", 1e-5)
    # The batch statistics, unbiased as in PyTorch, reach the moving ones.
    mean, variance = run(True)[-2:]
    flat = x.numpy().reshape(-1, 3)
    np.testing.assert_allclose(mean, 0.05 * flat.mean(0), rtol=1e-5)
    np.testing.assert_allclose(variance, 0.95 + 0.05 * flat.var(0, ddof=1),
                               rtol=1e-5)


def test_parts_recompute_waits_for_the_upstream_gradient():
    """BN(x) for Swish's gradient is recomputed only once the backward pass
    reaches the layer (else the executor runs it during the forward pass
    and keeps the result)."""
    bn = BatchNorm(activation="swish")
    bn.build((None, 2, 2, 3))
    x = tf.ones([4, 2, 2, 3])

    @tf.function
    def grad():
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = apply(bn, Parts([x[:2], x[2:]]), training=True)
            loss = tf.reduce_sum(y[0]) + tf.reduce_sum(y[1])
        return tape.gradient(loss, x)

    graph = grad.get_concrete_function().graph
    grads = [op for op in graph.get_operations()
             if op.type == "FusedBatchNormGradV3"]
    normalize = [op for op in graph.get_operations()
                 if op.type == "FusedBatchNormV3"
                 and not op.get_attr("is_training")]
    assert len(grads) == 2 and len(normalize) == 4  # forward + recompute
    assert sum(bool(op.control_inputs) for op in normalize) == 2


def test_each_maps_parts_and_passes_other_arguments():
    parts = Parts([tf.constant(1.0), tf.constant(2.0)])
    doubled = each(lambda a, b: a * b, parts, 2.0)
    assert isinstance(doubled, Parts)
    np.testing.assert_allclose([float(v) for v in doubled], [2.0, 4.0])
    assert each(lambda a: a + 1, 1) == 2
    with pytest.raises(ValueError, match="different lengths"):
        each(lambda a, b: a, parts, Parts([parts[0]]))


def test_trainer_resolves_train_shards_in_a_fresh_process():
    """`--train_shards=0`: one per core on a CPU-only machine with one
    replica (threads: 1 intra-op, one inter-op per shard); 1 with logical
    CPU devices (MirroredStrategy splits the CPU instead)."""
    code = (
        "import tensorflow as tf\n"
        "from nvae_tf.fast import inference_shards as batch_shards\n"
        "from nvae_tf.training import main as train\n"
        "from nvae_tf.training.config import RuntimeConfig\n"
        "auto = train.resolve_train_shards(RuntimeConfig(train_shards=0))\n"
        "mirrored = train.resolve_train_shards(RuntimeConfig(\n"
        "    train_shards=0, strategy='mirrored', num_cpu_devices=2))\n"
        "print(auto.train_shards, mirrored.train_shards,\n"
        "      batch_shards.default_shards(),\n"
        "      tf.config.threading.get_intra_op_parallelism_threads(),\n"
        "      tf.config.threading.get_inter_op_parallelism_threads())\n")
    auto, mirrored, cores, intra, inter = map(
        int, run_fresh_python(code).split())
    assert (auto, mirrored) == (cores, 1)
    if cores > 1:
        assert (intra, inter) == (1, cores)
