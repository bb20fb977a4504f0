"""The benchmark harness, and the fast paths computing the same function.

The speed-ups of issue 7 replace pieces of the model by faster ones with the
same value: the depthwise convolution's gradient (`depthwise_conv2d_same`),
the strided slices of `FactorizedReduce` (one space_to_depth split), the
masked flow convolutions without their zero kernel rows, the mixture
head's split and the training-mode BN-Swish that recomputes BN(x) in the
backward pass. (Inference-mode BN folding: tests/test_inference_folding.py.)
Here the default (fast) path is compared with a straightforward one, the
plain TensorFlow ops patched back in, on the same weights and inputs: loss
and every gradient of the full training objective agree to ~1e-5.
"""

import contextlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from nvae_tf import distributions

from benchmarks import bench
from nvae_tf import cli

from nvae_tf import objectives
from nvae_tf.layers import blocks, conv, flows, norm

REPO = os.path.join(os.path.dirname(__file__), "..", "..")
RTOL = 1e-5


def _plain_depthwise(inputs, kernel):
    return tf.nn.depthwise_conv2d(inputs, kernel, (1, 1, 1, 1), "SAME")


def _plain_factorized_reduce(self, inputs):
    x = tf.nn.silu(inputs)
    return tf.concat([c(x[:, dr:, dc:, :])
                      for c, (dr, dc) in zip(self.convs, self.SHIFTS)], -1)


def _plain_mixture_params(self):
    """The mixture head's parameters cut with strided slices."""
    m = self._num_mixtures
    per_colour = tf.reshape(self._logits[..., m:], tf.concat(
        [tf.shape(self._logits)[:3], [self._num_channels, -1]], axis=0))
    coeffs = tf.tanh(per_colour[..., 2 * m:]) \
        if self._num_channels == 3 else None
    return (self._logits[..., :m], per_colour[..., :m],
            tf.maximum(per_colour[..., m:2 * m], distributions.LOG_SCALE_MIN),
            coeffs)


def _plain_batch_norm_swish(x, gamma, beta, epsilon):
    """Training-mode BN then Swish, BN's output kept for the backward."""
    y, mean, unbiased = tf.compat.v1.nn.fused_batch_norm(
        x, gamma, beta, epsilon=epsilon, is_training=True)
    return tf.nn.silu(y), mean, unbiased


# (owner, attribute, plain replacement) of every fast piece.
_PLAIN = (
    (norm, "_batch_norm_swish_training", _plain_batch_norm_swish),
    (conv, "depthwise_conv2d_same", _plain_depthwise),
    (blocks.FactorizedReduce, "call", _plain_factorized_reduce),
    # The masked flow convolutions with their full (half-zero) kernels.
    (flows.MaskedConv2D, "convolve", conv.WeightNormConv2D.convolve),
    (distributions.DiscretizedLogisticMixture, "_split_params",
     _plain_mixture_params),
)


@contextlib.contextmanager
def plain_path():
    """Swaps the fast pieces for the plain TensorFlow ops they replace."""
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in _PLAIN]
    for owner, name, plain in _PLAIN:
        setattr(owner, name, plain)
    try:
        yield
    finally:
        for owner, name, fast in saved:
            setattr(owner, name, fast)


def _assert_close(actual, expected, what, rtol=RTOL):
    actual, expected = np.asarray(actual), np.asarray(expected)
    scale = max(float(np.abs(expected).max()), 1e-12)
    err = float(np.abs(actual - expected).max())
    assert err <= rtol * scale, f"{what}: error {err:.3g}, scale {scale:.3g}"


@pytest.mark.parametrize("batch,size,channels,kernel", [
    (3, 8, 5, 5), (2, 4, 7, 3), (1, 6, 2, 5)])
@pytest.mark.parametrize("static_batch", [True, False])
def test_depthwise_gradient_matches_tensorflow(batch, size, channels, kernel,
                                               static_batch):
    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(size=(batch, size, size, channels)), tf.float32)
    w = tf.constant(rng.normal(size=(kernel, kernel, channels, 1)), tf.float32)
    dy = tf.constant(rng.normal(size=(batch, size, size, channels)),
                     tf.float32)
    shape = [batch if static_batch else None, size, size, channels]

    def grads(fn):
        @tf.function(input_signature=[
            tf.TensorSpec(shape), tf.TensorSpec(w.shape), tf.TensorSpec(shape)])
        def run(x, w, dy):
            with tf.GradientTape() as tape:
                tape.watch([x, w])
                y = fn(x, w)
            return [y] + tape.gradient(y, [x, w], dy)
        return run(x, w, dy)

    fast, plain = grads(conv.depthwise_conv2d_same), grads(_plain_depthwise)
    for name, a, b in zip(("output", "d_input", "d_kernel"), fast, plain):
        _assert_close(a, b, name)


@pytest.mark.parametrize("size", [8, 4])
def test_factorized_reduce_matches_strided_slices(size):
    layer = blocks.FactorizedReduce(12)
    layer.build((None, size, size, 6))
    x = tf.random.stateless_normal((3, size, size, 6), seed=(1, 2))

    def run(call):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = call(x)
        dy = tf.random.stateless_normal(y.shape, seed=(3, 4))
        return [y] + tape.gradient(y, [x] + layer.trainable_variables, dy)

    fast = run(layer)
    plain = run(lambda t: _plain_factorized_reduce(layer, t))
    for k, (a, b) in enumerate(zip(fast, plain)):
        _assert_close(a, b, f"tensor {k}")


def _loss_and_grads(model, x, eps, objective, compiled):
    def step(x):
        with tf.GradientTape() as tape:
            loss = objectives.compute_loss(model, x, 10, objective,
                                         eps=eps).loss
        return loss, tape.gradient(loss, model.trainable_variables)

    state = [v.numpy() for v in model.non_trainable_variables]
    loss, grads = (tf.function(step) if compiled else step)(x)
    for variable, value in zip(model.non_trainable_variables, state):
        variable.assign(value)  # BN statistics, power iteration, counters
    return loss, grads


@pytest.mark.parametrize("compiled", [
    pytest.param(True, marks=pytest.mark.slow), False])
def test_fast_path_loss_and_gradients_match_plain_path(compiled):
    """Default path (compiled or eager) vs plain ops run eagerly.

    The `tiny` preset has every replaced piece: FactorizedReduce in the
    down cells, depthwise convolutions in the decoder and post-process
    cells and in the flows, masked flow convolutions, an RGB mixture head.
    The objective is the benchmark's: KL warm-up
    and balancing active, spectral and BN regularisation on.
    """
    config, batch, objective = bench.resolve_config("tiny")
    model, _, _, _, _ = bench.build_functions(config, batch, objective)
    x = tf.constant(bench._synthetic_batch(config, batch, seed=3))
    eps = [tf.random.stateless_normal(shape, seed=(4, k))
           for k, shape in enumerate(model.latent_shapes(batch))]
    fast_loss, fast_grads = _loss_and_grads(model, x, eps, objective,
                                            compiled)
    with plain_path():
        plain_loss, plain_grads = _loss_and_grads(model, x, eps, objective,
                                                  compiled=False)
    _assert_close(fast_loss, plain_loss, "loss")
    assert len(fast_grads) == len(plain_grads) == len(
        model.trainable_variables)
    flat = lambda gs: np.concatenate([np.ravel(g) for g in gs])  # noqa: E731
    a, b = flat(fast_grads), flat(plain_grads)
    assert np.linalg.norm(a - b) <= RTOL * np.linalg.norm(b), (
        f"gradients differ: relative error "
        f"{np.linalg.norm(a - b) / np.linalg.norm(b):.3g}")
    # Per variable: relative, except for gradients that are zero up to
    # round-off (biases and BN offsets followed by batch norm), which are
    # compared with the overall gradient scale.
    overall = float(np.abs(b).max())
    for variable, a, b in zip(model.trainable_variables, fast_grads,
                              plain_grads):
        err = float(np.abs(np.asarray(a) - np.asarray(b)).max())
        assert err <= 1e-4 * float(np.abs(b).max()) + 1e-6 * overall, (
            f"gradient of {variable.path}: max error {err:.3g}")


@pytest.mark.parametrize("name,params", [("mnist-small", 2_402_702),
                                         ("cifar-small", 3_654_176)])
def test_preset_parameter_counts(name, params):
    config, batch, objective = bench.resolve_config(name)
    assert batch == {"mnist-small": 32, "cifar-small": 16}[name]
    assert objective.weight_decay_norm == bench.WEIGHT_DECAY_NORM
    assert objective.total_steps == bench.TOTAL_STEPS
    from nvae_tf.model import NVAE  # pylint: disable=import-outside-toplevel
    model = NVAE(config)
    model.build()
    assert sum(int(np.prod(v.shape)) for v in model.trainable_variables) \
        == params


def test_flagfile_config():
    path = os.path.join(REPO, "configs", "mnist.cfg")
    config, batch, objective = bench.resolve_config(path, batch_size=8)
    assert batch == 8
    assert config.dataset == "mnist" and config.num_groups_per_scale == 10
    assert objective.weight_decay_norm == 1e-2
    assert objective.total_steps == bench.TOTAL_STEPS


def test_synthetic_batches_have_the_data_range():
    mnist, _, _ = bench.resolve_config("mnist-small")
    x = bench._synthetic_batch(mnist, 4, seed=0)
    assert x.shape == (4, 28, 28, 1) and set(np.unique(x)) <= {0.0, 1.0}
    cifar, _, _ = bench.resolve_config("cifar-small")
    x = bench._synthetic_batch(cifar, 4, seed=0)
    assert x.shape == (4, 32, 32, 3)
    np.testing.assert_allclose(x * 255, np.round(x * 255), atol=1e-4)


@pytest.mark.parametrize("argv, message", [
    (["--config=nope"], "flag --config=nope: 'nope' is neither a preset"),
    (["--steps=0"], "flag --steps=0: 0 is not a positive integer"),
    (["--warmup=0"], "flag --warmup=0: 0 is not a positive integer"),
    (["--repeats=0"], "flag --repeats=0: 0 is not a positive integer"),
    (["--inference_shards=-1"], "flag --inference_shards=-1: -1 is not a "
     "non-negative integer"),
    (["--weights=frozen"], "flag --weights=frozen: value should be one of "
     "<constant|variables>"),
    (["--stpes=3"], "Unknown command line flag 'stpes'"),
])
def test_bad_arguments_exit_with_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        bench.parse_args(argv)
    assert info.value.code == cli.EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err


def test_defaults_and_a_resolved_shard_count():
    args = bench.parse_args([])
    assert args.configs == bench.PUBLIC_PRESETS
    assert (args.steps, args.warmup, args.repeats, args.parallel_setup) == (
        20, 2, 3, 3)
    assert (args.remat, args.weights, args.grappler) == (
        "none", "constant", "lean")
    assert args.batch_size is None and not args.worker
    assert args.inference_shards == os.cpu_count()  # 0: one per core
    assert bench.parse_args(["--inference_shards=1"]).inference_shards == 1


def test_worker_command_round_trips_the_options():
    """The hidden worker flags: the parent's command line for a worker
    parses back to the parent's options for one config."""
    args = bench.parse_args(["--config=tiny", "--batch_size=2",
                             "--intra_op_threads=1", "--jit_compile",
                             "--remat=cells", "--weights=variables"])
    command = bench._worker_command(args, "tiny", "/tmp/sync", 4, "train")
    assert command[1:4] == ["-m", "benchmarks.bench", "--worker"]
    worker = bench.parse_args(command[3:])
    assert worker.worker and worker.configs == ("tiny",)
    assert (worker.sync_dir, worker.index, worker.phase) == (
        "/tmp/sync", 4, "train")
    for name in ("batch_size", "steps", "warmup", "intra_op_threads",
                 "inter_op_threads", "inference_shards", "jit_compile",
                 "mixed_precision", "grappler", "remat", "weights"):
        assert getattr(worker, name) == getattr(args, name), name


@pytest.mark.parametrize("shards, weights", [
    pytest.param(2, "constant", marks=pytest.mark.slow), (1, "variables")])
def test_cli_smoke_on_tiny_config(shards, weights):
    """Two timed steps, one repeat: one JSON line with the documented keys.

    With two inference shards the repeat is two processes: training with
    TensorFlow's threads, inference with 1 intra-op and 2 inter-op threads
    (two inference shards); with one, a single process times all three
    functions unsharded with TensorFlow's threads. Eval and sample read the
    weights as constants (the default) or from the variables.
    """
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench", "--config=tiny", "--steps=2",
         "--warmup=1", "--repeats=1", f"--inference_shards={shards}",
         f"--weights={weights}", "--json"],
        capture_output=True, text=True, cwd=REPO, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert len(lines) == 1
    result = json.loads(lines[0])
    for key in ("config", "params", "train_step_s", "eval_s", "sample_s",
                "peak_rss_mb", "train_step_min_s", "train_step_cpu_s",
                "train_images_per_s", "tf_version", "intra_op_threads",
                "inter_op_threads", "load_avg"):
        assert key in result, key
    assert result["config"] == "tiny" and result["params"] > 0
    assert 0 < result["train_step_s"] and 0 < result["sample_s"]
    assert result["peak_rss_mb"] > 100
    assert result["peak_gmacs_per_s"] > 0.1
    for name in bench.TIMED:  # the arithmetic floor of each function
        assert result[f"{name}_gmacs"] == pytest.approx(
            sum(result[f"{name}_gmacs_by_kind"].values()), abs=1e-3)
        assert result[f"{name}_gmacs"] > 0
        assert result[f"{name}_bound_s"] == pytest.approx(
            result[f"{name}_gmacs"] / result["peak_gmacs_per_s"],
            rel=1e-3, abs=1e-4)
    for phase in ("train", "inference") if shards > 1 else ("all",):
        stages = result[f"{phase}_rss_stages_mb"]  # a peak: never falls
        assert list(stages) == ["import", "build", "first_calls",
                                "timed_calls"]
        assert list(stages.values()) == sorted(stages.values())
    assert result["inference_shards"] == shards
    assert "train_shards" not in result
    assert result["weights"] == weights
    if shards == 1:  # TensorFlow's threads for everything, one process
        assert result["inference_threads"] == [
            result["intra_op_threads"], result["inter_op_threads"]]
        assert "inference_peak_rss_mb" not in result
        assert len(result["load_avg"][0]) == 2
        return
    assert result["inference_threads"] == [1, 2]
    # Training: TensorFlow's threads (0: its own choice).
    assert [result["intra_op_threads"], result["inter_op_threads"]] == [0, 0]
    assert result["peak_rss_mb"] == max(result["train_peak_rss_mb"],
                                        result["inference_peak_rss_mb"])
    assert len(result["load_avg"][0]) == 4  # both processes' timed calls


def test_lean_grappler_gives_the_same_loss_and_gradients():
    """`--grappler=lean` (the default) vs TensorFlow's default passes."""
    from tensorflow.core.protobuf import config_pb2, rewriter_config_pb2
    from tensorflow.python.eager import context
    call_options = context.context().function_call_options
    saved = call_options.config_proto_serialized
    config, batch, objective = bench.resolve_config("tiny")
    model, _, _, _, _ = bench.build_functions(config, batch, objective)
    x = tf.constant(bench._synthetic_batch(config, batch, seed=3))
    eps = [tf.random.stateless_normal(shape, seed=(4, k))
           for k, shape in enumerate(model.latent_shapes(batch))]
    loss, grads = _loss_and_grads(model, x, eps, objective, compiled=True)
    try:
        bench.set_grappler_options(bench.GRAPPLER["lean"])
        rewrite = config_pb2.ConfigProto.FromString(
            call_options.config_proto_serialized).graph_options.rewrite_options
        assert rewrite.memory_optimization == \
            rewriter_config_pb2.RewriterConfig.NO_MEM_OPT
        assert rewrite.disable_tfg_optimizer
        lean_loss, lean_grads = _loss_and_grads(model, x, eps, objective,
                                                compiled=True)
    finally:
        call_options.config_proto_serialized = \
            config_pb2.ConfigProto.FromString(saved)
    _assert_close(lean_loss, loss, "loss", rtol=1e-6)
    for variable, a, b in zip(model.trainable_variables, lean_grads, grads):
        _assert_close(a, b, f"gradient of {variable.path}", rtol=1e-6)
