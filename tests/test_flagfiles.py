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

PRESETS = ["celeba64", "celebahq256", "cifar10", "fashion_mnist", "ffhq256",
           "imagenet32", "mnist", "quickstart"]
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


def _headings(text):
    """The unindented heading lines of a --help listing."""
    return [line[:-1] for line in text.splitlines()
            if line.endswith(":") and not line.startswith(" ")]


def test_cli_help_groups_the_flags_by_config_section(tmp_path):
    proc = _run_train(tmp_path, "--help")
    assert proc.returncode == 1, proc.stderr
    lines = proc.stdout.splitlines()
    headings = _headings(proc.stdout)
    assert headings[1:] == list(nvae_flags.HELP_GROUPS)  # after "flags"
    assert [h.split(" ")[0] for h in headings[1:]] == [
        "model", "data", "objective", "train", "runtime"]
    # A representative flag of each group sits under its heading.
    group_of = {}
    heading = None
    for line in lines:
        if line[:-1] in headings:
            heading = line[:-1].split(" ")[0]
        match = re.match(r"^  (?:-\?,)?--(?:\[no\])?(\w+)", line)
        if match:
            assert match.group(1) not in group_of, match.group(1)
            group_of[match.group(1)] = heading
    assert {name: group_of[name] for name in (
        "num_latent_scales", "batch_size", "kl_anneal_portion",
        "learning_rate", "strategy", "model_dir")} == {
            "num_latent_scales": "model", "batch_size": "data",
            "kl_anneal_portion": "objective", "learning_rate": "train",
            "strategy": "runtime", "model_dir": "runtime"}
    fv = flags.FlagValues()
    nvae_flags.define_flags(fv)
    assert sorted(group_of) == sorted(fv)  # every trainer flag, once
    assert lines[-1] == "Try --helpfull to get a list of all flags."
    assert _run_train(tmp_path, "--helpshort").stdout == proc.stdout


def test_cli_helpfull_still_lists_every_module(tmp_path):
    proc = _run_train(tmp_path, "--helpfull")
    assert proc.returncode == 1, proc.stderr
    headings = _headings(proc.stdout)
    assert {"absl.app", "absl.logging", "nvae_tf.training.flags",
            "absl.flags"} <= set(headings)
    assert not set(nvae_flags.HELP_GROUPS) & set(headings)
    assert re.search(r"^  -\?,--\[no\]help: show this help$", proc.stdout,
                     re.M)
    assert "--flagfile" in proc.stdout


def test_flags_help_lists_the_groups_in_order():
    fv = flags.FlagValues()
    nvae_flags.define_flags(fv)
    text = flagfiles.flags_help(nvae_flags.HELP_GROUPS[::-1], fv)
    assert _headings(text) == list(nvae_flags.HELP_GROUPS[::-1])
    assert text.index("  --strategy:") < text.index("  --num_nf:")
