"""`pip install .` and `pip install -e .` in fresh virtual environments.

The environments see the system's site-packages, so TensorFlow is not
downloaded again; `pip check` verifies that the installed packages satisfy
nvae_tf's dependencies. Everything runs from temporary directories with no
PYTHONPATH, so nothing is imported from the checkout by accident.
"""

import os
import re
import shutil
import subprocess
import sys

import pytest

from tests.training import helpers as train_helpers

SCRIPTS = ("nvae-train", "nvae-evaluate", "nvae-export", "nvae-convert",
           "nvae-tune")
# Left behind by local builds or runs; not part of the package's source.
_NOT_SOURCE = (".git", "__pycache__", "build", "*.egg-info", "runs",
               ".benchmarks", ".pytest_cache")

pytestmark = pytest.mark.slow


def _env():
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return env


def _run(argv, cwd, timeout=300):
    proc = subprocess.run(argv, cwd=cwd, env=_env(), capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, (argv, proc.stdout[-3000:],
                                  proc.stderr[-3000:])
    return proc


def _source_copy(path):
    """A copy of the checkout (a build writes build/ and *.egg-info)."""
    shutil.copytree(train_helpers.REPO, path, symlinks=True,
                    ignore=shutil.ignore_patterns(*_NOT_SOURCE))
    return str(path)


def _venv(path, tmp_path, *install):
    """A virtual environment at `path` with nvae_tf installed by
    `pip install --no-build-isolation --no-deps *install`."""
    _run([sys.executable, "-m", "venv", "--system-site-packages", str(path)],
         tmp_path)
    bin_dir = path / "bin"
    _run([str(bin_dir / "python"), "-m", "pip", "install", "-q",
          "--no-build-isolation", "--no-deps", "--no-input", *install],
         tmp_path)
    check = _run([str(bin_dir / "python"), "-m", "pip", "check"], tmp_path)
    assert "No broken requirements found" in check.stdout
    return bin_dir


def test_installed_package_trains_the_quickstart_by_name(tmp_path):
    bin_dir = _venv(tmp_path / "venv", tmp_path,
                    _source_copy(tmp_path / "src"))
    for script in SCRIPTS:
        assert (bin_dir / script).exists(), script
    work = tmp_path / "elsewhere"
    work.mkdir()
    where = _run([str(bin_dir / "python"), "-c",
                  "import nvae_tf, tuning.search; print(nvae_tf.__file__)"],
                 work)
    assert "site-packages" in where.stdout, where.stdout
    proc = _run([str(bin_dir / "nvae-train"), "--flagfile=quickstart",
                 "--max_steps=2", f"--model_dir={work / 'run'}",
                 "--noexport"], work, timeout=600)
    log = proc.stdout + proc.stderr
    assert re.search(r"Test NELBO [0-9.]+ nats, [0-9.]+ bits/dim "
                     r"\(fashion_mnist test split, 10000 images, .*step 2\)",
                     log), log[-3000:]
    assert (work / "run" / "checkpoints" / "ckpt-2.index").exists()
    # absl's --help exits with status 1 after printing the flags.
    help_text = subprocess.run(
        [str(bin_dir / "nvae-tune"), "--help"], cwd=work, env=_env(),
        capture_output=True, text=True, timeout=120).stdout
    assert "--max_trials" in help_text and "--num_latent_scales" in help_text


def test_editable_install_imports_the_checkout(tmp_path):
    source = _source_copy(tmp_path / "src")
    bin_dir = _venv(tmp_path / "venv", tmp_path, "-e", source)
    work = tmp_path / "elsewhere"
    work.mkdir()
    proc = _run([str(bin_dir / "python"), "-c",
                 "import nvae_tf, tuning.space; from nvae_tf import flagfiles;"
                 "print(nvae_tf.__file__); print(tuning.space.__file__); "
                 "print(flagfiles.resolve('quickstart'))"], work)
    assert proc.stdout.split() == [
        os.path.join(source, "nvae_tf", "__init__.py"),
        os.path.join(source, "tuning", "space.py"),
        os.path.join(source, "nvae_tf", "configs", "quickstart.cfg")]
