"""saved_models/fashion_mnist/1, the trained model the repository ships,
used as a TF Serving client or a Python user without nvae_tf would use it.

The figures it is checked against are the model card's
(docs/model_card/figures.json, written with the card).
"""

import json
import os
import subprocess
import sys

import pytest

from nvae_tf import data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED_MODEL = os.path.join(ROOT, "saved_models", "fashion_mnist", "1")
CARD_FIGURES = os.path.join(ROOT, "docs", "model_card", "figures.json")
SIGNATURES = ["decode", "encode", "log_likelihood", "log_weights",
              "reconstruct", "sample", "serving_default"]
RELATIVE_TOLERANCE = 0.01  # the card's log-likelihood figure, within 1%
TIMEOUT = 600

# Run by a fresh interpreter (-I, no PYTHONPATH, cwd outside the repo) that
# must not find nvae_tf: only TensorFlow and NumPy.
CLIENT_SCRIPT = r'''
import gzip, json, sys
import numpy as np
try:
    import nvae_tf  # noqa: F401
    importable = True
except ImportError:
    importable = False
import tensorflow as tf

model_dir, test_images, num_images, batch = sys.argv[1:5]
num_images, batch = int(num_images), int(batch)
with gzip.open(test_images) as f:  # IDX: 16-byte header, then 28x28 uint8
    images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(
        -1, 28, 28, 1)[:num_images]
model = tf.saved_model.load(model_dir)
log_likelihood = model.signatures["log_likelihood"]
nelbo, bpd = [], []
for start in range(0, num_images, batch):
    out = log_likelihood(images=tf.constant(images[start:start + batch]))
    nelbo.append(out["nelbo_nats"].numpy())
    bpd.append(out["bits_per_dim"].numpy())
sample = model.signatures["sample"]
def draw(seed):
    return sample(num_samples=tf.constant(4), temperature=tf.constant(0.7),
                  seed=tf.constant(seed, tf.int64))["images"].numpy()
first, again, other = draw(5), draw(5), draw(6)
print(json.dumps({
    "nvae_tf_importable": importable,
    "signatures": sorted(model.signatures),
    "nelbo_nats_mean": float(np.concatenate(nelbo).astype(np.float64).mean()),
    "bits_per_dim_mean": float(np.concatenate(bpd).astype(np.float64).mean()),
    "sample_shape": list(first.shape), "sample_dtype": first.dtype.name,
    "same_seed_identical": bool(np.array_equal(first, again)),
    "other_seed_differs": bool(not np.array_equal(first, other)),
}))
'''


@pytest.fixture(scope="module")
def client_result(tmp_path_factory):
    with open(CARD_FIGURES) as f:
        card = json.load(f)["log_likelihood_signature"]
    work = tmp_path_factory.mktemp("client")
    script = work / "client.py"
    script.write_text(CLIENT_SCRIPT)
    test_images = os.path.join(data.FASHION_MNIST_DIR,
                               data.FASHION_MNIST_EVAL_FILE)
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    process = subprocess.run(
        [sys.executable, "-I", str(script), SHIPPED_MODEL, test_images,
         str(card["num_images"]), str(card["batch_size"])],
        cwd=str(work), env=env, capture_output=True, text=True,
        timeout=TIMEOUT)
    assert process.returncode == 0, process.stderr[-3000:]
    return card, json.loads(process.stdout.strip().splitlines()[-1])


def test_shipped_model_loads_without_nvae_tf_with_every_signature(
        client_result):
    _, result = client_result
    assert not result["nvae_tf_importable"]
    assert result["signatures"] == SIGNATURES


def test_log_likelihood_of_the_fixed_test_images_matches_the_model_card(
        client_result):
    card, result = client_result
    assert result["nelbo_nats_mean"] == pytest.approx(
        card["nelbo_nats_mean"], rel=RELATIVE_TOLERANCE)
    assert result["bits_per_dim_mean"] == pytest.approx(
        card["bits_per_dim_mean"], rel=RELATIVE_TOLERANCE)


def test_seeded_samples_are_deterministic(client_result):
    _, result = client_result
    assert result["sample_shape"] == [4, 28, 28, 1]
    assert result["sample_dtype"] == "uint8"
    assert result["same_seed_identical"] and result["other_seed_differs"]


def _sampling_snippet(readme):
    """The ```python block of `readme` that loads the shipped model."""
    with open(os.path.join(ROOT, readme)) as f:
        blocks = f.read().split("```python\n")[1:]
    snippets = [b.split("```")[0] for b in blocks
                if "saved_models/fashion_mnist/1" in b]
    assert len(snippets) == 1, f"{readme}: {len(snippets)} sampling blocks"
    return snippets[0]


def test_readme_sampling_lines_run_without_nvae_tf(tmp_path):
    snippet = _sampling_snippet("README.md")
    assert snippet == _sampling_snippet(os.path.join("saved_models",
                                                     "README.md"))
    assert len(snippet.strip().splitlines()) == 3
    script = tmp_path / "readme_sample.py"
    script.write_text(
        snippet + "print(images.shape.as_list(), images.dtype.name)\n")
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    # cwd is the repository (the snippet's relative path), -I keeps it off
    # sys.path, so nvae_tf is not importable.
    process = subprocess.run(
        [sys.executable, "-I", str(script)], cwd=ROOT, env=env,
        capture_output=True, text=True, timeout=TIMEOUT)
    assert process.returncode == 0, process.stderr[-3000:]
    assert process.stdout.strip().splitlines()[-1] == "[16, 28, 28, 1] uint8"
