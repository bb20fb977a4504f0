"""nvae_tf/serving/curve.py: the training curve PNG of a run."""

import json
import os
import subprocess
import sys

import numpy as np
from PIL import Image

from nvae_tf.serving import curve
from nvae_tf.training import log

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
NATS_PER_BPD = 28 * 28 * np.log(2.0)
BLUE = np.array([0x1F, 0x77, 0xB4])  # matplotlib's tab:blue (validation)
ORANGE = np.array([0xFF, 0x7F, 0x0E])  # tab:orange (test)


def _record(step, split, bpd, epoch):
    return {"step": step, "epoch": epoch, "split": split,
            "nelbo": bpd * NATS_PER_BPD, "recon": 0.0, "kl": 0.0,
            "bpd": bpd, "num_images": 6000, "seconds": 1.0}


def _write_history(model_dir, records):
    os.makedirs(model_dir, exist_ok=True)
    with open(os.path.join(model_dir, log.EVAL_HISTORY_FILE), "w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")


def _count(pixels, colour):
    return int(np.all(np.abs(pixels[..., :3].astype(int) - colour) < 8,
                      axis=-1).sum())


def test_history_keeps_the_last_record_of_a_repeated_evaluation(tmp_path):
    _write_history(tmp_path, [
        _record(100, "validation", 4.0, 1.0),
        _record(200, "validation", 3.8, 2.0),
        _record(200, "validation", 3.7, 2.0),  # repeated after a resume
        _record(200, "test", 3.75, 2.0)])
    history = log.read_eval_history(str(tmp_path))
    assert [(r["step"], r["split"], r["bpd"]) for r in history] == [
        (100, "validation", 4.0), (200, "test", 3.75),
        (200, "validation", 3.7)]
    assert log.read_eval_history(str(tmp_path / "absent")) == []


def test_curve_draws_one_line_per_split(tmp_path):
    validation = [_record(100 * e, "validation", 4.0 - 0.1 * e, float(e))
                  for e in range(1, 6)]
    path = curve.plot_curve(validation, str(tmp_path / "a" / "curve.png"))
    pixels = np.asarray(Image.open(path))
    width, height = (int(v * curve.FIGURE_DPI) for v in curve.FIGURE_INCHES)
    assert pixels.shape[:2] == (height, width)
    assert _count(pixels, BLUE) > 200 and _count(pixels, ORANGE) == 0
    both = validation + [_record(500, "test", 3.55, 5.0)]
    pixels = np.asarray(Image.open(curve.plot_curve(
        both, str(tmp_path / "b.png"), title="run")))
    assert _count(pixels, ORANGE) > 20


def test_cli_writes_the_curve_and_refuses_a_run_without_evaluations(tmp_path):
    def run(*args):
        return subprocess.run(
            [sys.executable, "-m", "nvae_tf.serving.curve", *args],
            capture_output=True, text=True, cwd=ROOT, timeout=120)

    _write_history(tmp_path / "run", [_record(100, "validation", 4.0, 1.0),
                                      _record(200, "validation", 3.9, 2.0)])
    done = run(f"--model_dir={tmp_path / 'run'}")
    assert done.returncode == 0, done.stderr
    assert os.path.exists(tmp_path / "run" / "eval" / "curve.png")
    os.makedirs(tmp_path / "empty")
    refused = run(f"--model_dir={tmp_path / 'empty'}")
    assert refused.returncode == 1
    assert "holds no evaluation" in refused.stderr.strip().splitlines()[-1]
    assert "Traceback" not in refused.stderr
