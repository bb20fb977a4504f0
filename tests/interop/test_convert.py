"""The official-checkpoint converter: strict mapping, CLI, model directory.

The CLI never destroys a run: a model_dir holding a config or checkpoints is
refused (its files stay byte for byte), and `--overwrite` moves it aside.
"""

import argparse
import hashlib
import json
import os
import pickle
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import tensorflow as tf

from nvae_tf import cli
from nvae_tf.training import checkpoints

from nvae_tf.interop import convert
from nvae_tf.interop.torch_pickle import load_torch_checkpoint

from tests.test_official_fixtures import FIXTURE_DIR

BINARY = os.path.join(FIXTURE_DIR, "tiny_binary.pt")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
TRAINED_STEP = 1000  # the step of the stand-in training checkpoint


def _write_checkpoint(path, obj):
    """`obj` as a torch.save zip archive (its arrays pickled as numpy's)."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("archive/data.pkl", pickle.dumps(obj, protocol=2))
        archive.writestr("archive/version", b"3\n")
    return str(path)


def _digests(directory):
    """{relative path: sha256} of every file under `directory`."""
    result = {}
    for root, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                result[os.path.relpath(path, directory)] = hashlib.sha256(
                    f.read()).hexdigest()
    return result


def _run_convert(*args):
    return subprocess.run(
        [sys.executable, "-m", "nvae_tf.convert", *args], cwd=ROOT,
        capture_output=True, text=True, timeout=600,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})


def _error_lines(stderr):
    return [line for line in stderr.splitlines()
            if line.startswith("Error:")]


@pytest.fixture(scope="module")
def official():
    if not os.path.exists(BINARY):
        pytest.skip(f"{BINARY} not found")
    return load_torch_checkpoint(BINARY)


@pytest.fixture(scope="module")
def model(official):
    from nvae_tf.model import NVAE
    m = NVAE(convert.config_from_args(official["args"]))
    m.build()
    return m


def test_every_state_dict_entry_is_mapped(official, model):
    entries = convert.official_variable_map(model)
    keys = {k for k in official["state_dict"]
            if not k.endswith("num_batches_tracked")}
    assert keys == set(entries)
    mapped = {id(v) for v, _ in entries.values() if v is not None}
    assert {id(v) for v in model.trainable_variables} <= mapped


def test_missing_entry_is_reported(official, model):
    state = dict(official["state_dict"])
    del state["stem.weight"]
    with pytest.raises(convert.CheckpointMismatchError, match="stem.weight"):
        convert.assign_official_weights(model, state)


def test_unexpected_entry_is_reported(official, model):
    state = dict(official["state_dict"])
    state["enc_tower.99.conv.weight"] = np.zeros((1, 1, 1, 1), np.float32)
    with pytest.raises(convert.CheckpointMismatchError,
                       match=r"unexpected keys \['enc_tower.99.conv.weight'\]"):
        convert.assign_official_weights(model, state)


def test_shape_mismatch_is_reported(official, model):
    state = dict(official["state_dict"])
    state["prior_ftr0"] = np.zeros((3, 2, 2), np.float32)
    with pytest.raises(convert.CheckpointMismatchError, match="prior_ftr0"):
        convert.assign_official_weights(model, state)


def test_unsupported_arch_instance_is_refused(official):
    args = argparse.Namespace(**vars(official["args"]))
    args.arch_instance = "mbconv_den"
    with pytest.raises(ValueError, match="mbconv_den"):
        convert.config_from_args(args)


def test_old_checkpoint_args_get_official_defaults(official):
    values = dict(vars(official["args"]))
    for name in ("ada_groups", "min_groups_per_scale", "num_mixture_dec"):
        values.pop(name)
    config = convert.config_from_args(values)
    assert (config.ada_groups, config.min_groups_per_scale,
            config.num_mixture_dec) == (False, 1, 10)


def test_cli_writes_a_model_directory_that_reloads(tmp_path, official):
    model_dir = str(tmp_path / "converted")
    process = _run_convert(f"--checkpoint={BINARY}",
                           f"--model_dir={model_dir}")
    assert process.returncode == 0, process.stderr[-3000:]
    summary = json.loads(process.stdout.strip().splitlines()[-1])
    assert summary["saved"].endswith("ckpt-0")
    assert summary["replaced_run_moved_to"] is None
    assert checkpoints.read_sections(model_dir)["source"] == BINARY
    experiment = checkpoints.read_config(model_dir)
    assert experiment.model == convert.config_from_args(official["args"])
    assert experiment.run is None  # not trained here
    reloaded = checkpoints.load_model_dir(model_dir)
    arrays = np.load(BINARY.replace(".pt", ".npz"))
    eps = [arrays[k] for k in sorted(arrays.files)
           if k.startswith("eps_forward_")]
    out = reloaded(arrays["x"], training=False, eps=eps)
    np.testing.assert_allclose(out.logits, arrays["logits"], rtol=1e-4,
                               atol=1e-5)


# ------------------------------------------------- an existing run is kept
@pytest.fixture
def trained_run(tmp_path, tiny_config):
    """A model directory as training leaves it: config.json and a
    checkpoint at step `TRAINED_STEP`; returns (model_dir, its weights)."""
    from nvae_tf.model import NVAE
    model = NVAE(tiny_config())
    model.build()
    model_dir = str(tmp_path / "run")
    checkpoints.save_model_dir(model, model_dir, step=TRAINED_STEP)
    return model_dir, [v.numpy() for v in model.trainable_variables]


def _assert_is_the_trained_run(model_dir, weights):
    latest = tf.train.latest_checkpoint(
        os.path.join(model_dir, checkpoints.CHECKPOINT_SUBDIR))
    assert latest.endswith(f"ckpt-{TRAINED_STEP}")
    restored = checkpoints.load_model_dir(model_dir)
    assert restored.config.dataset == "cifar10"
    for a, b in zip(weights, restored.trainable_variables):
        np.testing.assert_array_equal(a, b.numpy())


def test_existing_run_is_refused_and_left_intact(trained_run, official):
    model_dir, weights = trained_run
    before = _digests(model_dir)
    with pytest.raises(cli.UserError, match="already holds a run "
                       r"\(checkpoints, config.json\).*--overwrite"):
        convert.convert_to_model_dir(BINARY, model_dir)
    assert _digests(model_dir) == before
    _assert_is_the_trained_run(model_dir, weights)


def test_overwrite_moves_the_old_run_aside(trained_run, official):
    model_dir, weights = trained_run
    before = _digests(model_dir)
    path, config, moved_to = convert.convert_to_model_dir(
        BINARY, model_dir, overwrite=True)
    assert os.path.basename(moved_to).startswith(
        "run" + checkpoints.REPLACED_SUFFIX)
    assert _digests(moved_to) == before
    _assert_is_the_trained_run(moved_to, weights)
    assert path.endswith("ckpt-0") and config.dataset == "mnist"
    assert checkpoints.read_config(model_dir).model == config
    assert sorted(os.listdir(os.path.join(model_dir, "checkpoints"))) == [
        "checkpoint", "ckpt-0.data-00000-of-00001", "ckpt-0.index"]
    # A second replacement in the same second gets its own name.
    _, _, moved_again = convert.convert_to_model_dir(BINARY, model_dir,
                                                     overwrite=True)
    assert moved_again != moved_to and os.path.isdir(moved_to)


def test_empty_model_dir_is_not_a_run(tmp_path, official):
    model_dir = tmp_path / "empty"
    (model_dir / "checkpoints").mkdir(parents=True)
    _, _, moved_to = convert.convert_to_model_dir(BINARY, str(model_dir))
    assert moved_to is None
    assert checkpoints.existing_run(str(model_dir)) == [
        "checkpoints", "config.json"]


def test_cli_refuses_a_run_then_overwrite_moves_it(trained_run, official):
    model_dir, weights = trained_run
    before = _digests(model_dir)
    refused = _run_convert(f"--checkpoint={BINARY}",
                           f"--model_dir={model_dir}")
    assert refused.returncode == 1
    assert "Traceback" not in refused.stderr
    [line] = _error_lines(refused.stderr)
    assert "already holds a run" in line and "--overwrite" in line
    assert _digests(model_dir) == before

    replaced = _run_convert(f"--checkpoint={BINARY}",
                            f"--model_dir={model_dir}", "--overwrite")
    assert replaced.returncode == 0, replaced.stderr[-3000:]
    moved_to = json.loads(
        replaced.stdout.strip().splitlines()[-1])["replaced_run_moved_to"]
    assert _digests(moved_to) == before
    _assert_is_the_trained_run(moved_to, weights)
    assert checkpoints.read_config(model_dir).model.dataset == "mnist"


# ------------------------------------------ what cannot be converted: one line
def _one_line_error(capsys, checkpoint, model_dir):
    """Runs the conversion as the CLI does; returns its one error line."""
    main = cli.report_user_errors(
        lambda argv: convert.convert_to_model_dir(checkpoint, model_dir))
    assert main(["convert"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("Error: "), err
    assert not os.path.exists(model_dir)
    return err


def test_missing_checkpoint_is_one_line(tmp_path, capsys):
    missing = str(tmp_path / "nowhere.pt")
    err = _one_line_error(capsys, missing, str(tmp_path / "out"))
    assert err == f"Error: PyTorch checkpoint not found: {missing}\n"


def test_unsafe_pickle_is_refused_in_one_line(tmp_path, capsys):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = _write_checkpoint(tmp_path / "evil.pt", Evil())
    err = _one_line_error(capsys, evil, str(tmp_path / "out"))
    assert err.startswith(f"Error: Not converted: {evil}: refusing to "
                          "load global 'posix.system'")
    assert not marker.exists()


def test_mismatched_checkpoint_is_one_line(tmp_path, capsys, official):
    state = dict(official["state_dict"])
    del state["stem.weight"]
    mismatched = _write_checkpoint(tmp_path / "mismatched.pt",
                                   {**official, "state_dict": state})
    err = _one_line_error(capsys, mismatched, str(tmp_path / "out"))
    assert err.startswith(f"Error: Not converted: {mismatched}: The "
                          "checkpoint's weights do not fit")
    assert "missing keys ['stem.weight']" in err


def test_unsupported_checkpoint_is_one_line(tmp_path, capsys):
    weights_only = _write_checkpoint(tmp_path / "weights.pt",
                                     {"weight": np.zeros(3, np.float32)})
    err = _one_line_error(capsys, weights_only, str(tmp_path / "out"))
    assert "has no 'state_dict' entry" in err


def test_long_key_lists_are_cut(official, model):
    state = {k: v for k, v in official["state_dict"].items()
             if not k.startswith("enc_tower")}
    with pytest.raises(convert.CheckpointMismatchError) as info:
        convert.assign_official_weights(model, state)
    dropped = sum(k.startswith("enc_tower") and
                  not k.endswith("num_batches_tracked")
                  for k in official["state_dict"])
    assert f"and {dropped - 5} more" in str(info.value)
