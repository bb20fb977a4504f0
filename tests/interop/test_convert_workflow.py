"""A converted official checkpoint trains further, evaluates and exports.

The converted `tiny_binary` model (dataset mnist) trains for a few steps with
`nvae_tf.train` from its converted weights (MNIST through TFDS mock data:
no network here), then `nvae_tf.evaluate` and `nvae_tf.export` read the
same model directory.
"""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from tests.test_official_fixtures import FIXTURE_DIR

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
BINARY = os.path.join(FIXTURE_DIR, "tiny_binary.pt")

SCRIPT = textwrap.dedent("""
    import json, sys
    import tensorflow_datasets as tfds
    from absl import flags
    from nvae_tf.training import checkpoints
    from nvae_tf.training import flags as nvae_flags
    from nvae_tf.training import main as train

    model_dir = sys.argv[1]
    config = checkpoints.read_config(model_dir).model
    args = ["prog", f"--model_dir={model_dir}", "--batch_size=4",
            "--max_steps=3", "--steps_per_epoch=3", "--epochs=1",
            "--warmup_epochs=0", "--noexport", "--summary_every_steps=1"]
    for name, value in config.to_dict().items():
        if name in ("image_size", "image_channels", "binary", "channel_mult"):
            continue
        if isinstance(value, bool):
            args.append(f"--{name}" if value else f"--no{name}")
        else:
            args.append(f"--{name}={value}")
    values = flags.FlagValues()
    nvae_flags.define_flags(values)
    values(args)
    experiment = nvae_flags.from_flags(values)
    strategy = train.make_strategy(experiment.runtime)
    with tfds.testing.mock_data(num_examples=16):
        result = train.run(experiment, strategy)
    print("RESULT", json.dumps({"step": result["step"],
                                "nelbo": result["nelbo"]}))
""")


def _run(command):
    process = subprocess.run(command, cwd=ROOT, capture_output=True,
                             text=True, timeout=900,
                             env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert process.returncode == 0, process.stderr[-3000:]
    return process.stdout


@pytest.mark.slow
def test_converted_model_trains_further_evaluates_and_exports(tmp_path):
    if not os.path.exists(BINARY):
        pytest.skip(f"{BINARY} not found")
    from nvae_tf.training import checkpoints
    model_dir = str(tmp_path / "converted")
    _run([sys.executable, "-m", "nvae_tf.convert", f"--checkpoint={BINARY}",
          f"--model_dir={model_dir}"])
    before = [v.numpy() for v in
              checkpoints.load_model_dir(model_dir).trainable_variables]

    out = _run([sys.executable, "-c", SCRIPT, model_dir])
    result = json.loads(out.split("RESULT ", 1)[1].splitlines()[0])
    assert result["step"] == 3 and np.isfinite(result["nelbo"])
    after = checkpoints.load_model_dir(model_dir)
    changed = [not np.array_equal(a, b.numpy())
               for a, b in zip(before, after.trainable_variables)]
    assert all(changed), "training from the converted weights moved them all"

    report = _run([sys.executable, "-m", "nvae_tf.evaluate",
                   f"--model_dir={model_dir}", "--mode=sample",
                   "--num_samples=4", f"--output={tmp_path}/grid.png"])
    assert json.loads(report.strip().splitlines()[-1])
    assert os.path.getsize(tmp_path / "grid.png") > 0
    export_dir = tmp_path / "saved_models" / "tiny_binary" / "1"
    _run([sys.executable, "-m", "nvae_tf.export", f"--model_dir={model_dir}",
          f"--export_dir={export_dir}"])
    assert (export_dir / "saved_model.pb").exists()
