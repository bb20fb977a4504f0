"""ExperimentConfig: one tree of sections, JSON round trip, field paths in
errors, the resolved run length and the reading of the earlier format."""

import dataclasses
import json
import os
import shutil

import numpy as np
import pytest

from nvae_tf.config import ConfigError, NVAEConfig
from nvae_tf.data import DataConfig
from nvae_tf.experiment import ExperimentConfig, migrate
from nvae_tf.objectives import ObjectiveConfig
from nvae_tf.training import checkpoints
from nvae_tf.training.config import RuntimeConfig, TrainConfig

# A config.json written by the trainer before the tree (format 1: sync BN
# in `model`, batch size and seed in `train` and `data`).
V1_CONFIG = os.path.join(os.path.dirname(__file__), "training",
                         "config_v1.json")
MODEL = NVAEConfig(dataset="cifar10", image_size=16, num_channels_enc=8,
                   num_channels_dec=8, num_latent_scales=2,
                   num_groups_per_scale=2, num_latent_per_group=2,
                   num_preprocess_blocks=1, num_postprocess_blocks=1,
                   num_mixture_dec=2)


def _experiment(**sections):
    return ExperimentConfig.for_model(MODEL, **sections)


def test_json_round_trip_of_a_resolved_experiment():
    experiment = _experiment(
        data={"batch_size": 8, "data_dir": "/data", "random_flip": False},
        objective=ObjectiveConfig(weight_decay_norm=1e-2,
                                  weight_decay_norm_anneal=True),
        train=TrainConfig(epochs=3, warmup_epochs=1, seed=5),
        runtime=RuntimeConfig(model_dir="/runs/a", sync_batchnorm=False,
                              grappler="lean"))
    resolved = experiment.resolved(7, num_train=56, num_eval=10, replicas=2)
    assert resolved.run.total_steps == 21 == resolved.objective.total_steps
    assert resolved.run.schedule_epochs == 3
    text = resolved.to_json()
    restored = ExperimentConfig.from_json(text)
    assert restored == resolved
    assert isinstance(restored.model.channel_mult, int)
    sections = json.loads(text)
    assert sections["version"] == 2
    assert sections["data"] == {"batch_size": 8, "data_dir": "/data",
                                "image_check": "scan", "random_flip": False,
                                "shuffle_buffer": 10000,
                                "validation_fraction": 0.0}
    assert restored.data.dataset == "cifar10"  # from the model
    assert ExperimentConfig.from_json(_experiment().to_json()).run is None


def test_resolved_grappler_follows_the_devices(monkeypatch):
    from nvae_tf.fast import graph_options
    experiment = _experiment()
    assert experiment.runtime.grappler == "auto"
    assert experiment.resolved(3).runtime.grappler == "lean"  # CPU-only
    monkeypatch.setattr(graph_options, "resolve_grappler",
                        lambda name: "default")
    assert experiment.resolved(3).runtime.grappler == "default"


@pytest.mark.parametrize("sections, field", [
    (dict(train={"epochs": 0}), "train.epochs"),
    (dict(train={"seed": -1}), "train.seed"),
    (dict(data={"batch_size": 0}), "data.batch_size"),
    (dict(runtime={"strategy": "tpu_pod"}), "runtime.strategy"),
    (dict(runtime={"sync_batchnorm": "yes"}), "runtime.sync_batchnorm"),
    (dict(objective={"kl_const_coeff": 2.0}), "objective.kl_const_coeff"),
    (dict(model={"num_channels_enc": 0}), "model.num_channels_enc"),
    (dict(train={"epoch": 3}), "train"),  # unknown field
    (dict(data={"dataset": "mnist"}), "data"),  # the model's fact
])
def test_errors_carry_the_field_path(sections, field):
    values = json.loads(_experiment().to_json())
    for name, overrides in sections.items():
        values[name].update(overrides)
    with pytest.raises(ConfigError) as err:
        ExperimentConfig.from_dict(values)
    assert err.value.field == field


def test_data_section_must_agree_with_the_model():
    with pytest.raises(ConfigError) as err:
        ExperimentConfig(model=MODEL, data=DataConfig("fashion_mnist"))
    assert err.value.field == "data.dataset"
    with pytest.raises(ConfigError) as err:
        ExperimentConfig(model=MODEL, data=DataConfig("cifar10",
                                                      num_x_bits=5))
    assert err.value.field == "data.num_x_bits"
    resolved = _experiment().resolved(4)
    with pytest.raises(ConfigError, match="run.total_steps"):
        dataclasses.replace(resolved, objective=ObjectiveConfig())


def test_earlier_config_json_is_migrated():
    with open(V1_CONFIG) as f:
        old = json.load(f)
    experiment = ExperimentConfig.from_dict(old)
    assert old["model"]["sync_batchnorm"] is False  # the input is untouched
    assert experiment.runtime.sync_batchnorm is False  # moved to runtime
    assert experiment.data.batch_size == old["train"]["batch_size"] == 4
    assert experiment.train.seed == old["data"]["seed"] == 3
    assert experiment.data.data_dir == "/data/images"
    assert experiment.data.image_shape == (8, 8, 1)
    assert experiment.run.total_steps == experiment.objective.total_steps == 6
    assert experiment.runtime.grappler == "lean"
    assert migrate(experiment.to_dict()) == experiment.to_dict()
    # A model-only directory (a converted official checkpoint).
    model_only = ExperimentConfig.from_dict({"model": MODEL.to_dict(),
                                             "source": "checkpoint.pt"})
    assert model_only.data.batch_size == DataConfig("cifar10").batch_size
    assert model_only.runtime.sync_batchnorm and model_only.run is None


def test_model_dir_of_the_earlier_format_loads_and_resumes(tmp_path):
    """A model_dir written before the tree still loads (evaluate, export)
    and passes the resume check with its own settings."""
    from nvae_tf.model import NVAE
    from nvae_tf.training import main as train
    model_dir = str(tmp_path / "old")
    os.makedirs(model_dir)
    shutil.copy(V1_CONFIG, os.path.join(model_dir, "config.json"))
    experiment = checkpoints.read_config(model_dir)
    model = NVAE(experiment.model, seed=1, sync_batchnorm=False)
    model.build()
    path = checkpoints.save_model_dir(model, str(tmp_path / "scratch"),
                                      step=6)
    shutil.copytree(os.path.dirname(path),
                    os.path.join(model_dir, checkpoints.CHECKPOINT_SUBDIR))
    assert checkpoints.latest_checkpoint(model_dir).endswith("ckpt-6")
    loaded = checkpoints.load_model_dir(model_dir)
    assert not loaded.sync_batchnorm
    for a, b in zip(model.weights, loaded.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    train.check_resume_compatible(model_dir, dataclasses.replace(
        experiment, runtime=dataclasses.replace(experiment.runtime,
                                                sync_batchnorm=True)))
    assert checkpoints.weights_fingerprint(model.weights) == \
        checkpoints.weights_fingerprint(loaded.weights)
