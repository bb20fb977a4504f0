"""tf.distribute: 2 replicas (logical CPUs) match 1 device at the same global
batch; 2 worker processes (TF_CONFIG on 127.0.0.1) end with identical
weights.

KL balancing coefficients are computed per replica from its own batch, as the
official code does per GPU, so these runs use `--kl_const_coeff=1` (beta = 1
from the start: no balancing) to compare like with like.
"""

import json
import os
import re
import subprocess
import time

import numpy as np
import pytest

from tests.training import helpers as train_helpers

TIMEOUT = 600
# Adamax divides by max(beta_2 u, |g| + 1e-3): float reassociation (the
# cross-replica sums, one-pass synchronized BN moments) moves weights by
# ~1e-6 per step.
WEIGHT_ATOL = 1e-4


def _flags(data, model_dir, *extra):
    return (*train_helpers.TINY_FLAGS, f"--data_dir={data}",
            f"--model_dir={model_dir}", "--max_steps=3",
            "--kl_const_coeff=1", "--export=false", "--summary_every_steps=3",
            *extra)


def _compare(reference, other):
    ref = train_helpers.checkpoint_values(
        train_helpers.latest_checkpoint(reference))
    got = train_helpers.checkpoint_values(
        train_helpers.latest_checkpoint(other))
    assert ref.keys() == got.keys()
    worst = max(float(np.max(np.abs(ref[k].astype(np.float64) - got[k])))
                for k in ref)
    for name, value in ref.items():
        np.testing.assert_allclose(got[name], value, atol=WEIGHT_ATOL,
                                   err_msg=name)
    return worst


@pytest.mark.slow
def test_two_logical_cpus_match_one_device(tmp_path):
    data = train_helpers.make_image_folder(str(tmp_path / "images"))
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    train_helpers.run_train(*_flags(data, one, "--strategy=one_device"),
                            timeout=TIMEOUT)
    log = train_helpers.run_train(*_flags(
        data, two, "--strategy=mirrored", "--num_cpu_devices=2"),
        timeout=TIMEOUT).stderr
    assert "MirroredStrategy with 2 replica(s)" in log
    # Same initial weights, then the same three updates.
    start = [train_helpers.checkpoint_values(
        os.path.join(d, "checkpoints", "ckpt-0")) for d in (one, two)]
    for name, value in start[0].items():
        np.testing.assert_array_equal(start[1][name], value)
    _compare(one, two)


@pytest.mark.slow
def test_two_workers_end_with_identical_weights(tmp_path):
    data = train_helpers.make_image_folder(str(tmp_path / "images"))
    model_dir = str(tmp_path / "multi")
    workers = [f"127.0.0.1:{port}" for port in train_helpers.free_ports(2)]
    procs = []
    for index in range(2):
        tf_config = {"cluster": {"worker": workers},
                     "task": {"type": "worker", "index": index}}
        procs.append(subprocess.Popen(
            train_helpers.train_command(*_flags(
                data, model_dir, "--strategy=multi_worker")),
            cwd=train_helpers.REPO, text=True, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=train_helpers.subprocess_env(TF_CONFIG=json.dumps(tf_config))))
    deadline = time.time() + TIMEOUT
    logs = []
    try:
        for proc in procs:
            _, err = proc.communicate(timeout=max(1, deadline - time.time()))
            logs.append(err)
    finally:
        for proc in procs:  # a hung collective never returns: kill
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for proc, log in zip(procs, logs):
        assert proc.returncode == 0, log[-5000:]
    fingerprints = [re.findall(r"Final weights fingerprint (\w+) at step 3",
                               log) for log in logs]
    assert fingerprints[0] and fingerprints[0] == fingerprints[1]
    assert "with 2 replica(s)" in logs[0]
    # The chief wrote the checkpoints; the other worker cleaned up its own.
    assert train_helpers.checkpoint_step(
        train_helpers.latest_checkpoint(model_dir)) == 3
    scratch = os.path.join(model_dir, ".workers")
    assert not os.path.exists(scratch) or not os.listdir(scratch)
    # Both workers' final evaluations agree (the test split is shared).
    nelbos = [train_helpers.final_nelbo(log) for log in logs]
    assert nelbos[0] == nelbos[1]
    # And the run matches one device at the same global batch.
    one = str(tmp_path / "one")
    train_helpers.run_train(*_flags(data, one, "--strategy=one_device"),
                            timeout=TIMEOUT)
    _compare(one, model_dir)
