"""Packaged flagfiles: `--flagfile=NAME` from any directory."""

import os
import re
import subprocess
import sys

import pytest
from absl import flags

from nvae_tf import flagfiles
from nvae_tf.training import flags as nvae_flags
from tests.training import helpers as train_helpers

PRESETS = ["celeba64", "celebahq256", "cifar10", "ffhq256", "imagenet32",
           "mnist", "quickstart"]
QUICKSTART = os.path.join(flagfiles.FLAGFILE_DIR, "quickstart.cfg")


def test_available_lists_the_packaged_presets():
    assert flagfiles.available() == PRESETS
    # The repository's configs/ is the same folder.
    assert os.path.samefile(os.path.join(train_helpers.REPO, "configs"),
                            flagfiles.FLAGFILE_DIR)


@pytest.mark.parametrize("value", ["quickstart", "quickstart.cfg",
                                   "configs/quickstart.cfg"])
def test_preset_names_resolve_outside_the_repository(value, tmp_path,
                                                     monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert flagfiles.resolve(value) == QUICKSTART
    assert flagfiles.resolve_flagfile_args(
        ["prog", f"--flagfile={value}", "--epochs=1"]) == [
            "prog", f"--flagfile={QUICKSTART}", "--epochs=1"]
    assert flagfiles.resolve_flagfile_args(
        ["prog", "--flagfile", value]) == ["prog", "--flagfile", QUICKSTART]


def test_a_file_in_the_working_directory_wins(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "quickstart").write_text("--epochs=7\n")
    os.mkdir(tmp_path / "configs")
    (tmp_path / "configs" / "mnist.cfg").write_text("--epochs=8\n")
    assert flagfiles.resolve("quickstart") == "quickstart"
    assert flagfiles.resolve("configs/mnist.cfg") == "configs/mnist.cfg"
    assert flagfiles.resolve("quickstart.cfg") == QUICKSTART


def test_other_arguments_are_left_alone(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = ["prog", "--epochs=2", "--flagfile_x=quickstart", "--",
            "--flagfile=nosuch"]
    assert flagfiles.resolve_flagfile_args(argv) == argv


@pytest.mark.parametrize("value", ["nosuch", "nosuch.cfg", "other/mnist.cfg",
                                   "configs/nosuch.cfg", ""])
def test_unknown_flagfile_names_the_available_ones(value, tmp_path,
                                                   monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(flagfiles.FlagfileError) as err:
        flagfiles.resolve_flagfile_args(["prog", f"--flagfile={value}"])
    message = str(err.value)
    assert message.startswith(f"--flagfile={value}: no such file")
    assert message.endswith(": " + ", ".join(PRESETS) + ".")
    assert "\n" not in message


def test_absl_reads_the_resolved_preset(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    values = flags.FlagValues()
    nvae_flags.define_flags(values)
    values(flagfiles.resolve_flagfile_args(
        ["prog", "--flagfile=quickstart", "--epochs=5"]))
    assert values.dataset == "fashion_mnist"
    assert values.num_latent_scales == 2 and values.batch_size == 64
    assert values.epochs == 5  # later flags override the preset


def _run_train(tmp_path, *argv):
    return subprocess.run(
        [sys.executable, "-m", "nvae_tf.train", *argv], cwd=tmp_path,
        env=train_helpers.subprocess_env(), capture_output=True, text=True,
        timeout=180)


def test_cli_reads_a_preset_by_name_from_another_directory(tmp_path):
    # quickstart.cfg sets --epochs=3, so --warmup_epochs=3 is refused: the
    # error proves the preset was read, and nothing trains.
    proc = _run_train(tmp_path, "--flagfile=quickstart",
                      f"--model_dir={tmp_path / 'run'}", "--warmup_epochs=3")
    assert proc.returncode != 0
    assert "--warmup_epochs: 3 is invalid" in proc.stderr
    assert not (tmp_path / "run").exists()


def test_cli_unknown_flagfile_is_a_one_line_error(tmp_path):
    proc = _run_train(tmp_path, "--flagfile=quickstrat")
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last == ("train.py: error: --flagfile=quickstrat: no such file, "
                    "nor a packaged flagfile; give a path or one of: " +
                    ", ".join(PRESETS) + ".")
    assert "Traceback" not in proc.stderr


def test_cli_help_lists_the_trainer_flags(tmp_path):
    # absl's --help prints the main module's flags and exits with status 1.
    proc = _run_train(tmp_path, "--help")
    listed = set(re.findall(r"^  --(?:\[no\])?(\w+)", proc.stdout, re.M))
    assert {"num_latent_scales", "batch_size", "max_steps",
            "model_dir"} <= listed
    assert len(listed) > 50
