"""Shared pieces of the trainer tests: a tiny image folder, tiny flags, runs.

The trainer runs in subprocesses (`python -m nvae_tf.train`): strategies,
logical devices and dtype policies are process-wide TensorFlow state.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
IMAGE_SIZE = 8
NUM_IMAGES = 40  # 36 training images, 4 evaluation images (every 10th)

# A 12k-parameter NVAE on 8x8 grayscale images: one latent scale of 2 groups.
TINY_FLAGS = (
    "--dataset=image_folder", f"--image_size={IMAGE_SIZE}",
    "--image_channels=1", "--num_channels_enc=4", "--num_channels_dec=4",
    "--num_latent_scales=1", "--num_groups_per_scale=2",
    "--num_latent_per_group=4", "--num_preprocess_blocks=1",
    "--num_preprocess_cells=1", "--num_postprocess_blocks=1",
    "--num_postprocess_cells=1", "--num_mixture_dec=2", "--use_se",
    "--res_dist", "--weight_decay_norm=1e-2", "--batch_size=4",
    "--warmup_epochs=0", "--epochs=2", "--learning_rate=1e-2",
    "--summary_every_steps=2", "--num_summary_images=4", "--seed=3",
    "--shuffle_buffer=100")


def make_image_folder(path: str, num_images: int = NUM_IMAGES,
                      size: int = IMAGE_SIZE, seed: int = 0) -> str:
    """Writes `num_images` random grayscale PNGs (blobs on black)."""
    from PIL import Image  # pylint: disable=import-outside-toplevel
    os.makedirs(path, exist_ok=True)
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(np.arange(size), np.arange(size)), -1)
    for i in range(num_images):
        centre = rng.uniform(1, size - 1, size=2)
        radius = rng.uniform(1.5, size / 2)
        inside = np.linalg.norm(grid - centre, axis=-1) < radius
        pixels = np.where(inside, rng.integers(128, 256), 0).astype(np.uint8)
        Image.fromarray(pixels, mode="L").save(
            os.path.join(path, f"img_{i:03d}.png"))
    return path


def train_command(*flags: str) -> list[str]:
    return [sys.executable, "-m", "nvae_tf.train", *flags]


def subprocess_env(**extra) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env.update(extra)
    return env


def run_train(*flags: str, timeout: float = 600, check: bool = True,
              env: dict | None = None) -> subprocess.CompletedProcess:
    """Runs the trainer to completion; on failure shows its log."""
    proc = subprocess.run(train_command(*flags), cwd=REPO,
                          env=env or subprocess_env(), capture_output=True,
                          text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"trainer exited with {proc.returncode}:\n{proc.stderr[-6000:]}")
    return proc


def checkpoint_values(path: str, prefix: str = "model/") -> dict:
    """{name: array} of a checkpoint's variables under `prefix` (model
    weights by default; "" for everything: optimizer, counters, ...)."""
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    reader = tf.train.load_checkpoint(path)
    return {name: reader.get_tensor(name)
            for name in reader.get_variable_to_shape_map()
            if name.startswith(prefix)
            and name != "_CHECKPOINTABLE_OBJECT_GRAPH"}


def latest_checkpoint(model_dir: str) -> str | None:
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    return tf.train.latest_checkpoint(os.path.join(model_dir, "checkpoints"))


def checkpoint_step(path: str) -> int:
    return int(re.search(r"ckpt-(\d+)$", path).group(1))


def final_nelbo(log: str) -> float:
    """The final test NELBO (nats) printed by the trainer."""
    match = re.findall(r"Test NELBO ([0-9.]+) nats", log)
    assert match, f"no final 'Test NELBO' line in the log:\n{log[-3000:]}"
    return float(match[-1])


def free_ports(count):
    """`count` TCP ports on 127.0.0.1 that were free a moment ago (for the
    workers of a local multi-worker cluster)."""
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports
