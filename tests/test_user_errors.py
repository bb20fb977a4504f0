"""Bad input to the commands: one line on stderr, exit 1, nothing lost.

Each case runs a command (`python -m nvae_tf.train|evaluate|export`) in a
subprocess and checks that it exits non-zero, that the last line of stderr
is the message (naming the problem and what to do) and that no traceback is
printed; `--verbosity=1` brings the traceback back.
"""

import os
import resource
import subprocess
import sys

import pytest

from nvae_tf.experiment import ExperimentConfig
from nvae_tf.training import checkpoints
from tests.conftest import make_tiny_config
from tests.training import helpers as train_helpers

# A path whose directory cannot be created, even by root (sysfs refuses).
UNWRITABLE_DIR = "/sys/nvae_tf_test_run"
# Largest file the "full disk" run may write (RLIMIT_FSIZE): config.json
# fits, the first checkpoint does not.
FULL_DISK_BYTES = 16 * 1024


def _run(module, *args, preexec_fn=None):
    return subprocess.run(
        [sys.executable, "-m", f"nvae_tf.{module}", *args],
        cwd=train_helpers.REPO, env=train_helpers.subprocess_env(),
        capture_output=True, text=True, timeout=600, preexec_fn=preexec_fn)


def _assert_one_line(proc, *expected):
    """Exit 1, no traceback, the last stderr line holds every `expected`."""
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("Error: "), proc.stderr[-3000:]
    for text in expected:
        assert text in last, last
    return last


def _train(*args, **kwargs):
    return _run("train", *train_helpers.TINY_FLAGS, "--max_steps=2",
                "--noexport", *args, **kwargs)


@pytest.fixture
def config_only_dir(tmp_path):
    """A model directory with config.json and no checkpoint."""
    model_dir = str(tmp_path / "model")
    checkpoints.write_config(model_dir,
                             ExperimentConfig.for_model(make_tiny_config()))
    return model_dir


@pytest.fixture
def bad_images(tmp_path):
    """40 training images, one truncated and one text file named .png."""
    folder = train_helpers.make_image_folder(str(tmp_path / "images"))
    good = os.path.join(folder, "img_001.png")
    with open(good, "rb") as f:
        png = f.read()
    with open(good, "wb") as f:
        f.write(png[:len(png) // 2])
    with open(os.path.join(folder, "img_013.png"), "w") as f:
        f.write("not an image\n")
    return folder


# ------------------------------------------------------------------ train
def test_train_corrupt_image_is_named_before_any_step(bad_images, tmp_path):
    model_dir = tmp_path / "run"
    proc = _train(f"--data_dir={bad_images}", f"--model_dir={model_dir}")
    _assert_one_line(proc, "2 of 40 files",
                     "img_001.png (truncated or corrupt)",
                     "img_013.png (not a PNG or JPEG image)",
                     "--image_check=skip")
    assert not model_dir.exists()


@pytest.mark.slow
def test_train_skip_names_each_file_and_finishes(bad_images, tmp_path):
    proc = _train(f"--data_dir={bad_images}", f"--model_dir={tmp_path}/run",
                  "--image_check=skip")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("img_001.png", "img_013.png"):
        assert (f"WARNING: image_folder: skipped {bad_images}/{name}: it "
                "cannot be decoded") in proc.stderr
    summary = [line for line in proc.stderr.splitlines()
               if "2 image file(s) under" in line]
    assert len(summary) == 1 and "img_001.png, " in summary[0], \
        proc.stderr[-3000:]
    assert "Test NELBO" in proc.stderr


def test_train_missing_data_is_one_line(tmp_path):
    proc = _run("train", "--dataset=fashion_mnist",
                f"--data_dir={tmp_path}/nowhere", f"--model_dir={tmp_path}/r",
                "--max_steps=1")
    _assert_one_line(proc, "Fashion-MNIST not found", "--data_dir")


def test_train_unwritable_model_dir(tmp_path):
    if not os.path.isdir("/sys"):
        pytest.skip("no sysfs to refuse the write")
    folder = train_helpers.make_image_folder(str(tmp_path / "images"))
    proc = _train(f"--data_dir={folder}", f"--model_dir={UNWRITABLE_DIR}")
    _assert_one_line(proc, UNWRITABLE_DIR, "use a writable location")
    verbose = _train(f"--data_dir={folder}", f"--model_dir={UNWRITABLE_DIR}",
                     "--verbosity=1")
    assert verbose.returncode != 0
    assert "Traceback" in verbose.stderr


def test_train_full_disk_keeps_the_config(tmp_path):
    folder = train_helpers.make_image_folder(str(tmp_path / "images"))
    model_dir = tmp_path / "run"

    def limit_file_size():  # writes beyond it fail with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE,
                           (FULL_DISK_BYTES, FULL_DISK_BYTES))

    proc = _train(f"--data_dir={folder}", f"--model_dir={model_dir}",
                  preexec_fn=limit_file_size)
    last = _assert_one_line(proc, "File too large", "free some space")
    assert "{{function_node" not in last and "[Op:" not in last
    checkpoints.read_config(str(model_dir))  # intact


# --------------------------------------------------------- evaluate, export
def test_evaluate_bad_flag_value_is_one_line(config_only_dir):
    proc = _run("evaluate", f"--model_dir={config_only_dir}", "--mode=sample",
                "--num_samples=-3")
    _assert_one_line(proc, "--num_samples=-3", "not a positive integer")
    # absl's own report takes two lines (FATAL ..., Pass --helpshort ...).
    assert "FATAL" not in proc.stderr and "Pass --help" not in proc.stderr


def test_evaluate_without_checkpoint(config_only_dir):
    proc = _run("evaluate", f"--model_dir={config_only_dir}", "--mode=sample")
    _assert_one_line(proc, "No checkpoint in", "train this model first")
    verbose = _run("evaluate", f"--model_dir={config_only_dir}",
                   "--mode=sample", "--verbosity=1")
    assert verbose.returncode != 0
    assert "Traceback" in verbose.stderr
    assert "FileNotFoundError: No checkpoint in" in verbose.stderr


def test_evaluate_without_config(tmp_path):
    proc = _run("evaluate", f"--model_dir={tmp_path}", "--mode=nll")
    _assert_one_line(proc, "config.json not found",
                     "is not an nvae_tf model directory")


def test_evaluate_corrupt_checkpoint(config_only_dir):
    folder = os.path.join(config_only_dir, checkpoints.CHECKPOINT_SUBDIR)
    os.makedirs(folder)
    with open(os.path.join(folder, "checkpoint"), "w") as f:
        f.write('model_checkpoint_path: "ckpt-1"\n')
    with open(os.path.join(folder, "ckpt-1.index"), "wb") as f:
        f.write(b"\x00garbage")
    proc = _run("evaluate", f"--model_dir={config_only_dir}", "--mode=sample")
    _assert_one_line(proc, "ckpt-1 cannot be restored",
                     "Pass another --checkpoint")


def test_export_refuses_an_existing_version(config_only_dir, tmp_path):
    export_dir = tmp_path / "saved_models" / "nvae" / "1"
    export_dir.mkdir(parents=True)
    (export_dir / "saved_model.pb").write_bytes(b"kept")
    proc = _run("export", f"--model_dir={config_only_dir}",
                f"--export_dir={export_dir}")
    _assert_one_line(proc, f"{export_dir} exists", "--overwrite")
    assert (export_dir / "saved_model.pb").read_bytes() == b"kept"


def test_export_without_checkpoint(config_only_dir, tmp_path):
    proc = _run("export", f"--model_dir={config_only_dir}",
                f"--export_dir={tmp_path}/saved/1")
    _assert_one_line(proc, "No checkpoint in")
