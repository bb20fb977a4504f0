"""Evaluation: IW NLL vs NELBO, bits/dim, BN re-estimation and its cache,
sample grids, reconstructions and latent interpolation."""

import json
import math
import os
import signal
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from nvae_tf import objectives
from nvae_tf.serving import bn_readjust, evaluate, images, inference
from nvae_tf.training import checkpoints
from nvae_tf.data import DataConfig, make_datasets
from nvae_tf.model import NVAE
from tests.conftest import make_tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
# 28x28 Fashion-MNIST (the embedded data set), padded to 32 by the model.
FASHION = dict(dataset="fashion_mnist", image_size=None, num_x_bits=5)


def _model(**overrides):
    model = NVAE(make_tiny_config(**overrides))
    model.build()
    return model


@pytest.fixture(scope="module")
def fashion_model():
    keras.utils.set_random_seed(7)
    return _model(**FASHION)


def _images(model, batch, seed=0):
    rng = np.random.default_rng(seed)
    levels = rng.integers(0, 2 ** model.config.num_x_bits,
                          size=(batch, *model.config.data_shape))
    return (levels / (2 ** model.config.num_x_bits - 1)).astype(np.float32)


# ---------------------------------------------------------------- bits/dim
def test_likelihood_report_bits_per_dim_by_hand():
    config = make_tiny_config(**FASHION)  # 5-bit, 28 * 28 * 1 pixels
    report = evaluate.likelihood_report(1000.0, 1100.0, config)
    # 1000 / (ln 2 * 784) = 1000 / 543.4274 = 1.840172
    assert report["num_pixels"] == 784
    assert report["nll_bpd"] == pytest.approx(1.840172, abs=1e-6)
    assert report["nelbo_bpd"] == pytest.approx(2.024189, abs=1e-6)
    # A 5-bit bin holds 8 8-bit values: + log2(8) = 3 bits per pixel.
    assert report["nll_bpd_8bit"] == pytest.approx(4.840172, abs=1e-6)
    assert "5-bit data" in report["bpd_convention"]


def test_likelihood_report_8bit_rgb_has_no_conversion():
    config = make_tiny_config()  # cifar10-like, 8 x 8 x 3, 8 bits
    report = evaluate.likelihood_report(100.0, 100.0, config)
    assert report["nll_bpd"] == pytest.approx(100 / (math.log(2) * 192))
    assert "nll_bpd_8bit" not in report


def test_importance_weighted_log_likelihood_is_log_mean_exp():
    log_w = tf.constant([[-3.0, 10.0], [-1.0, 12.0], [-2.0, 11.0]])
    expected = np.log(np.mean(np.exp(log_w.numpy()), axis=0))
    np.testing.assert_allclose(
        inference.importance_weighted_log_likelihood(log_w), expected,
        rtol=1e-6)


# --------------------------------------------------------------------- nll
def test_iw_nll_is_at_most_nelbo(fashion_model):
    x = _images(fashion_model, 6)
    dataset = tf.data.Dataset.from_tensor_slices(x).batch(4)
    result = evaluate.importance_weighted_nll(
        fashion_model, dataset, num_iw_samples=6, iw_samples_per_pass=4,
        max_images=5, progress=False)
    assert result["num_images"] == 5
    assert np.isfinite(result["nll_nats"])
    assert result["nll_nats"] <= result["nelbo_nats"]
    # Same seed, same numbers: every sample's noise comes from the seed.
    again = evaluate.importance_weighted_nll(
        fashion_model, dataset, num_iw_samples=6, iw_samples_per_pass=4,
        max_images=5, progress=False)
    assert again == result
    # Batch shards (the CLI's default on a CPU) give the same numbers; the
    # batches of 4 and 1 images (x 4 samples per pass) are cut into parts of
    # 8 and 2 (a run-time batch size: `tf.cond` keeps a batch >= 2 sharded).
    sharded = evaluate.importance_weighted_nll(
        fashion_model, dataset, num_iw_samples=6, iw_samples_per_pass=4,
        max_images=5, progress=False, shards=2)
    for key in ("nll_nats", "nelbo_nats"):
        np.testing.assert_allclose(sharded[key], result[key], rtol=1e-6)
    samples = evaluate.generate_samples(fashion_model, 3, 0.7, seed=2)
    np.testing.assert_array_equal(
        evaluate.generate_samples(fashion_model, 3, 0.7, seed=2, shards=2),
        samples)


def test_log_weights_tile_samples_with_distinct_noise(fashion_model):
    x = _images(fashion_model, 2)
    log_w, nelbo = inference.log_weights(fashion_model, x, 3,
                                         tf.constant([1, 2], tf.int64))
    assert log_w.shape == (3, 2) and nelbo.shape == (3, 2)
    assert len(np.unique(log_w.numpy().round(4))) == 6


@pytest.mark.slow
def test_iw_nll_below_nelbo_after_training(tmp_path):
    """A briefly trained model: the IW bound is tighter than the NELBO."""
    keras.utils.set_random_seed(3)
    model = _model(**FASHION)
    train, eval_ds, _ = make_datasets(DataConfig.from_model_config(
        model.config, batch_size=16))
    optimizer = keras.optimizers.Adamax(1e-2)
    objective = objectives.ObjectiveConfig(total_steps=30)

    @tf.function
    def step(x, i):
        with tf.GradientTape() as tape:
            loss = objectives.compute_loss(model, x, i, objective).loss
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))

    for i, x in enumerate(train.take(30)):
        step(x, tf.constant(i, tf.int64))
    result = evaluate.importance_weighted_nll(
        model, eval_ds, num_iw_samples=50, iw_samples_per_pass=25,
        max_images=32, progress=False)
    assert result["nll_nats"] < result["nelbo_nats"]
    # ~1,300 nats at init, far less after 30 steps; IW gains a few %.
    assert result["nelbo_nats"] - result["nll_nats"] < \
        0.2 * result["nelbo_nats"]


# --------------------------------------------------------------------- BN
def test_bn_readjust_changes_decoder_statistics_and_reuses_cache(
        tmp_path, monkeypatch):
    keras.utils.set_random_seed(5)
    model = _model()
    before = bn_readjust.get_statistics(model)
    result = bn_readjust.readjusted_statistics(
        model, 0.6, model_dir=str(tmp_path), checkpoint_id="ckpt-3",
        num_passes=3, batch_size=4)
    assert not result.from_cache
    assert result.cache_path == str(tmp_path / "bn_stats" /
                                    "temperature_0.60.npz")
    assert os.path.exists(result.cache_path)
    changed = {k for k in before
               if not np.allclose(before[k], result.statistics[k])}
    # Sampling runs the decoder only: its BN layers move, the encoder's not.
    assert changed and all(k.startswith(("decoder", "postprocess"))
                           for k in changed)
    assert any(k.startswith("preprocess") for k in before)
    # The model keeps its training statistics until told otherwise.
    now = bn_readjust.get_statistics(model)
    assert all(np.array_equal(before[k], now[k]) for k in before)

    calls = []
    real_compute = bn_readjust.compute_statistics
    monkeypatch.setattr(bn_readjust, "compute_statistics",
                        lambda *a, **k: calls.append(1) or real_compute(
                            *a, **k))
    cached = bn_readjust.readjust_batchnorm(
        model, 0.6, model_dir=str(tmp_path), num_passes=3, batch_size=4)
    assert cached.from_cache and not calls
    assert cached.metadata["checkpoint"] == "ckpt-3"
    now = bn_readjust.get_statistics(model)
    assert all(np.array_equal(now[k], result.statistics[k]) for k in now)

    # New weights (a newer checkpoint) invalidate the cache.
    model.prior_ftr0.assign(model.prior_ftr0 + 0.1)
    fresh = bn_readjust.readjusted_statistics(
        model, 0.6, model_dir=str(tmp_path), num_passes=3, batch_size=4)
    assert not fresh.from_cache and calls == [1]


def test_bn_readjust_refuses_non_finite_statistics():
    model = _model()
    model.prior_ftr0.assign(np.full(model.prior_ftr0.shape, np.nan))
    with pytest.raises(FloatingPointError, match="non-finite"):
        bn_readjust.compute_statistics(model, 0.7, num_passes=1,
                                       batch_size=2)


def test_temperature_tags():
    assert bn_readjust.temperature_tag(0.7) == "0.70"
    assert bn_readjust.temperature_tag(1) == "1.00"
    assert bn_readjust.temperature_tag(0.655) == "0.655"


# ------------------------------------------------------------------ images
def test_sample_grid_has_requested_size(tmp_path, fashion_model):
    samples = evaluate.generate_samples(fashion_model, 5, 0.7,
                                        batch_size=3, seed=2)
    assert samples.shape == (5, 28, 28, 1)
    again = evaluate.generate_samples(fashion_model, 5, 0.7, batch_size=3,
                                      seed=2)
    np.testing.assert_array_equal(samples, again)
    path = images.write_png(str(tmp_path / "grid.png"),
                            images.make_grid(samples, columns=2))
    png = tf.io.decode_png(tf.io.read_file(path)).numpy()
    # 3 rows x 2 columns of 28 px tiles, 2 px borders: 92 x 62.
    assert png.shape == (3 * 30 + 2, 2 * 30 + 2, 1)
    np.testing.assert_array_equal(png[2:30, 2:30],
                                  images.to_uint8(samples[0]))


def test_interpolation_endpoints_are_reconstructions(fashion_model):
    x = _images(fashion_model, 4, seed=1)
    x_start, x_end = x[:2], x[2:]
    paths = inference.interpolate(fashion_model, x_start, x_end, 4).numpy()
    assert paths.shape == (2, 4, 28, 28, 1)
    np.testing.assert_allclose(
        paths[:, 0], inference.reconstruct(fashion_model, x_start),
        atol=1e-5)
    np.testing.assert_allclose(
        paths[:, -1], inference.reconstruct(fashion_model, x_end),
        atol=1e-5)
    assert not np.allclose(paths[:, 1], paths[:, 0], atol=1e-4)


def test_interpolation_needs_two_steps(fashion_model):
    x = _images(fashion_model, 1)
    with pytest.raises(ValueError, match="num_steps=1"):
        inference.interpolate(fashion_model, x, x, 1)


# --------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def fashion_model_dir(tmp_path_factory, fashion_model):
    path = str(tmp_path_factory.mktemp("fashion_model"))
    checkpoints.save_model_dir(fashion_model, path, step=4)
    return path


def _cli(*args):
    proc = subprocess.run(
        [sys.executable, "-m", "nvae_tf.evaluate", *args],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_cli_sample_writes_grid_and_reuses_bn_cache(fashion_model_dir,
                                                    tmp_path):
    output = str(tmp_path / "samples.png")
    common = ["--model_dir", fashion_model_dir, "--mode=sample",
              "--num_samples=5", "--readjust_bn", "--bn_passes=2",
              "--bn_batch_size=4", "--output", output]
    result = _cli(*common, "--output_npy", str(tmp_path / "s.npy"))
    assert result["checkpoint"] == "ckpt-4"
    assert result["grid"] == [2, 3] and not result["bn_stats_from_cache"]
    png = tf.io.decode_png(tf.io.read_file(output)).numpy()
    assert png.shape == (2 * 30 + 2, 3 * 30 + 2, 1)
    assert np.load(tmp_path / "s.npy").shape == (5, 28, 28, 1)
    assert os.path.exists(os.path.join(fashion_model_dir, "bn_stats",
                                       "temperature_0.70.npz"))


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["nll", "reconstruct", "interpolate"])
def test_cli_modes(fashion_model_dir, tmp_path, mode):
    output = str(tmp_path / (f"{mode}.json" if mode == "nll"
                             else f"{mode}.png"))
    args = ("--model_dir", fashion_model_dir, f"--mode={mode}",
            "--num_iw_samples=4", "--iw_samples_per_pass=2",
            "--max_images=8", "--batch_size=4", "--num_images=3",
            "--num_pairs=2", "--num_steps=3", "--output", output)
    result = _cli(*args)
    assert result["mode"] == mode
    if mode == "nll":
        assert result["output"] == output and result["num_images"] == 8
        assert result["nll_nats"] <= result["nelbo_nats"]
        assert result["nll_bpd_8bit"] == pytest.approx(
            result["nll_bpd"] + 3)
        # The weights read as variables instead of constants: same numbers.
        plain = _cli(*args, "--noconstant_weights")
        for key in ("nll_nats", "nelbo_nats"):
            assert plain[key] == pytest.approx(result[key], rel=1e-6)
        return
    png = tf.io.decode_png(tf.io.read_file(output)).numpy()
    expected = {"reconstruct": (2 * 30 + 2, 3 * 30 + 2, 1),
                "interpolate": (2 * 30 + 2, 5 * 30 + 2, 1)}[mode]
    assert png.shape == expected


@pytest.mark.slow
def test_evaluate_and_export_share_the_bn_cache_by_default(
        fashion_model_dir, tmp_path):
    """`evaluate --readjust_bn` and `export --readjust_bn` use the same
    seed unless told otherwise, so the second reuses the first's file."""
    passes = ("--readjust_bn", "--bn_passes=2", "--bn_batch_size=4",
              "--temperature=0.6")
    sampled = _cli("--model_dir", fashion_model_dir, "--mode=sample",
                   "--num_samples=2", "--output", str(tmp_path / "s.png"),
                   *passes)
    assert sampled["bn_stats"].endswith("temperature_0.60.npz")
    proc = subprocess.run(
        [sys.executable, "-m", "nvae_tf.export", "--model_dir",
         fashion_model_dir, "--export_dir", str(tmp_path / "export" / "1"),
         *passes], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["bn_statistics_from_cache"] is True
    with open(sampled["bn_stats"], "rb") as f:
        meta = json.loads(str(np.load(f)[bn_readjust.META_KEY]))
    assert meta["seed"] == bn_readjust.READJUST_SEED


def test_cli_nll_writes_its_json_into_the_model_dir(fashion_model_dir):
    result = _cli("--model_dir", fashion_model_dir, "--mode=nll",
                  "--num_iw_samples=2", "--max_images=4", "--batch_size=4")
    path = os.path.join(fashion_model_dir, "eval", evaluate.NLL_FILE)
    assert result["output"] == path and result["split"] == "test"
    # Finished: the progress file beside the result is gone.
    assert os.listdir(os.path.dirname(path)) == [evaluate.NLL_FILE]
    with open(path) as f:
        assert json.load(f) == result
    assert result["num_images"] == 4 and np.isfinite(result["nll_nats"])
    proc = subprocess.run(
        [sys.executable, "-m", "nvae_tf.evaluate", "--model_dir",
         fashion_model_dir, "--mode=nll", "--split=validation"],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "trained without a validation split" in proc.stderr


# ------------------------------------------------- nll: SavedModel, resume
@pytest.fixture(scope="module")
def fashion_export(tmp_path_factory, fashion_model, fashion_model_dir):
    """The Fashion-MNIST model's SavedModel (export as the CLI writes it)."""
    from nvae_tf.serving import export  # pylint: disable=import-outside-toplevel
    export_dir = str(tmp_path_factory.mktemp("fashion_export") / "1")
    export.export_saved_model(fashion_model, export_dir,
                              model_dir=fashion_model_dir,
                              checkpoint_id="ckpt-4", max_samples=4)
    return export_dir


def _float_batches(model, n, batch, seed=0):
    return tf.data.Dataset.from_tensor_slices(
        _images(model, n, seed)).batch(batch)


def test_iw_nll_of_the_saved_model_equals_the_model_dirs(fashion_model,
                                                         fashion_export):
    """The `log_weights` signature draws the noise of `evaluate` on the
    model: the same importance weights, so the same NLL and NELBO."""
    dataset = _float_batches(fashion_model, 6, 4)
    kwargs = dict(num_iw_samples=4, iw_samples_per_pass=2, max_images=5,
                  seed=3, progress=False)
    direct = evaluate.importance_weighted_nll(fashion_model, dataset,
                                              **kwargs)
    signature, metadata, experiment = evaluate.load_saved_model(
        fashion_export)
    assert metadata["data"]["batch_size"] == 32  # config.json's
    assert experiment.data.dataset == "fashion_mnist"
    assert experiment.model == fashion_model.config
    exported = evaluate.iw_nll_loop(
        evaluate.saved_model_log_weights(signature, 2), dataset, **kwargs)
    assert exported["num_images"] == direct["num_images"] == 5
    for key in ("nll_nats", "nelbo_nats"):
        assert exported[key] == pytest.approx(direct[key], rel=1e-5)
    # One sample through the signature: the model's first sample, seed for
    # seed (stateless noise of the int64's halves).
    x = _images(fashion_model, 3)
    sample_seed = inference.sample_seed(3, 7)
    log_w, nelbo = inference.log_weights(
        fashion_model, x, 1, inference.stateless_seed(sample_seed))
    out = signature(images=inference.images_to_uint8(x),
                    seed=tf.constant(sample_seed, tf.int64))
    assert out["log_weights"].shape == (3,)
    np.testing.assert_allclose(out["log_weights"], log_w[0], rtol=1e-5)
    np.testing.assert_allclose(out["nelbo_nats"], nelbo[0], rtol=1e-5)
    assert not np.allclose(out["log_weights"], signature(
        images=inference.images_to_uint8(x),
        seed=tf.constant(sample_seed + 1, tf.int64))["log_weights"])


def test_sample_seed_packs_seed_and_index():
    seed = inference.sample_seed(5, 9)
    assert seed == 9 * 2 ** 32 + 5
    np.testing.assert_array_equal(inference.stateless_seed(seed), [5, 9])
    with pytest.raises(ValueError, match="seed=-1"):
        inference.sample_seed(-1, 0)


def test_interrupted_nll_resumes_to_the_uninterrupted_figures(
        fashion_model, tmp_path):
    """SIGTERM in the third batch keeps two finished batches; the rerun
    continues there and ends with exactly the uninterrupted figures."""
    dataset = _float_batches(fashion_model, 10, 3)
    log_weights = evaluate.model_log_weights(fashion_model, 2)
    kwargs = dict(num_iw_samples=3, iw_samples_per_pass=2, seed=4,
                  total_images=10, progress=False)
    whole = evaluate.iw_nll_loop(log_weights, dataset, **kwargs)
    path = str(tmp_path / "nll.progress.json")
    settings = {"num_iw_samples": 3, "seed": 4}
    calls = []

    def killed_in_batch_3(x, seed):
        calls.append(1)
        if len(calls) == 5:  # 2 passes per batch: the third batch
            signal.raise_signal(signal.SIGTERM)
        return log_weights(x, seed)

    with pytest.raises(evaluate.Interrupted,
                       match=r"SIGTERM after 6/10 images.*rerun") as err:
        with evaluate.stop_on_signals():
            evaluate.iw_nll_loop(killed_in_batch_3, dataset,
                                 progress_file=path, settings=settings,
                                 **kwargs)
    assert err.value.exit_code == 128 + signal.SIGTERM
    with open(path) as f:
        saved = json.load(f)
    assert saved["batches"] == 2 and saved["num_images"] == 6
    assert saved["settings"] == settings
    resumed = evaluate.iw_nll_loop(log_weights, dataset, progress_file=path,
                                   settings=settings, **kwargs)
    assert resumed.pop("resumed_images") == 6
    assert whole.pop("resumed_images") == 0
    assert resumed == whole  # float64 sums, bit for bit

    # Other settings are refused by name; --restart starts over.
    with pytest.raises(Exception, match=r"num_iw_samples=3, this one has "
                                        r"num_iw_samples=2.*--restart"):
        evaluate.NllProgress.resume(path, {"num_iw_samples": 2, "seed": 4})
    fresh = evaluate.NllProgress.resume(path, {"num_iw_samples": 2},
                                        restart=True)
    assert fresh.batches == 0 and fresh.nll_sum == 0.0


@pytest.mark.slow
def test_cli_nll_of_a_saved_model(fashion_model, fashion_export, tmp_path):
    """`--saved_model`: the export's data settings, the model directory's
    numbers; the progress file is gone once the result is written."""
    output = str(tmp_path / "nll.json")
    result = _cli("--saved_model", fashion_export, "--mode=nll",
                  "--num_iw_samples=2", "--max_images=5", "--batch_size=4",
                  "--inference_shards=1", "--output", output)
    assert result["saved_model"] == fashion_export
    assert result["checkpoint"] == "ckpt-4" and result["num_images"] == 5
    # An unsharded export runs on TensorFlow's threads (0: one per core),
    # not on the single intra-op thread that pairs with batch shards.
    assert result["threads"] == {"inference_shards": 1, "intra_op": 0,
                                 "inter_op": 0}
    assert not os.path.exists(evaluate.progress_path(output))
    with open(output) as f:
        assert json.load(f) == result
    _, eval_ds, _ = make_datasets(DataConfig.from_model_config(
        fashion_model.config, batch_size=4), seed=bn_readjust.READJUST_SEED)
    direct = evaluate.importance_weighted_nll(
        fashion_model, eval_ds, 2, max_images=5,
        seed=bn_readjust.READJUST_SEED, progress=False)
    for key in ("nll_nats", "nelbo_nats"):
        assert result[key] == pytest.approx(direct[key], rel=1e-5)


@pytest.mark.slow
def test_cli_refuses_other_shards_than_the_exports(fashion_export, tmp_path):
    """A SavedModel's shards are traced into its graph: asking for others
    is one line that says how to get them, and nothing is written."""
    output = str(tmp_path / "nll.json")
    proc = subprocess.run(
        [sys.executable, "-m", "nvae_tf.evaluate", "--saved_model",
         fashion_export, "--mode=nll", "--inference_shards=2", "--output",
         output], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("Error: --inference_shards=2") and \
        "exported with 1 shard(s)" in last and \
        "nvae_tf.export --inference_shards=2" in last
    assert not os.listdir(tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("flag, message", [
    ("--model_dir", "evaluate it with --saved_model={} --mode=nll"),
    ("--saved_model", "--saved_model needs --output=PATH.json"),
])
def test_cli_points_a_saved_model_to_the_right_flag(fashion_export, flag,
                                                    message):
    proc = subprocess.run(
        [sys.executable, "-m", "nvae_tf.evaluate", flag, fashion_export,
         "--mode=nll"], cwd=REPO, capture_output=True, text=True,
        timeout=300)
    assert proc.returncode == 1, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("Error: ")
    assert message.format(fashion_export) in lines[-1]
