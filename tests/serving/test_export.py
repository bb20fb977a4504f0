"""SavedModel export: loads and runs where only TensorFlow is installed.

The model is exported once, as the trainer does (`export_saved_model`, with
BN re-estimation). A fresh Python process that cannot import nvae_tf then
loads it, calls every signature with good and bad inputs and builds a TF
Serving `PredictRequest` per signature; `saved_model_cli` shows and runs it.
Its outputs are compared with the in-process model.
"""

import json
import os
import re
import shutil
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from google.protobuf import text_format
from tensorflow.core.protobuf import saved_model_pb2

from nvae_tf.serving import bn_readjust

from nvae_tf.training import checkpoints

from nvae_tf.serving import export

from nvae_tf.serving import inference
from nvae_tf.model import NVAE
from tests.conftest import make_tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
TEMPERATURE = 0.7
BN = dict(num_passes=2, batch_size=4)

# Run by a fresh interpreter (-I, no PYTHONPATH, cwd outside the repo).
FRESH_PROCESS_SCRIPT = r'''
import json, os, sys, time
import numpy as np
result = {}
try:
    import nvae_tf  # noqa: F401
    result["nvae_tf_importable"] = True
except ImportError:
    result["nvae_tf_importable"] = False
import tensorflow as tf
from tensorflow.core.protobuf import saved_model_pb2

export_dir, out_path = sys.argv[1], sys.argv[2]
start = time.time()
loaded = tf.saved_model.load(export_dir)
result["load_seconds"] = time.time() - start
sigs = loaded.signatures
result["signatures"] = sorted(sigs)
# What `saved_model_cli show` and a TF Serving client see of the inputs.
result["input_specs"] = {
    name: {key: [list(spec.shape), spec.dtype.name]
           for key, spec in sigs[name].structured_input_signature[1].items()}
    for name in sigs}
with open(os.path.join(export_dir, "assets.extra",
                       "nvae_tf_export.json")) as f:
    meta = json.load(f)
H, W, C = meta["image_shape"]
names = ["latent_%03d" % k for k in range(len(meta["latent_shapes"]))]


def call(name, **inputs):
    return {k: v.numpy() for k, v in sigs[name](**inputs).items()}


def sample_inputs(n, t, seed):
    return dict(num_samples=tf.constant(n, tf.int32),
                temperature=tf.constant(t, tf.float32),
                seed=tf.constant(seed, tf.int64))


out = {}
out["sample_a"] = call("sample", **sample_inputs(3, 0.7, 11))["images"]
out["sample_b"] = call("sample", **sample_inputs(3, 0.7, 11))["images"]
out["sample_c"] = call("sample", **sample_inputs(3, 0.7, 12))["images"]
out["default"] = call("serving_default", **sample_inputs(3, 0.7, 11))[
    "images"]
out["sample_seed1"] = call("sample", **sample_inputs(2, 0.7, 1))["images"]
images = tf.constant(out["sample_a"])
out["reconstruct"] = call("reconstruct", images=images)["images"]
ll = call("log_likelihood", images=images)
out["nelbo_nats"], out["bits_per_dim"] = ll["nelbo_nats"], ll["bits_per_dim"]
# Importance-weighted NLL without nvae_tf: logsumexp over K seeds - log K.
K = 3
log_w = np.stack([call("log_weights", images=images,
                       seed=tf.constant(k, tf.int64))["log_weights"]
                  for k in range(K)])
out["log_weights"] = log_w
out["iw_nll"] = -(tf.reduce_logsumexp(log_w, axis=0) - np.log(K)).numpy()
result["log_weights_outputs"] = {
    k: [list(v.shape), v.dtype.name]
    for k, v in sigs["log_weights"].structured_outputs.items()}
encoded = call("encode", images=images)
result["encode_outputs"] = sorted(encoded)
for k in names:
    out[k] = encoded[k]
out["decode"] = call("decode", **{k: tf.constant(encoded[k])
                                  for k in names})["images"]

good_latents = {k: tf.constant(encoded[k]) for k in names}
bad_latent = dict(good_latents)
bad_latent[names[-1]] = tf.zeros([3, 1, 1, 1])
short_batch = dict(good_latents)
short_batch[names[0]] = good_latents[names[0]][:1]
nan_latent = dict(good_latents)
nan_latent[names[0]] = tf.tensor_scatter_nd_update(
    good_latents[names[0]], [[0, 0, 0, 0]], [float("nan")])
inf_latent = dict(good_latents)
inf_latent[names[-1]] = good_latents[names[-1]] + float("inf")
cases = {
    "reconstruct/size": ("reconstruct",
                         dict(images=tf.zeros([1, H + 1, W, C], tf.uint8))),
    "reconstruct/channels": ("reconstruct", dict(
        images=tf.zeros([1, H, W, C % 3 + 1], tf.uint8))),
    "reconstruct/empty": ("reconstruct",
                          dict(images=tf.zeros([0, H, W, C], tf.uint8))),
    "reconstruct/rank": ("reconstruct",
                         dict(images=tf.zeros([H, W, C], tf.uint8))),
    "reconstruct/dtype": ("reconstruct",
                          dict(images=tf.zeros([1, H, W, C], tf.float32))),
    "log_likelihood/size": ("log_likelihood", dict(
        images=tf.zeros([2, H, W + 2, C], tf.uint8))),
    "log_weights/size": ("log_weights", dict(
        images=tf.zeros([2, H - 2, W, C], tf.uint8),
        seed=tf.constant(1, tf.int64))),
    "encode/size": ("encode",
                    dict(images=tf.zeros([2, H - 1, W, C], tf.uint8))),
    "decode/shape": ("decode", bad_latent),
    "decode/batch": ("decode", short_batch),
    "decode/nan": ("decode", nan_latent),
    "decode/inf": ("decode", inf_latent),
    "sample/zero": ("sample", sample_inputs(0, 0.7, 1)),
    "sample/too_many": ("sample", sample_inputs(meta["max_samples"] + 1,
                                                0.7, 1)),
    "sample/temperature": ("sample", sample_inputs(2, -1.0, 1)),
    "sample/dtype": ("sample", dict(num_samples=tf.constant(2.0),
                                    temperature=tf.constant(0.7),
                                    seed=tf.constant(1, tf.int64))),
}
errors = {}
for case, (name, inputs) in cases.items():
    try:
        sigs[name](**inputs)
        errors[case] = None
    except Exception as err:  # pylint: disable=broad-except
        errors[case] = "%s: %s" % (type(err).__name__, str(err)[:600])
result["errors"] = errors

# A TF Serving PredictRequest per signature must match its SignatureDef.
try:
    from tensorflow_serving.apis import predict_pb2
except ImportError:
    result["predict_requests"] = None
else:
    saved_model = saved_model_pb2.SavedModel()
    with open(os.path.join(export_dir, "saved_model.pb"), "rb") as f:
        saved_model.ParseFromString(f.read())
    signature_defs = saved_model.meta_graphs[0].signature_def
    requests = {
        "sample": sample_inputs(3, 0.7, 11),
        "reconstruct": {"images": images},
        "log_likelihood": {"images": images},
        "log_weights": {"images": images, "seed": tf.constant(3, tf.int64)},
        "encode": {"images": images},
        "decode": good_latents,
    }
    checked = {}
    for name, inputs in requests.items():
        request = predict_pb2.PredictRequest()
        request.model_spec.name = "nvae"
        request.model_spec.signature_name = name
        for key, value in inputs.items():
            request.inputs[key].CopyFrom(tf.make_tensor_proto(value))
        wire = predict_pb2.PredictRequest.FromString(
            request.SerializeToString())
        spec = signature_defs[name]
        problems = []
        if set(wire.inputs) != set(spec.inputs):
            problems.append("keys %s != %s" % (sorted(wire.inputs),
                                              sorted(spec.inputs)))
        for key, info in spec.inputs.items():
            if key not in wire.inputs:
                continue
            tensor = wire.inputs[key]
            if tensor.dtype != info.dtype:
                problems.append("%s dtype %s != %s" % (key, tensor.dtype,
                                                       info.dtype))
            dims = [d.size for d in tensor.tensor_shape.dim]
            want = [d.size for d in info.tensor_shape.dim]
            if len(dims) != len(want) or any(
                    w not in (-1, d) for d, w in zip(dims, want)):
                problems.append("%s shape %s vs %s" % (key, dims, want))
        # Serving decodes the protos and calls the signature.
        feeds = {k: tf.constant(tf.make_ndarray(v))
                 for k, v in wire.inputs.items()}
        outputs = {k: v.numpy() for k, v in sigs[name](**feeds).items()}
        if set(outputs) != set(spec.outputs):
            problems.append("outputs %s != %s" % (sorted(outputs),
                                                  sorted(spec.outputs)))
        out["request_" + name] = outputs[sorted(outputs)[0]]
        checked[name] = problems
    result["predict_requests"] = checked
np.savez(out_path, **out)
print(json.dumps(result))
'''


def _clean_env():
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    return env


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(model, model dir, export dir, metadata) of a tiny RGB model,
    exported as the trainer does, with BN re-estimation."""
    keras.utils.set_random_seed(11)
    model = NVAE(make_tiny_config())
    model.build()
    root = tmp_path_factory.mktemp("export")
    model_dir = str(root / "model")
    checkpoints.save_model_dir(model, model_dir, step=2)
    export_dir = str(root / "saved_models" / "nvae_tiny" / "1")
    metadata = export.export_saved_model(
        model, export_dir, temperature=TEMPERATURE, readjust_bn=True,
        model_dir=model_dir, checkpoint_id="ckpt-2",
        bn_passes=BN["num_passes"], bn_batch_size=BN["batch_size"],
        max_samples=16)
    return model, model_dir, export_dir, metadata


@pytest.fixture(scope="module")
def fresh_process(exported, tmp_path_factory):
    """Results of FRESH_PROCESS_SCRIPT: (JSON summary, output arrays)."""
    export_dir = exported[2]
    work = tmp_path_factory.mktemp("fresh")
    script = work / "load_and_call.py"
    script.write_text(FRESH_PROCESS_SCRIPT)
    out = work / "outputs.npz"
    proc = subprocess.run(
        [sys.executable, "-I", str(script), export_dir, str(out)],
        cwd=str(work), env=_clean_env(), capture_output=True, text=True,
        timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), dict(
        np.load(out))


def test_export_layout_and_metadata(exported):
    model, model_dir, export_dir, metadata = exported
    assert metadata["export_dir"] == export_dir
    assert metadata["signatures"] == list(export.SIGNATURES)
    assert metadata["serving_default"] == "sample"
    assert metadata["size_bytes"] > 0
    for path in ("saved_model.pb", "variables/variables.index",
                 export.METADATA_FILE):
        assert os.path.exists(os.path.join(export_dir, path)), path
    # Only the version folder: no temporary folder left for Serving to see.
    assert os.listdir(os.path.dirname(export_dir)) == ["1"]
    with open(os.path.join(export_dir, export.METADATA_FILE)) as f:
        meta = json.load(f)
    assert meta["image_shape"] == [8, 8, 3]
    assert meta["config"] == model.config.to_dict()
    assert meta["bn_statistics"]["checkpoint"] == "ckpt-2"
    assert not meta["bn_statistics"]["from_cache"]
    assert os.path.exists(os.path.join(model_dir, "bn_stats",
                                       "temperature_0.70.npz"))


def test_export_uses_only_core_tensorflow_ops(exported):
    """Self-contained: no py_function and no custom ops, only ops that every
    TensorFlow (and so TF Serving) build registers."""
    saved_model = saved_model_pb2.SavedModel()
    with open(os.path.join(exported[2], "saved_model.pb"), "rb") as f:
        saved_model.ParseFromString(f.read())
    graph = saved_model.meta_graphs[0].graph_def
    functions = {f.signature.name for f in graph.library.function}
    ops = {node.op for node in graph.node}
    for function in graph.library.function:
        ops |= {node.op for node in function.node_def}
    ops -= functions
    assert "StatelessRandomNormalV2" in ops and "Conv2D" in ops
    assert not ops & {"PyFunc", "PyFuncStateless", "EagerPyFunc"}
    assert [op for op in ops if not hasattr(tf.raw_ops, op)] == []


def test_signatures_capture_the_weights_under_valid_names(exported):
    """The signature functions' captured weights keep the export's names,
    so the save renames (and logs) nothing."""
    saved_model = saved_model_pb2.SavedModel()
    with open(os.path.join(exported[2], "saved_model.pb"), "rb") as f:
        saved_model.ParseFromString(f.read())
    library = saved_model.meta_graphs[0].graph_def.library.function
    signature_functions = [f for f in library
                           if "call_traced" in f.signature.name]
    # One per signature, plus the save's own retrace of each.
    assert len(signature_functions) >= len(export.SIGNATURES)
    for function in signature_functions:
        names = [arg.name for arg in function.signature.input_arg]
        captured = [n for n in names
                    if n.startswith(export.CAPTURED_INPUT_PREFIX)]
        assert len(captured) > 100, function.signature.name  # the weights
        assert not [n for n in names if n.startswith("unknown")], names


def test_export_refuses_to_overwrite(exported):
    model, _, export_dir, _ = exported
    with pytest.raises(FileExistsError, match="new version"):
        export.export_saved_model(model, export_dir)


def _assert_same_images(actual, expected):
    """uint8 images of two float32 paths that may round differently: equal
    but for rare one-level steps at a rounding boundary."""
    diff = np.abs(np.asarray(actual, np.int32) - np.asarray(expected,
                                                            np.int32))
    assert diff.max() <= 1 and np.mean(diff > 0) <= 1e-2, diff.max()


def test_constant_weights_export_gives_the_same_outputs(exported, tmp_path):
    """`constant_weights`: `sample` and `log_likelihood` read no variable
    (`sample`'s re-estimated BN statistics are constants too) and return
    the plain export's outputs."""
    model, model_dir, plain_dir, _ = exported
    export_dir = str(tmp_path / "nvae_tiny" / "3")
    metadata = export.export_saved_model(
        model, export_dir, temperature=TEMPERATURE, readjust_bn=True,
        model_dir=model_dir, checkpoint_id="ckpt-2",
        bn_passes=BN["num_passes"], bn_batch_size=BN["batch_size"],
        max_samples=16, constant_weights=True)
    assert metadata["constant_weights"] is True
    assert metadata["bn_statistics"]["from_cache"] is True
    loaded = tf.saved_model.load(export_dir)
    assert not loaded.signatures["sample"].variables
    assert not loaded.signatures["log_likelihood"].variables
    assert not loaded.signatures["log_weights"].variables
    assert loaded.signatures["encode"].variables  # unchanged
    plain = tf.saved_model.load(plain_dir).signatures
    args = dict(num_samples=tf.constant(3), seed=tf.constant(5, tf.int64),
                temperature=tf.constant(TEMPERATURE))
    _assert_same_images(loaded.signatures["sample"](**args)["images"],
                        plain["sample"](**args)["images"])
    images = tf.constant(np.random.default_rng(0).integers(
        0, 256, (3, *make_tiny_config().data_shape), dtype=np.uint8))
    np.testing.assert_allclose(
        loaded.signatures["log_likelihood"](images=images)["nelbo_nats"],
        plain["log_likelihood"](images=images)["nelbo_nats"], rtol=1e-5)
    seed = tf.constant(inference.sample_seed(2, 5), tf.int64)
    np.testing.assert_allclose(
        loaded.signatures["log_weights"](images=images,
                                         seed=seed)["log_weights"],
        plain["log_weights"](images=images, seed=seed)["log_weights"],
        rtol=1e-5)


@pytest.mark.slow
def test_cli_exports_with_cached_bn_statistics(exported, tmp_path):
    """The CLI, with batch shards and constant weights: the same outputs
    as the plain export."""
    _, model_dir, first_dir, _ = exported
    export_dir = str(tmp_path / "nvae_tiny" / "2")
    proc = subprocess.run(
        [sys.executable, "-m", "nvae_tf.export", "--model_dir", model_dir,
         "--export_dir", export_dir, "--temperature", str(TEMPERATURE),
         "--readjust_bn", f"--bn_passes={BN['num_passes']}",
         f"--bn_batch_size={BN['batch_size']}", "--inference_shards=2",
         "--constant_weights"],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["export_dir"] == export_dir
    assert summary["checkpoint"] == "ckpt-2"
    assert summary["inference_shards"] == 2
    assert summary["constant_weights"] is True
    # The in-process export cached the statistics; this process reuses them.
    assert summary["bn_statistics_from_cache"] is True
    assert os.path.exists(os.path.join(export_dir, "saved_model.pb"))
    plain = tf.saved_model.load(first_dir).signatures
    sharded = tf.saved_model.load(export_dir).signatures
    for n in (3, 1):  # uneven parts; a batch smaller than the shards
        args = dict(num_samples=tf.constant(n), seed=tf.constant(5, tf.int64),
                    temperature=tf.constant(TEMPERATURE))
        _assert_same_images(sharded["sample"](**args)["images"],
                            plain["sample"](**args)["images"])
    images = tf.constant(np.random.default_rng(0).integers(
        0, 256, (3, *make_tiny_config().data_shape), dtype=np.uint8))
    np.testing.assert_allclose(
        sharded["log_likelihood"](images=images)["nelbo_nats"],
        plain["log_likelihood"](images=images)["nelbo_nats"], rtol=1e-5)


def test_fresh_process_loads_without_nvae_tf(fresh_process):
    result, _ = fresh_process
    assert result["nvae_tf_importable"] is False
    assert result["signatures"] == sorted(
        list(export.SIGNATURES) + ["serving_default"])
    assert result["encode_outputs"] == [
        f"{kind}_{k:03d}" for kind in ("latent", "scale") for k in range(4)]
    assert result["log_weights_outputs"] == {
        "log_weights": [[None], "float32"], "nelbo_nats": [[None], "float32"]}


def test_sample_is_deterministic_per_seed(fresh_process):
    _, out = fresh_process
    assert out["sample_a"].dtype == np.uint8
    assert out["sample_a"].shape == (3, 8, 8, 3)
    np.testing.assert_array_equal(out["sample_a"], out["sample_b"])
    np.testing.assert_array_equal(out["sample_a"], out["default"])
    assert not np.array_equal(out["sample_a"], out["sample_c"])


def test_signatures_match_the_model(exported, fresh_process):
    model, model_dir, _, _ = exported
    _, out = fresh_process
    training_stats = bn_readjust.get_statistics(model)
    # `sample` uses the statistics re-estimated at export (and cached).
    cached = bn_readjust.readjust_batchnorm(
        model, TEMPERATURE, model_dir=model_dir, **BN)
    assert cached.from_cache
    seed = tf.bitcast(tf.constant(11, tf.int64), tf.int32)
    expected = inference.images_to_uint8(
        model.sample(3, TEMPERATURE, seed=seed).images)
    np.testing.assert_array_equal(out["sample_a"], expected)
    # The other signatures use the training statistics.
    bn_readjust.set_statistics(model, training_stats)
    x = inference.images_from_uint8(out["sample_a"], model.config)
    recon = inference.images_to_uint8(inference.reconstruct(model, x))
    assert np.abs(out["reconstruct"].astype(int) - recon.numpy()).max() <= 1
    np.testing.assert_array_equal(out["decode"], out["reconstruct"])
    means, _ = model.encode(x)
    np.testing.assert_allclose(out["latent_000"], means[0], atol=1e-4)
    nelbo = model(x, training=False,
                  seed=tf.constant(inference.FIXED_NOISE_SEED)).nelbo
    np.testing.assert_allclose(out["nelbo_nats"], nelbo, rtol=1e-4)
    np.testing.assert_allclose(
        out["bits_per_dim"], out["nelbo_nats"] / (np.log(2) * 8 * 8 * 3),
        rtol=1e-5)
    # `log_weights`: sample k is the model's with the seed's two halves.
    log_w = np.stack([inference.log_weights(
        model, x, 1, inference.stateless_seed(k))[0][0] for k in range(3)])
    np.testing.assert_allclose(out["log_weights"], log_w, rtol=1e-4)
    assert len(np.unique(out["log_weights"].round(3))) == 9
    np.testing.assert_allclose(
        out["iw_nll"],
        -inference.importance_weighted_log_likelihood(log_w), rtol=1e-4)


@pytest.mark.parametrize("case, message", [
    ("reconstruct/size", r"must have shape \[batch, 8, 8, 3\]"),
    ("reconstruct/channels", r"must have shape \[batch, 8, 8, 3\]"),
    ("reconstruct/empty", r"batch >= 1"),
    ("reconstruct/rank", r"must have shape \[batch, 8, 8, 3\]"),
    ("reconstruct/dtype", r"uint8"),
    ("log_likelihood/size", r"must have shape \[batch, 8, 8, 3\]"),
    ("log_weights/size", r"must have shape \[batch, 8, 8, 3\]"),
    ("encode/size", r"must have shape \[batch, 8, 8, 3\]"),
    ("decode/shape", r"`latent_003` \(float32\) must have shape "
                     r"\[batch, 4, 4, 3\]"),
    ("decode/batch", r"same batch size"),
    ("decode/nan", r"`latent_000` \(float32\) must be finite"),
    ("decode/inf", r"`latent_003` \(float32\) must be finite"),
    ("sample/zero", r"`num_samples` must be in \[1, 16\]"),
    ("sample/too_many", r"`num_samples` must be in \[1, 16\]"),
    ("sample/temperature", r"`temperature` must be finite and >= 0"),
    ("sample/dtype", r"int32"),
])
def test_bad_inputs_name_the_expected_input(fresh_process, case, message):
    result, _ = fresh_process
    error = result["errors"][case]
    assert error is not None, f"{case} was accepted"
    assert error.split(":")[0] in ("InvalidArgumentError", "TypeError",
                                   "ValueError"), error
    assert re.search(message, error), error


def test_predict_requests_match_signature_defs(fresh_process):
    result, out = fresh_process
    if result["predict_requests"] is None:
        pytest.skip("tensorflow-serving-api is not installed")
    assert result["predict_requests"] == {
        name: [] for name in ("sample", "reconstruct", "log_likelihood",
                              "log_weights", "encode", "decode")}
    np.testing.assert_array_equal(out["request_sample"], out["sample_a"])
    np.testing.assert_array_equal(out["request_reconstruct"],
                                  out["reconstruct"])


def _saved_model_cli(*args, cwd):
    command = shutil.which("saved_model_cli")
    command = [command] if command else [
        sys.executable, "-m", "tensorflow.python.tools.saved_model_cli"]
    proc = subprocess.run(command + list(args), cwd=cwd, env=_clean_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_saved_model_cli_show_lists_signatures(exported, tmp_path):
    export_dir = exported[2]
    shown = _saved_model_cli("show", "--dir", export_dir, "--all",
                             cwd=str(tmp_path))
    for name in list(export.SIGNATURES) + ["serving_default"]:
        assert f"signature_def['{name}']" in shown
    assert "inputs['num_samples']" in shown
    assert "outputs['latent_000']" in shown
    assert "tensorflow/serving/predict" in shown


def test_saved_model_cli_run_samples(exported, fresh_process, tmp_path):
    export_dir = exported[2]
    _, out = fresh_process
    _saved_model_cli(
        "run", "--dir", export_dir, "--tag_set", "serve",
        "--signature_def", "sample", "--input_exprs",
        "num_samples=2;temperature=0.7;seed=1", "--outdir", str(tmp_path),
        cwd=str(tmp_path))
    images = np.load(tmp_path / "images.npy")
    assert images.dtype == np.uint8 and images.shape == (2, 8, 8, 3)
    # The TF1 session loader and tf.saved_model.load agree, seed for seed.
    np.testing.assert_array_equal(images, out["sample_seed1"])


def test_serving_doc_models_config_parses():
    """docs/serving.md's models.config is a valid ModelServerConfig."""
    config_pb2 = pytest.importorskip(
        "tensorflow_serving.config.model_server_config_pb2")
    with open(os.path.join(REPO, "docs", "serving.md")) as f:
        doc = f.read()
    block = doc.split("```text models.config\n", 1)[1].split("```", 1)[0]
    config = text_format.Parse(block, config_pb2.ModelServerConfig())
    names = [c.name for c in config.model_config_list.config]
    assert names == ["nvae_mnist", "nvae_celeba64"]


def _input_specs(meta):
    """The input specs every export must declare, from its metadata."""
    h, w, c = meta["image_shape"]
    images = {"images": [[None, h, w, c], "uint8"]}
    specs = {"sample": {"num_samples": [[], "int32"],
                        "temperature": [[], "float32"],
                        "seed": [[], "int64"]},
             "reconstruct": images, "log_likelihood": images,
             "log_weights": {**images, "seed": [[], "int64"]},
             "encode": images,
             "decode": {export.latent_name(k): [[None, *shape], "float32"]
                        for k, shape in enumerate(meta["latent_shapes"])}}
    specs["serving_default"] = specs["sample"]
    return specs


def test_signatures_declare_the_image_and_latent_shapes(exported,
                                                         fresh_process):
    result, _ = fresh_process
    specs = _input_specs(exported[3])
    assert specs["reconstruct"]["images"][0] == [None, 8, 8, 3]
    assert specs["decode"]["latent_003"][0] == [None, 4, 4, 3]
    assert result["input_specs"] == specs


INPUT_SPECS_SCRIPT = r'''
import json, sys
try:
    import nvae_tf  # noqa: F401
    importable = True
except ImportError:
    importable = False
import tensorflow as tf
sigs = tf.saved_model.load(sys.argv[1]).signatures
print(json.dumps({"nvae_tf_importable": importable, "specs": {
    name: {key: [list(spec.shape), spec.dtype.name]
           for key, spec in sigs[name].structured_input_signature[1].items()}
    for name in sigs}}))
'''


def test_model_export_writes_the_cli_saved_model(exported, tmp_path):
    model = exported[0]
    export_dir = str(tmp_path / "nvae_tiny" / "1")
    metadata = model.export(export_dir, max_samples=16)
    assert metadata["signatures"] == list(export.SIGNATURES)
    script = tmp_path / "specs.py"
    script.write_text(INPUT_SPECS_SCRIPT)
    proc = subprocess.run(
        [sys.executable, "-I", str(script), export_dir], cwd=str(tmp_path),
        env=_clean_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not result["nvae_tf_importable"]
    assert result["specs"] == _input_specs(metadata)
    loaded = tf.saved_model.load(export_dir)
    x = np.random.RandomState(0).randint(0, 256, (2, 8, 8, 3), np.uint8)
    nelbo = model(inference.images_from_uint8(x, model.config),
                  training=False,
                  seed=tf.constant(inference.FIXED_NOISE_SEED)).nelbo
    np.testing.assert_allclose(
        loaded.signatures["log_likelihood"](images=x)["nelbo_nats"], nelbo,
        rtol=1e-4)


def test_model_export_refuses_other_formats_tf_saved_model_save_has_none(
        exported, tmp_path):
    model = exported[0]
    with pytest.raises(ValueError, match="tf_saved_model"):
        model.export(str(tmp_path / "x"), format="onnx")
    # tf.saved_model.save keeps the variables only: no signature can
    # return `call`'s NVAEOutput; model.export is the serving route.
    tf.saved_model.save(model, str(tmp_path / "y"))
    loaded = tf.saved_model.load(str(tmp_path / "y"))
    assert not list(loaded.signatures)
    saved = tf.train.list_variables(
        str(tmp_path / "y" / "variables" / "variables"))
    assert len([n for n, _ in saved if "VARIABLE_VALUE" in n]) >= \
        len(model.weights)
