"""Inference with the weights as graph constants computes the same function.

`with_constant_weights(model, fn)` traces `fn` with every model variable
read as a constant of its current value, so that constant folding computes
the weight-only tensors once. The results must equal those of the same
function reading the variables (evaluation NELBO and every output field,
samples and logits, sharded or not, both image heads), the traced graph must
read no variable, the function must keep the weights of the moment it was
made, and a function that would advance the model's noise counter must be
refused rather than repeat its noise.
"""

import numpy as np
import pytest
import tensorflow as tf

from benchmarks import bench

from nvae_tf.fast import constant_weights
from nvae_tf.fast import inference_shards

from nvae_tf.serving import evaluate
from nvae_tf.fast.constant_weights import with_constant_weights
from nvae_tf.model import NVAE
from tests.conftest import assert_nested_close, inference_test_config

SEED = tf.constant([3, 4], tf.int64)
BATCH = 5
# Constant folding runs the same CPU kernels on the same values; oneDNN may
# still pick another summation order for a folded kernel: float32 rounding.
RTOL = 1e-5


def _randomise(model, seed=0):
    """Weights away from their initial values (BN statistics included), so
    that every folded tensor (kernels, BN scale and shift) is non-trivial."""
    rng = np.random.default_rng(seed)
    for v in model.variables:
        if "float" in str(v.dtype):
            value = v.numpy()
            if "variance" in v.path:
                value = rng.uniform(0.5, 2.0, value.shape)
            else:
                value = value + 0.05 * rng.standard_normal(value.shape)
            v.assign(value.astype(value.dtype))


@pytest.fixture(scope="module", params=["tiny", "binary"])
def model(request):
    net = NVAE(inference_test_config(request.param), seed=1)
    net.build()
    _randomise(net)
    return net


def _assert_close(actual, expected, what):
    assert_nested_close(actual, expected, what, RTOL)


def _images(model):
    return tf.constant(bench._synthetic_batch(model.config, BATCH, seed=2))


@pytest.mark.parametrize("shards", [1, 2])
def test_forward_and_sample_equal_the_variable_weights(model, shards):
    x = _images(model)

    def forward(x, seed):
        return inference_shards.forward(model, x, shards, seed=seed)

    def sample(seed):
        out = inference_shards.sample(model, BATCH, shards, 0.8, seed=seed)
        return out.images, out.logits, out.z

    _assert_close(tf.function(with_constant_weights(model, forward))(x, SEED),
                  tf.function(forward)(x, SEED), "forward")
    # Images, logits and latents (the same noise drives both draws).
    _assert_close(tf.function(with_constant_weights(model, sample))(SEED),
                  tf.function(sample)(SEED), "sample")


def test_traced_graph_reads_no_variable(model):
    fn = tf.function(with_constant_weights(
        model, lambda seed: model.sample(BATCH, 1.0, seed=seed).images))
    graph = fn.get_concrete_function(SEED).graph
    reads = [op.name for op in graph.get_operations()
             if op.type in ("ReadVariableOp", "VarHandleOp")]
    assert not reads, reads
    assert not graph.variables
    plain = tf.function(
        lambda seed: model.sample(BATCH, 1.0, seed=seed).images)
    assert plain.get_concrete_function(SEED).graph.variables


def test_function_keeps_the_weights_it_was_made_with(model):
    x = _images(model)

    def nelbo(x):
        return model(x, training=False, seed=SEED).nelbo

    before = tf.function(with_constant_weights(model, nelbo))
    expected = before(x).numpy()
    backup = [v.numpy() for v in model.variables]
    try:
        _randomise(model, seed=1)
        changed = tf.function(nelbo)(x).numpy()
        assert not np.allclose(changed, expected)
        # Traced after the change: still the old weights.
        np.testing.assert_allclose(before(x), expected, rtol=RTOL)
        # Made again: the new ones.
        np.testing.assert_allclose(
            tf.function(with_constant_weights(model, nelbo))(x), changed,
            rtol=RTOL)
    finally:
        for v, value in zip(model.variables, backup):
            v.assign(value)


def test_model_noise_counter_is_refused(model):
    counter = int(model.noise_counter.numpy())
    fn = tf.function(with_constant_weights(
        model, lambda x: model(x, training=False).nelbo))
    with pytest.raises(ValueError, match="noise_counter.*explicit seed"):
        fn(_images(model))
    assert int(model.noise_counter.numpy()) == counter


def test_evaluate_gives_the_same_numbers(model):
    dataset = tf.data.Dataset.from_tensor_slices(_images(model)).batch(3)
    kwargs = dict(num_iw_samples=3, iw_samples_per_pass=2, progress=False,
                  shards=2)
    const = evaluate.importance_weighted_nll(model, dataset, **kwargs)
    plain = evaluate.importance_weighted_nll(model, dataset,
                                             constant_weights=False, **kwargs)
    for key in ("nll_nats", "nelbo_nats"):
        np.testing.assert_allclose(const[key], plain[key], rtol=1e-6)
    _assert_close(
        evaluate.generate_samples(model, 4, 0.7, batch_size=3, seed=2),
        evaluate.generate_samples(model, 4, 0.7, batch_size=3, seed=2,
                                  constant_weights=False), "samples")


def test_weights_too_large_for_graph_constants_are_refused(model,
                                                           monkeypatch):
    monkeypatch.setattr(constant_weights, "MAX_CONSTANT_BYTES", 1024)
    with pytest.raises(ValueError, match="MB of weights.*constant_weights="
                                         "False"):
        constant_weights.with_constant_weights(model, lambda: None)


def test_substituted_weights_are_read_in_the_trace_only(model):
    """`with_substituted_weights`: the given BN statistics replace the
    model's in the traced function (same result as assigning them), the
    other weights stay variables, and the model keeps its own statistics;
    `with_constant_weights(..., substitutes)` gives the same numbers."""
    x = _images(model)
    bns = model.batchnorm_layers()
    variables = [bn.moving_mean for bn in bns] + [
        bn.moving_variance for bn in bns]
    own = [v.numpy() for v in variables]
    new = [value + 0.5 if "mean" in v.path else value * 1.5
           for v, value in zip(variables, own)]

    def nelbo(x):
        return model(x, training=False, seed=SEED).nelbo

    substitutes = list(zip(variables, new))
    fn = tf.function(constant_weights.with_substituted_weights(
        nelbo, substitutes))
    concrete = fn.get_concrete_function(x)
    read = {id(v.handle) for v in model.variables} & {
        id(c) for c in concrete.captured_inputs}
    substituted = fn(x).numpy()
    const = tf.function(with_constant_weights(model, nelbo, substitutes))(x)
    for v, value in zip(variables, own):
        np.testing.assert_array_equal(v.numpy(), value)
    assert read  # the other weights are still variables
    try:
        for v, value in zip(variables, new):
            v.assign(value)
        expected = tf.function(nelbo)(x).numpy()
    finally:
        for v, value in zip(variables, own):
            v.assign(value)
    assert not np.allclose(expected, tf.function(nelbo)(x).numpy())
    np.testing.assert_allclose(substituted, expected, rtol=RTOL)
    np.testing.assert_allclose(const, expected, rtol=RTOL)


def test_substituted_variable_assigned_is_refused(model):
    counter = int(model.noise_counter.numpy())
    fn = tf.function(constant_weights.with_substituted_weights(
        lambda x: model(x, training=False).nelbo,
        [(model.noise_counter, np.asarray(counter, np.int64))]))
    with pytest.raises(ValueError, match="noise_counter.*explicit seed"):
        fn(_images(model))
    assert int(model.noise_counter.numpy()) == counter
