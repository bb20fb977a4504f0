"""tuning/: keras-tuner search over NVAE architectures with our trainer."""

import csv
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_IMAGES = 40  # every 10th is a test image: 36 train, 4 test
TIMEOUT = 900


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(NUM_IMAGES):
        pixels = (rng.random((16, 16)) * 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"img_{i:03d}.png")
    return str(folder)


def _base_flags(image_dir):
    return [f"--dataset=image_folder", f"--data_dir={image_dir}",
            "--image_size=16", "--image_channels=1", "--batch_size=4",
            "--max_steps=2", "--steps_per_epoch=2", "--epochs=1",
            "--warmup_epochs=0", "--noexport", "--num_latent_scales=1",
            "--num_groups_per_scale=2", "--num_latent_per_group=2",
            "--num_preprocess_blocks=1", "--num_postprocess_blocks=1",
            "--num_preprocess_cells=1", "--num_postprocess_cells=1",
            "--num_mixture_dec=2", "--summary_every_steps=1"]


def _write_space(tmp_path, space):
    path = tmp_path / "space.json"
    path.write_text(json.dumps(space))
    return str(path)


def _search(args, env=None, cwd=ROOT):
    pythonpath = ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")
    process = subprocess.run(
        [sys.executable, "-m", "tuning.search", *args], cwd=cwd,
        capture_output=True, text=True, timeout=TIMEOUT,
        env={**os.environ, "PYTHONPATH": pythonpath, **(env or {})})
    return process


def _history(model_dir):
    with open(os.path.join(model_dir, "eval_history.jsonl")) as f:
        return [json.loads(line) for line in f]


def _rows(project_dir):
    with open(os.path.join(project_dir, "results.json")) as f:
        return json.load(f)


@pytest.mark.slow
def test_search_reports_the_best_trial_and_its_flagfile_trains(
        tmp_path, image_dir):
    space = _write_space(tmp_path, {"num_channels_enc": [4, 8],
                                    "num_cell_per_cond_dec": [1, 2]})
    args = _base_flags(image_dir) + [
        "--tuner=random", "--max_trials=3", f"--directory={tmp_path}",
        "--project_name=p", f"--search_space={space}"]
    process = _search(args)
    assert process.returncode == 0, process.stderr[-3000:]
    project = tmp_path / "p"
    rows = _rows(project)
    completed = [r for r in rows if r["status"] == "completed"]
    assert len(completed) >= 2
    best = min(completed, key=lambda r: r["objective"])
    assert f"Best trial {best['trial']}" in process.stdout
    with open(project / "results.csv") as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    # Each trial wrote its own TensorBoard logs.
    for row in completed:
        trial_dir = project / f"trial_{row['trial']}"
        assert any("tfevents" in name for _, _, names in os.walk(trial_dir)
                   for name in names)
    # best.cfg trains as it is.
    cfg = (project / "best.cfg").read_text()
    assert f"--num_channels_enc={best['num_channels_enc']}" in cfg
    train = subprocess.run(
        [sys.executable, "-m", "nvae_tf.train", f"--flagfile={project}/"
         "best.cfg", f"--model_dir={tmp_path}/best_run"], cwd=ROOT,
        capture_output=True, text=True, timeout=TIMEOUT)
    assert train.returncode == 0, train.stderr[-3000:]
    # The final run: validation every epoch, the test split once, last.
    splits = [h["split"] for h in _history(tmp_path / "best_run")]
    assert splits[-1] == "test" and splits.count("test") == 1
    assert set(splits[:-1]) == {"validation"}

    # Rerunning with a larger budget resumes: old trials are not redone.
    stamps = {r["trial"]: os.path.getmtime(
        project / f"trial_{r['trial']}" / "trial_info.json") for r in rows}
    args = [a if not a.startswith("--max_trials") else "--max_trials=4"
            for a in args]
    process = _search(args)
    assert process.returncode == 0, process.stderr[-3000:]
    rows = _rows(project)
    assert len(rows) == 4
    for trial, stamp in stamps.items():
        assert os.path.getmtime(project / f"trial_{trial}" /
                                "trial_info.json") == stamp


@pytest.mark.slow
def test_trials_are_scored_on_validation_and_never_read_the_test_split(
        tmp_path, image_dir):
    """Acceptance: the objective is the validation split's, the trials write
    no test evaluation and export nothing (not even into the caller's
    ./saved_models); best.cfg keeps the validation split and drops the
    trial-only flags, so its run evaluates the test split at the end."""
    space = _write_space(tmp_path, {"num_channels_enc": [4]})
    caller = tmp_path / "caller"
    caller.mkdir()
    flags = [f for f in _base_flags(image_dir) if f != "--noexport"]
    process = _search(flags + [
        "--tuner=random", "--max_trials=1", f"--directory={tmp_path}",
        "--project_name=p", f"--search_space={space}",
        "--max_eval_images=3"], cwd=str(caller))
    assert process.returncode == 0, process.stderr[-3000:]
    project = tmp_path / "p"
    (row,) = _rows(project)
    assert row["status"] == "completed"
    trial_dir = project / f"trial_{row['trial']}"
    history = _history(trial_dir)
    assert history and {h["split"] for h in history} == {"validation"}
    assert all(h["num_images"] == 3 for h in history)  # --max_eval_images
    # 36 training images: 0.1 (the search's default) holds 4 out.
    config = json.loads((trial_dir / "config.json").read_text())
    assert config["data"]["validation_fraction"] == 0.1
    assert config["run"]["num_validation"] == 4
    assert config["run"]["num_train"] == 32
    assert row["objective"] == history[-1]["bpd"]
    assert not (caller / "saved_models").exists()
    assert not any("saved_models" in dirs for _, dirs, _ in
                   os.walk(tmp_path))
    cfg = (project / "best.cfg").read_text()
    assert "--validation_fraction=0.1" in cfg
    assert "final_test_eval" not in cfg and "--noexport" not in cfg

    from tuning import tuner as tuner_lib
    assert tuner_lib.read_validation_score(str(trial_dir)) == history[-1]
    with open(trial_dir / "eval_history.jsonl", "a") as f:
        f.write(json.dumps({**history[-1], "split": "test", "step": 99,
                            "bpd": -1.0}) + "\n")
    assert tuner_lib.read_validation_score(str(trial_dir)) == history[-1]


def test_parameter_budget_rejects_before_training(tmp_path, image_dir):
    space = _write_space(tmp_path, {"num_channels_enc": [64]})
    process = _search(_base_flags(image_dir) + [
        "--tuner=random", "--max_trials=1", f"--directory={tmp_path}",
        "--project_name=p", f"--search_space={space}", "--max_params=1000",
        "--max_consecutive_failed_trials=1"])
    assert process.returncode != 0
    assert "No trial completed" in process.stderr or \
        "exceed --max_params=1,000" in process.stderr
    trial_dir = tmp_path / "p" / "trial_0"
    info = json.loads((trial_dir / "trial_info.json").read_text())
    assert info["status"] == "rejected" and info["params"] > 1000
    # Rejected without training: the trainer never ran there.
    assert not (trial_dir / "config.json").exists()


def test_bad_search_space_is_a_usage_error(tmp_path, image_dir):
    space = _write_space(tmp_path, {"num_channels": [8]})
    process = _search(_base_flags(image_dir) + [
        f"--directory={tmp_path}", f"--search_space={space}"])
    assert process.returncode != 0
    assert "'num_channels' is neither an NVAEConfig field" in process.stderr


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_chief_and_two_workers_complete_a_search(tmp_path, image_dir):
    space = _write_space(tmp_path, {"num_channels_enc": [4, 8]})
    args = _base_flags(image_dir) + [
        "--tuner=random", "--max_trials=2", f"--directory={tmp_path}",
        "--project_name=dist", f"--search_space={space}"]
    base = [sys.executable, "-m", "tuning.search", *args]
    env = {**os.environ, "KERASTUNER_ORACLE_IP": "127.0.0.1",
           "KERASTUNER_ORACLE_PORT": str(_free_port())}
    processes = [subprocess.Popen(
        base, cwd=ROOT, env={**env, "KERASTUNER_TUNER_ID": role},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for role in ("chief", "tuner0", "tuner1")]
    try:
        outputs = [p.communicate(timeout=TIMEOUT)[0] for p in processes]
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
    for p, out in zip(processes, outputs):
        assert p.returncode == 0, out[-3000:]
    rows = _rows(tmp_path / "dist")
    assert sum(r["status"] == "completed" for r in rows) == 2
    assert os.path.exists(tmp_path / "dist" / "best.cfg")


def test_trial_flags_round_trip_through_the_trainer_flags():
    """A sampled architecture written as flags parses back to itself."""
    import keras_tuner as kt
    from absl import flags

    from nvae_tf.training import flags as nvae_flags
    from nvae_tf.config import NVAEConfig
    from tuning import space as space_lib

    base = NVAEConfig(dataset="fashion_mnist", num_latent_scales=2,
                      num_groups_per_scale=2, num_preprocess_blocks=1,
                      num_postprocess_blocks=1, use_se=True, res_dist=True)
    hp = kt.HyperParameters()
    config = space_lib.sample_config(hp, space_lib.DEFAULT_SPACE, base)
    assert set(hp.values) >= {"channel_mult_0", "channel_mult_1",
                              "decoder_width_mult"}
    hp.values.update(channel_mult_0=1, channel_mult_1=2, num_channels_enc=16,
                     decoder_width_mult=2)
    config = space_lib.sample_config(hp, space_lib.DEFAULT_SPACE, base)
    assert config.channel_mult == (1, 2) and config.num_channels_dec == 32
    base_lines = ["--dataset=fashion_mnist", "--num_latent_scales=2",
                  "--num_preprocess_blocks=1", "--num_postprocess_blocks=1",
                  "--use_se", "--res_dist"]
    values = flags.FlagValues()
    nvae_flags.define_flags(values)
    values(["prog"] + base_lines +
           space_lib.training_flags(config, space_lib.DEFAULT_SPACE))
    parsed = nvae_flags.from_flags(values).model
    assert parsed == config


def test_recipe_flags_are_searched_and_round_trip_through_the_trainer():
    """The learning rate and batch size of a space reach the trial's trainer
    flags and parse back to the experiment's values; a log-scale float range
    stays inside its bounds."""
    import keras_tuner as kt
    from absl import flags

    from nvae_tf.config import NVAEConfig
    from nvae_tf.training import flags as nvae_flags
    from tuning import space as space_lib
    from tuning import tuner as tuner_lib

    space = {"num_channels_enc": [8, 16],
             "learning_rate": {"min": 1e-3, "max": 2e-2, "sampling": "log"},
             "batch_size": [32, 64]}
    space_lib.validate_space(space)
    base = NVAEConfig(dataset="fashion_mnist", num_latent_scales=1,
                      num_groups_per_scale=2, num_preprocess_blocks=1,
                      num_postprocess_blocks=1)
    hypermodel = tuner_lib.NVAEHyperModel(base, space)
    hp = kt.HyperParameters()
    hypermodel.build(hp)  # registers every searched name, recipe included
    assert set(hp.values) == {"num_channels_enc", "learning_rate",
                              "batch_size"}
    assert 1e-3 <= hp.values["learning_rate"] <= 2e-2
    hp.values.update(num_channels_enc=16, learning_rate=0.004, batch_size=32)
    lines = hypermodel.training_flags(hp)
    assert sorted(space_lib.searched_flags(space)) == sorted(space)
    values = flags.FlagValues()
    nvae_flags.define_flags(values)
    values(["prog", "--dataset=fashion_mnist", "--num_latent_scales=1",
            "--num_groups_per_scale=2", "--num_preprocess_blocks=1",
            "--num_postprocess_blocks=1", "--learning_rate=0.5",
            "--batch_size=8", *lines])  # the trial's values come last: win
    experiment = nvae_flags.from_flags(values)
    assert experiment.train.learning_rate == 0.004
    assert experiment.data.batch_size == 32
    assert experiment.model.num_channels_enc == 16


def test_search_space_names_must_be_config_fields_or_recipe_flags():
    from tuning import space as space_lib

    space_lib.validate_space({"learning_rate": [1e-3, 1e-2]})
    with pytest.raises(ValueError, match="'momentum' is neither"):
        space_lib.validate_space({"momentum": [0.9]})
