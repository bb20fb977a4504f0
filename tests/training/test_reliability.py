"""No command loses a run: signals, kill -9, a second trainer, damaged
checkpoints, interrupted saves and a full disk.

The end-to-end tests compare against one uninterrupted run (`reference`);
checkpoint cadence differs between runs, which does not change the weights.
"""

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from nvae_tf import cli
from nvae_tf.training import checkpoints
from nvae_tf.training import lock as lock_lib
from tests.training import helpers as train_helpers

MAX_STEPS = 40  # 5.7 passes over the 36 training images in batches of 4
TIMEOUT = 600
# Resumed and uninterrupted runs: the same float operations in the same order.
WEIGHT_ATOL = 1e-5


def _flags(data, model_dir, *extra):
    return (*train_helpers.TINY_FLAGS, f"--data_dir={data}",
            f"--model_dir={model_dir}", f"--max_steps={MAX_STEPS}",
            "--steps_per_epoch=7", "--summary_every_steps=10",
            "--export=false", *extra)


def _start(flags, log_path, env=None):
    """The trainer in the background, its stderr in `log_path`."""
    with open(log_path, "a", encoding="utf-8") as log:
        return subprocess.Popen(
            train_helpers.train_command(*flags), cwd=train_helpers.REPO,
            env=env or train_helpers.subprocess_env(),
            stdout=subprocess.DEVNULL, stderr=log, text=True)


def _read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def _wait_until(condition, procs, what, timeout=TIMEOUT, poll=0.02):
    deadline = time.time() + timeout
    while not condition():
        if any(p.poll() is not None for p in procs):
            return False
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(poll)
    return True


def _finish(procs, timeout=TIMEOUT):
    """Waits for `procs`; kills any still running (a hung collective)."""
    deadline = time.time() + timeout
    try:
        for proc in procs:
            proc.wait(timeout=max(1, deadline - time.time()))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return [proc.returncode for proc in procs]


def _max_abs_diff(dir_a, dir_b):
    """Max |a - b| over every variable (model, optimizer, counters) of the
    two directories' latest checkpoints."""
    a = train_helpers.checkpoint_values(
        train_helpers.latest_checkpoint(dir_a), prefix="")
    b = train_helpers.checkpoint_values(
        train_helpers.latest_checkpoint(dir_b), prefix="")
    a.pop("save_counter/.ATTRIBUTES/VARIABLE_VALUE", None)
    b.pop("save_counter/.ATTRIBUTES/VARIABLE_VALUE", None)
    assert a.keys() == b.keys()
    assert b["step/.ATTRIBUTES/VARIABLE_VALUE"] == MAX_STEPS
    return max(float(np.max(np.abs(a[k].astype(np.float64) - b[k])))
               for k in a)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return train_helpers.make_image_folder(
        str(tmp_path_factory.mktemp("reliable") / "images"))


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """An uninterrupted run with a checkpoint every 4 steps (all kept)."""
    model_dir = str(tmp_path_factory.mktemp("reference") / "run")
    train_helpers.run_train(*_flags(data, model_dir,
                                    "--checkpoint_every_steps=4",
                                    "--keep_checkpoints=20"),
                            timeout=TIMEOUT)
    return model_dir


# ------------------------------------------------------------------ lock
def test_second_lock_is_refused_naming_the_holder(tmp_path):
    with lock_lib.ModelDirLock(str(tmp_path)):
        holder = json.loads((tmp_path / ".lock").read_text())
        assert holder["pid"] == os.getpid()
        with pytest.raises(lock_lib.ModelDirLocked,
                           match=rf"pid {os.getpid()}, started 20\d\d-"):
            lock_lib.ModelDirLock(str(tmp_path)).acquire()
    with lock_lib.ModelDirLock(str(tmp_path)):  # released: free again
        pass


def test_lock_of_a_killed_process_does_not_block(tmp_path):
    code = ("import os, signal, sys; sys.path.insert(0, sys.argv[2]); "
            "from nvae_tf.training import lock; "
            "lock.ModelDirLock(sys.argv[1]).acquire(); "
            "os.kill(os.getpid(), signal.SIGKILL)")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path),
                           train_helpers.REPO], timeout=120, check=False)
    assert proc.returncode == -signal.SIGKILL
    stale = json.loads((tmp_path / ".lock").read_text())
    assert stale["pid"] != os.getpid()  # the killed process's record
    with lock_lib.ModelDirLock(str(tmp_path)):
        assert json.loads((tmp_path / ".lock").read_text())["pid"] == \
            os.getpid()


def test_trainer_refuses_a_model_dir_in_use(tmp_path, data):
    model_dir = str(tmp_path / "run")
    with lock_lib.ModelDirLock(model_dir):
        proc = train_helpers.run_train(*_flags(data, model_dir),
                                       check=False, timeout=TIMEOUT)
    assert proc.returncode == cli.EXIT_USER_ERROR, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"Error: --model_dir={model_dir} is in use by "
                           "another trainer (host "), last
    assert f"pid {os.getpid()}, started " in last
    assert not os.path.exists(os.path.join(model_dir, "checkpoints"))


# ---------------------------------------------------- damaged checkpoints
def _truncate(path):
    data_file = path + ".data-00000-of-00001"
    with open(data_file, "r+b") as f:
        f.truncate(os.path.getsize(data_file) // 2)


@pytest.fixture
def two_model_checkpoints(tmp_path):
    from nvae_tf.config import NVAEConfig  # pylint: disable=import-outside-toplevel
    from nvae_tf.model import NVAE  # pylint: disable=import-outside-toplevel
    config = NVAEConfig(dataset="mnist", image_size=8, num_channels_enc=4,
                        num_channels_dec=4, num_latent_scales=1,
                        num_groups_per_scale=2, num_latent_per_group=2,
                        num_preprocess_blocks=1, num_postprocess_blocks=1,
                        num_preprocess_cells=1, num_postprocess_cells=1,
                        num_mixture_dec=1)
    model = NVAE(config, seed=1)
    model.build()
    first = checkpoints.save_model_dir(model, str(tmp_path), step=4)
    kernel = model.trainable_variables[0]
    saved = kernel.numpy()
    kernel.assign(kernel + 1.0)
    second = checkpoints.save_model_dir(model, str(tmp_path), step=8)
    return str(tmp_path), first, second, (checkpoints.variable_key(kernel),
                                          saved)


def test_loading_passes_over_a_damaged_checkpoint(two_model_checkpoints,
                                                  caplog):
    model_dir, first, second, (key, first_value) = two_model_checkpoints
    _truncate(second)
    with caplog.at_level(logging.WARNING):
        model, path = checkpoints.load_model_and_path(model_dir)
    assert path == first
    assert f"Checkpoint {second} cannot be read" in caplog.text
    assert os.path.exists(second + ".index")  # never deleted
    from nvae_tf.serving import inference  # pylint: disable=import-outside-toplevel
    assert inference.load_model(model_dir).checkpoint_id == "ckpt-4"
    kernel, = [v for v in model.weights
               if checkpoints.variable_key(v) == key]
    np.testing.assert_array_equal(kernel.numpy(), first_value)
    with pytest.raises(ValueError, match=r"ckpt-8 cannot be read"):
        checkpoints.load_model_and_path(model_dir, second)


def test_no_readable_checkpoint_is_one_clear_error(two_model_checkpoints):
    model_dir, first, second, _ = two_model_checkpoints
    _truncate(first)
    _truncate(second)
    with pytest.raises(checkpoints.NoReadableCheckpoint,
                       match=r"No readable checkpoint in .*: ckpt-8, ckpt-4 "
                             r"cannot be restored \(.*\); restore them"):
        checkpoints.load_model_and_path(model_dir)
    from nvae_tf.serving import inference  # pylint: disable=import-outside-toplevel
    with pytest.raises(cli.UserError, match="No readable checkpoint.*Pass "
                       "another --checkpoint"):
        inference.load_model(model_dir)


def test_temp_folders_of_interrupted_saves_are_removed(tmp_path):
    subdir = tmp_path / "checkpoints"
    for name in ("ckpt-12_temp", "ckpt-3_temp", "keep_temp", "other"):
        (subdir / name).mkdir(parents=True)
    (subdir / "ckpt-3_temp" / "part-00000-of-00001.data-00000-of-00001") \
        .write_bytes(b"partial")
    removed = checkpoints.remove_temp_folders(str(tmp_path))
    assert sorted(os.path.basename(p) for p in removed) == [
        "ckpt-12_temp", "ckpt-3_temp"]
    assert sorted(os.listdir(subdir)) == ["keep_temp", "other"]


@pytest.mark.slow
def test_trainer_resumes_from_the_newest_readable_checkpoint(
        tmp_path, data, reference):
    model_dir = str(tmp_path / "run")
    shutil.copytree(reference, model_dir)
    damaged = os.path.join(model_dir, "checkpoints", f"ckpt-{MAX_STEPS}")
    _truncate(damaged)
    temp = os.path.join(model_dir, "checkpoints", "ckpt-44_temp")
    os.makedirs(temp)
    log = train_helpers.run_train(*_flags(data, model_dir,
                                          "--checkpoint_every_steps=4"),
                                  timeout=TIMEOUT).stderr
    assert f"Checkpoint {damaged} cannot be read" in log
    assert f"at step {MAX_STEPS - 4} " in log  # resumed from the previous
    assert not os.path.exists(temp)
    # The damaged files are kept aside; the rerun redid the last 4 steps.
    aside = os.path.join(model_dir, "checkpoints", "damaged")
    assert sorted(os.listdir(aside)) == [
        f"ckpt-{MAX_STEPS}.data-00000-of-00001", f"ckpt-{MAX_STEPS}.index"]
    assert _max_abs_diff(reference, model_dir) <= WEIGHT_ATOL


# ---------------------------------------------------------------- signals
@pytest.mark.slow
def test_sigterm_and_sigint_save_at_the_signal_step(tmp_path, data,
                                                    reference):
    model_dir, log_path = str(tmp_path / "run"), str(tmp_path / "log")
    flags = _flags(data, model_dir, "--checkpoint_every_steps=100")
    for signum, status, after in ((signal.SIGTERM, 143, 10),
                                  (signal.SIGINT, 130, 20)):
        open(log_path, "w", encoding="utf-8").close()
        proc = _start(flags, log_path)
        running = _wait_until(lambda: f"step {after}/" in _read(log_path),
                              [proc], f"step {after}")
        assert running, _read(log_path)[-3000:]
        proc.send_signal(signum)
        assert _finish([proc]) == [status], _read(log_path)[-3000:]
        log = _read(log_path)
        assert "Traceback" not in log
        stopped = int(log.split(f"Stopped by {signal.Signals(signum).name} "
                                "at step ")[1].split()[0])
        assert after <= stopped < MAX_STEPS
        # The checkpoint is at the signal's step (none other since step 0).
        assert train_helpers.checkpoint_step(
            train_helpers.latest_checkpoint(model_dir)) == stopped
    train_helpers.run_train(*flags, timeout=TIMEOUT)
    assert _max_abs_diff(reference, model_dir) <= WEIGHT_ATOL


# ---------------------------------------------------------------- kill -9
def _kill_moments(rng):
    """When to kill each of five runs: (phase, extra delay)."""
    return [("start-up", rng.uniform(1.0, 8.0)), ("step", rng.uniform(0, 1)),
            ("checkpoint write", 0.0), ("step", rng.uniform(0, 2)),
            ("start-up", rng.uniform(8.0, 15.0))]


@pytest.mark.slow
def test_five_kills_then_rerun_end_as_the_uninterrupted_run(
        tmp_path, data, reference):
    model_dir, log_path = str(tmp_path / "run"), str(tmp_path / "log")
    flags = _flags(data, model_dir, "--checkpoint_every_steps=1")
    subdir = os.path.join(model_dir, "checkpoints")
    hit = []
    for phase, delay in _kill_moments(np.random.default_rng(16)):
        done = train_helpers.latest_checkpoint(model_dir)
        proc = _start(flags, log_path)
        if phase == "start-up":
            time.sleep(delay)
        elif phase == "step":  # once training has moved past `done`
            _wait_until(lambda: train_helpers.latest_checkpoint(model_dir)
                        not in (None, done), [proc], "a new checkpoint")
            time.sleep(delay)
        else:  # while a save's scratch folder exists
            _wait_until(lambda: os.path.isdir(subdir) and any(
                n.endswith("_temp") for n in os.listdir(subdir)), [proc],
                "a checkpoint write", poll=0.002)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            hit.append(phase)
        _finish([proc])
    assert len(hit) == 5, (hit, _read(log_path)[-3000:])
    train_helpers.run_train(*flags, timeout=TIMEOUT)
    assert _max_abs_diff(reference, model_dir) <= WEIGHT_ATOL
    assert not [n for n in os.listdir(subdir) if n.endswith("_temp")]


# ----------------------------------------------------------- multi-worker
def _start_workers(flags, log_prefix):
    workers = [f"127.0.0.1:{port}" for port in train_helpers.free_ports(2)]
    procs = []
    for index in range(2):
        tf_config = {"cluster": {"worker": workers},
                     "task": {"type": "worker", "index": index}}
        procs.append(_start(flags, f"{log_prefix}{index}",
                            env=train_helpers.subprocess_env(
                                TF_CONFIG=json.dumps(tf_config))))
    return procs


@pytest.mark.slow
def test_sigterm_to_one_worker_saves_both_at_the_same_step(tmp_path, data):
    straight, model_dir = str(tmp_path / "straight"), str(tmp_path / "run")
    log = str(tmp_path / "log")
    flags = ("--strategy=multi_worker", "--kl_const_coeff=1",
             "--checkpoint_every_steps=100")
    procs = _start_workers(_flags(data, straight, *flags), log + "-s")
    assert _finish(procs) == [0, 0], _read(log + "-s0")[-3000:]

    procs = _start_workers(_flags(data, model_dir, *flags), log)
    running = _wait_until(lambda: "step 10/" in _read(log + "0"), procs,
                          "step 10")
    assert running, _read(log + "0")[-3000:]
    procs[1].send_signal(signal.SIGTERM)  # the non-chief worker
    assert _finish(procs) == [143, 143], _read(log + "0")[-3000:]
    stops = [_read(log + str(i)).split("Stopped by ")[1].split(
        " with a checkpoint")[0] for i in range(2)]
    assert stops[0].startswith("another worker's signal at step ")
    assert stops[1].startswith("SIGTERM at step ")
    step = int(stops[1].split()[-1])
    assert int(stops[0].split()[-1]) == step and 10 <= step < MAX_STEPS
    assert train_helpers.checkpoint_step(
        train_helpers.latest_checkpoint(model_dir)) == step
    procs = _start_workers(_flags(data, model_dir, *flags), log + "-r")
    assert _finish(procs) == [0, 0], _read(log + "-r0")[-3000:]
    assert _max_abs_diff(straight, model_dir) <= WEIGHT_ATOL


# --------------------------------------------------------------- disk full
@pytest.mark.slow
def test_disk_full_is_one_line_and_keeps_the_last_checkpoint(tmp_path, data):
    mount = tmp_path / "small"
    mount.mkdir()
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs",
                        str(mount)], check=True, capture_output=True,
                       timeout=30)
    except (OSError, subprocess.SubprocessError) as err:
        pytest.skip(f"cannot mount a small tmpfs here: {err}")
    try:
        model_dir = str(mount / "run")
        proc = train_helpers.run_train(
            *_flags(data, model_dir, "--checkpoint_every_steps=2",
                    "--keep_checkpoints=100"), check=False, timeout=TIMEOUT)
        assert proc.returncode == cli.EXIT_USER_ERROR, proc.stderr[-3000:]
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith("Error: ") and "No space left on device" in \
            last and "free some space" in last, last
        latest = train_helpers.latest_checkpoint(model_dir)
        values = train_helpers.checkpoint_values(latest, prefix="")
        assert values["step/.ATTRIBUTES/VARIABLE_VALUE"] == \
            train_helpers.checkpoint_step(latest) > 0
    finally:
        subprocess.run(["umount", str(mount)], check=False, timeout=30)
