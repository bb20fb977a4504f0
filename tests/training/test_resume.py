"""Exact resume: kill -9 in the middle of a run, rerun the same command, and
finish with the weights of an uninterrupted run with the same seed."""

import json
import os
import signal
import subprocess
import time

import numpy as np
import pytest

from tests.training import helpers as train_helpers

MAX_STEPS = 60  # 6.7 passes over the 36 training images in batches of 4
KILL_AFTER_CHECKPOINT = 8
TIMEOUT = 600


def _flags(data, model_dir):
    return (*train_helpers.TINY_FLAGS, f"--data_dir={data}",
            f"--model_dir={model_dir}", f"--max_steps={MAX_STEPS}",
            "--steps_per_epoch=7", "--checkpoint_every_steps=4",
            "--summary_every_steps=10", "--export=false")


def _kill_after_checkpoint(flags, model_dir):
    """Starts the trainer and SIGKILLs it once a checkpoint past step 8 is
    listed; returns the latest checkpoint step at the kill."""
    proc = subprocess.Popen(train_helpers.train_command(*flags),
                            cwd=train_helpers.REPO,
                            env=train_helpers.subprocess_env(),
                            stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + TIMEOUT
    try:
        while time.time() < deadline and proc.poll() is None:
            latest = train_helpers.latest_checkpoint(model_dir)
            if latest and train_helpers.checkpoint_step(latest) >= \
                    KILL_AFTER_CHECKPOINT:
                os.kill(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.02)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL, (
        f"the run was not killed mid-way (exit {proc.returncode}):\n"
        f"{proc.stderr.read()[-3000:]}")
    return train_helpers.checkpoint_step(
        train_helpers.latest_checkpoint(model_dir))


@pytest.mark.slow
def test_kill_and_rerun_reproduces_the_uninterrupted_run(tmp_path):
    data = train_helpers.make_image_folder(str(tmp_path / "images"))
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    train_helpers.run_train(*_flags(data, straight), timeout=TIMEOUT)

    killed_at = _kill_after_checkpoint(_flags(data, resumed), resumed)
    assert KILL_AFTER_CHECKPOINT <= killed_at < MAX_STEPS
    log = train_helpers.run_train(*_flags(data, resumed),
                                  timeout=TIMEOUT).stderr
    assert f"at step {killed_at} " in log

    expected = train_helpers.checkpoint_values(
        train_helpers.latest_checkpoint(straight), prefix="")
    actual = train_helpers.checkpoint_values(
        train_helpers.latest_checkpoint(resumed), prefix="")
    assert expected.keys() == actual.keys()
    assert actual["step/.ATTRIBUTES/VARIABLE_VALUE"] == MAX_STEPS
    for name, value in expected.items():  # model, optimizer slots, counters
        np.testing.assert_array_equal(actual[name], value, err_msg=name)
    last_eval = [json.loads(open(os.path.join(d, "eval_history.jsonl"))
                            .readlines()[-1]) for d in (straight, resumed)]
    assert last_eval[0]["step"] == last_eval[1]["step"] == MAX_STEPS
    assert last_eval[0]["nelbo"] == last_eval[1]["nelbo"]
