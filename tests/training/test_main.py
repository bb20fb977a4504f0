"""`python -m nvae_tf.train` end to end on a tiny model, and its helpers."""

import json
import os

import numpy as np
import pytest
import tensorflow as tf

from nvae_tf.training import step as step_lib
from nvae_tf.training import trainer
from tests.training import helpers as train_helpers


def test_latent_noise_is_the_replica_slice_of_the_global_draw():
    seed = tf.constant([5, 17], tf.int64)
    shapes = [(3, 4, 4, 20), (3, 2, 2, 5)]  # 2*2*5 = 20: Philox offsets
    shapes.append((3, 1, 1, 3))  # 3 normals per image: the sliced fallback
    for k, shape in enumerate(shapes):
        full = tf.random.stateless_normal(
            [3 * 4, *shape[1:]],
            tf.random.experimental.stateless_fold_in(seed, k))
        for replica in range(4):
            part = step_lib.latent_noise(shapes, seed, replica, 4)[k]
            np.testing.assert_array_equal(
                part.numpy(), full[3 * replica:3 * replica + 3].numpy())


def test_pass_seeds_are_deterministic_and_distinct():
    seeds = [trainer.pass_seed(1, p) for p in range(5)]
    assert seeds == [trainer.pass_seed(1, p) for p in range(5)]
    assert len(set(seeds)) == 5
    assert trainer.pass_seed(2, 0) != seeds[0]


def test_run_length_arithmetic():
    from nvae_tf.training.config import RunLength, TrainConfig
    config = TrainConfig(epochs=4, warmup_epochs=1, steps_per_epoch=200)
    length = RunLength.resolve(config, 1875)
    assert (length.steps_per_epoch, length.total_steps) == (200, 800)
    assert length.schedule_epochs == 4 and length.num_epochs == 4
    short = RunLength.resolve(TrainConfig(epochs=400, max_steps=250), 150)
    assert (short.steps_per_epoch, short.total_steps) == (150, 250)
    assert short.schedule_epochs == 2  # the cosine ends at step 250
    assert RunLength.resolve(TrainConfig(epochs=3, warmup_epochs=1),
                             7).total_steps == 21
    assert TrainConfig(epochs=60).eval_every_epochs_resolved() == 20
    assert TrainConfig(epochs=50).eval_every_epochs_resolved() == 1


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A 6-step run: 2 epochs of 3 steps, checkpoints every 2 steps."""
    base = tmp_path_factory.mktemp("tiny")
    data = train_helpers.make_image_folder(str(base / "images"))
    model_dir = str(base / "run")
    proc = train_helpers.run_train(
        *train_helpers.TINY_FLAGS, f"--data_dir={data}",
        f"--model_dir={model_dir}", "--steps_per_epoch=3",
        "--checkpoint_every_steps=2", "--keep_checkpoints=10",
        f"--export_dir_base={base / 'saved_models'}")
    return model_dir, proc.stderr, data


def test_run_writes_config_checkpoints_and_final_line(tiny_run):
    model_dir, log, _ = tiny_run
    with open(os.path.join(model_dir, "config.json")) as f:
        sections = json.load(f)
    assert set(sections) == {"version", "model", "data", "objective",
                             "train", "runtime", "run"}
    assert sections["run"]["total_steps"] == 6
    assert sections["objective"]["total_steps"] == 6  # resolved
    assert sections["model"]["num_channels_enc"] == 4
    assert sections["runtime"]["grappler"] == "lean"  # auto on a CPU host
    steps = sorted(train_helpers.checkpoint_step(p) for p in
                   tf.train.get_checkpoint_state(os.path.join(
                       model_dir, "checkpoints")).all_model_checkpoint_paths)
    assert steps == [0, 2, 4, 6]  # step 0, then every 2 steps
    values = train_helpers.checkpoint_values(
        train_helpers.latest_checkpoint(model_dir), prefix="")
    assert values["step/.ATTRIBUTES/VARIABLE_VALUE"] == 6
    nelbo = train_helpers.final_nelbo(log)
    assert np.isfinite(nelbo) and nelbo > 0
    assert "bits/dim" in log.splitlines()[-1]


def test_run_evaluates_every_epoch(tiny_run):
    model_dir, _, _ = tiny_run
    with open(os.path.join(model_dir, "eval_history.jsonl")) as f:
        history = [json.loads(line) for line in f]
    assert [h["step"] for h in history] == [3, 6]
    assert all(h["num_images"] == 4 for h in history)
    assert all(np.isfinite(h["nelbo"]) and h["bpd"] > 0 for h in history)


def _event_tags(folder):
    tags = {}
    for name in os.listdir(folder):
        for event in tf.compat.v1.train.summary_iterator(
                os.path.join(folder, name)):
            for value in event.summary.value:
                tags.setdefault(value.tag, []).append(
                    value.metadata.plugin_data.plugin_name)
    return tags


def test_run_writes_tensorboard_scalars_and_images(tiny_run):
    model_dir, _, _ = tiny_run
    tags = _event_tags(os.path.join(model_dir, "train"))
    for tag in ("loss", "nelbo", "recon", "kl", "kl_coeff", "bpd",
                "active_units", "grad_norm", "learning_rate",
                "skipped_steps", "spectral_reg", "kl_per_group/000",
                "kl_per_group/001", "kl_gamma/000"):
        assert tag in tags, tag
    for tag in ("samples/t=0.7", "samples/t=1.0",
                "reconstructions/input_then_reconstruction"):
        assert tags.get(tag, [None])[0] == "images", tag
    assert {"nelbo", "bpd"} <= set(_event_tags(os.path.join(model_dir,
                                                            "eval")))


def test_run_exports_a_saved_model(tiny_run):
    model_dir, _, _ = tiny_run
    export_dir = os.path.join(os.path.dirname(model_dir), "saved_models",
                              "run", "6")
    assert os.path.exists(os.path.join(export_dir, "saved_model.pb"))
    loaded = tf.saved_model.load(export_dir)
    images = loaded.signatures["sample"](
        num_samples=tf.constant(2), temperature=tf.constant(0.7),
        seed=tf.constant(1, tf.int64))["images"]
    assert images.shape == (2, 8, 8, 1) and images.dtype == tf.uint8


def test_rerun_of_a_finished_run_resumes_without_training(tiny_run):
    model_dir, _, data = tiny_run
    before = train_helpers.checkpoint_values(
        train_helpers.latest_checkpoint(model_dir))
    proc = train_helpers.run_train(
        *train_helpers.TINY_FLAGS, f"--data_dir={data}",
        f"--model_dir={model_dir}", "--steps_per_epoch=3",
        "--checkpoint_every_steps=2", "--keep_checkpoints=10",
        f"--export_dir_base={os.path.dirname(model_dir)}/saved_models")
    assert "at step 6" in proc.stderr
    assert "exists already" in proc.stderr and "Epoch" not in proc.stderr
    after = train_helpers.checkpoint_values(
        train_helpers.latest_checkpoint(model_dir))
    for name, value in before.items():
        np.testing.assert_array_equal(after[name], value)


def test_resume_with_another_architecture_is_refused(tiny_run):
    model_dir, _, data = tiny_run
    proc = train_helpers.run_train(
        *train_helpers.TINY_FLAGS, f"--data_dir={data}",
        f"--model_dir={model_dir}", "--num_channels_enc=6",
        "--num_latent_per_group=2", check=False)
    assert proc.returncode != 0
    assert "different architecture" in proc.stderr
    assert "--num_channels_enc: saved 4, flags 6" in proc.stderr
    assert "--num_latent_per_group: saved 4, flags 2" in proc.stderr


def test_refused_resume_leaves_config_json_untouched(tiny_run):
    model_dir, _, data = tiny_run
    path = os.path.join(model_dir, "config.json")
    with open(path, "rb") as f:
        before = f.read()
    mtime = os.stat(path).st_mtime_ns
    proc = train_helpers.run_train(
        *train_helpers.TINY_FLAGS, f"--data_dir={data}",
        f"--model_dir={model_dir}", "--num_channels_enc=6",
        "--max_steps=9", "--nosync_batchnorm", check=False)
    assert proc.returncode != 0 and "different architecture" in proc.stderr
    with open(path, "rb") as f:
        assert f.read() == before
    assert os.stat(path).st_mtime_ns == mtime


def test_resume_accepts_other_runtime_settings_and_saves_only_changes(
        tiny_run, tmp_path):
    """Synchronized BN and Grappler are runtime choices, not architecture:
    a resume with other values passes the check; config.json is rewritten
    only when the settings differ from the saved ones."""
    import dataclasses
    from nvae_tf.training import checkpoints
    from nvae_tf.training import main as train
    model_dir, _, _ = tiny_run
    saved = checkpoints.read_config(model_dir)
    other = dataclasses.replace(saved, runtime=dataclasses.replace(
        saved.runtime, sync_batchnorm=False, grappler="default"))
    train.check_resume_compatible(model_dir, other)  # no error
    copy = str(tmp_path / "copy")
    checkpoints.write_config(copy, saved)
    path = os.path.join(copy, "config.json")
    mtime = os.stat(path).st_mtime_ns
    assert not train.save_config(copy, saved)  # same settings: untouched
    assert os.stat(path).st_mtime_ns == mtime
    assert train.save_config(copy, other)
    assert checkpoints.read_config(copy) == other
    wider = dataclasses.replace(saved, model=dataclasses.replace(
        saved.model, num_channels_enc=8))
    with pytest.raises(Exception, match="--num_channels_enc: saved 4, "
                                        "flags 8"):
        train.check_resume_compatible(model_dir, wider)


def _replica_loss_and_grads(tr):
    """The trainer's step-0 loss and gradients, from a freshly traced
    `tf.function` (optimised with this thread's current Grappler options)."""
    state = [v.numpy() for v in tr.model.non_trainable_variables]
    zero = tf.constant(0, tf.int64)

    replica_step = step_lib.make_replica_step(
        tr.model, tr.objective, tr.noise_fn, tr.step_options)

    @tf.function
    def step(iterator):
        grads, metrics, _, _ = tr.strategy.run(replica_step, args=(
            next(iterator), zero, zero, tf.constant(1.0)))
        return grads, metrics["loss"]

    grads, loss = step(tr.train_batches(0))
    for variable, value in zip(tr.model.non_trainable_variables, state):
        variable.assign(value)  # BN statistics, power-iteration vectors
    return float(loss), [g.numpy() for g in grads]


def _tiny_configs(tmp_path, *extra):
    """The configs of the tiny trainer flags on a fresh image folder."""
    from absl import flags
    from nvae_tf.training import flags as nvae_flags
    data = train_helpers.make_image_folder(str(tmp_path / "images"))
    values = flags.FlagValues()
    nvae_flags.define_flags(values)
    values(["train", *train_helpers.TINY_FLAGS, f"--data_dir={data}",
            f"--model_dir={tmp_path / 'run'}", "--strategy=one_device",
            *extra])
    return nvae_flags.from_flags(values)


def test_lean_grappler_gives_the_trainer_the_same_loss_and_gradients(
        tmp_path):
    """`--grappler=auto` (lean on this CPU-only host) vs TensorFlow's
    default passes."""
    from tensorflow.core.protobuf import rewriter_config_pb2
    from nvae_tf.fast import graph_options
    from nvae_tf.training import main as train
    from tests.fast.test_graph_options import rewriter_config
    experiment = _tiny_configs(tmp_path)
    assert experiment.runtime.grappler == "auto"
    try:
        tr, _ = train.build_trainer(
            experiment, train.make_strategy(experiment.runtime))
        assert tr.runtime.grappler == "lean"  # resolved: no GPU here
        rewrite = rewriter_config()  # set by the Trainer
        assert rewrite.memory_optimization == \
            rewriter_config_pb2.RewriterConfig.NO_MEM_OPT
        assert rewrite.disable_tfg_optimizer
        lean_loss, lean_grads = _replica_loss_and_grads(tr)
        graph_options.set_grappler_options(graph_options.GRAPPLER["default"])
        assert rewriter_config().memory_optimization == \
            rewriter_config_pb2.RewriterConfig.DEFAULT_MEM_OPT
        loss, grads = _replica_loss_and_grads(tr)
    finally:
        graph_options.set_grappler_options(graph_options.GRAPPLER["default"])
    assert np.isfinite(loss)
    np.testing.assert_allclose(lean_loss, loss, rtol=1e-6)
    assert len(grads) == len(tr.model.trainable_variables)
    for variable, a, b in zip(tr.model.trainable_variables, lean_grads, grads):
        scale = max(float(np.abs(b).max()), 1e-12)
        assert float(np.abs(a - b).max()) <= 1e-6 * scale, variable.path


def test_validation_split_is_evaluated_every_epoch_and_test_at_the_end(
        tmp_path):
    data = train_helpers.make_image_folder(str(tmp_path / "images"))
    model_dir = str(tmp_path / "run")
    proc = train_helpers.run_train(
        *train_helpers.TINY_FLAGS, f"--data_dir={data}",
        f"--model_dir={model_dir}", "--steps_per_epoch=3", "--max_steps=6",
        "--validation_fraction=0.25", "--max_eval_images=3", "--noexport")
    with open(os.path.join(model_dir, "eval_history.jsonl")) as f:
        history = [(h["step"], h["split"], h["num_images"])
                   for h in map(json.loads, f)]
    # 36 training images: 9 held out (3 evaluated), 27 trained on; the 4
    # test images once, after the last step (3 of them evaluated).
    assert history == [(3, "validation", 3), (6, "validation", 3),
                       (6, "test", 3)]
    with open(os.path.join(model_dir, "config.json")) as f:
        run = json.load(f)["run"]
    assert (run["num_train"], run["num_validation"], run["num_eval"],
            run["batches_per_pass"]) == (27, 9, 4, 6)
    tags = _event_tags(os.path.join(model_dir, "eval"))
    assert {"val/nelbo", "val/bpd", "nelbo", "bpd"} <= set(tags)
    assert "Test NELBO" in proc.stderr.splitlines()[-1]


def test_no_final_test_evaluation_needs_a_validation_split(tmp_path):
    from nvae_tf.training import flags as nvae_flags
    with pytest.raises(nvae_flags.FlagError,
                       match="^--final_test_eval: False needs a validation"):
        _tiny_configs(tmp_path, "--nofinal_test_eval")
    experiment = _tiny_configs(tmp_path, "--nofinal_test_eval",
                               "--validation_fraction=0.1")
    assert not experiment.train.final_test_eval
