"""Flags of `python -m nvae_tf.train`: official names and defaults, presets,
and validation errors that name the flag before any work starts."""

import glob
import os
import subprocess
import sys
import time

import pytest
from absl import flags

from nvae_tf.config import ConfigError
from nvae_tf.training import flags as nvae_flags
from nvae_tf.training.config import RuntimeConfig, TrainConfig
from tests.training import helpers as train_helpers

CONFIG_DIR = os.path.join(train_helpers.REPO, "configs")

# Every official train.py flag and its default. `--data`
# is an alias of `--data_dir` (default: the dataset's own location).
OFFICIAL_DEFAULTS = {
    "root": "/tmp/nasvae/expr", "save": "exp", "dataset": "mnist",
    "batch_size": 200, "learning_rate": 1e-2, "learning_rate_min": 1e-4,
    "weight_decay": 3e-4, "weight_decay_norm": 0.0,
    "weight_decay_norm_init": 10.0, "weight_decay_norm_anneal": False,
    "epochs": 200, "warmup_epochs": 5, "fast_adamax": False,
    "arch_instance": "res_mbconv", "kl_anneal_portion": 0.3,
    "kl_const_portion": 1e-4, "kl_const_coeff": 1e-4, "num_nf": 0,
    "num_x_bits": 8, "num_latent_scales": 1, "num_groups_per_scale": 10,
    "num_latent_per_group": 20, "ada_groups": False,
    "min_groups_per_scale": 1, "num_channels_enc": 32,
    "num_preprocess_blocks": 2, "num_preprocess_cells": 3,
    "num_cell_per_cond_enc": 1, "num_channels_dec": 32,
    "num_postprocess_blocks": 2, "num_postprocess_cells": 3,
    "num_cell_per_cond_dec": 1, "num_mixture_dec": 10, "use_se": False,
    "res_dist": False, "cont_training": False, "num_proc_node": 1,
    "node_rank": 0, "local_rank": 0, "global_rank": 0,
    "num_process_per_node": 1, "master_address": "127.0.0.1", "seed": 1,
}


def parse(*argv):
    fv = flags.FlagValues()
    nvae_flags.define_flags(fv)
    fv(["train", *argv])
    return fv


def configs_from(*argv):
    return nvae_flags.from_flags(parse(*argv))


def test_every_official_flag_keeps_its_name_and_default():
    fv = parse()
    assert len(OFFICIAL_DEFAULTS) + 1 == 44  # + --data
    for name, default in OFFICIAL_DEFAULTS.items():
        assert fv[name].default == default, name
    fv = parse("--data=/some/folder")
    assert fv.data_dir == "/some/folder"


def test_defaults_resolve_to_the_official_configuration():
    experiment = configs_from()
    model, data = experiment.model, experiment.data
    assert (model.dataset, model.num_channels_enc, model.num_x_bits) == (
        "mnist", 32, 8)
    assert model.is_binary and data.is_binary
    assert (data.batch_size, experiment.train.seed) == (200, 1)
    assert experiment.train == TrainConfig()
    assert experiment.objective.kl_anneal_portion == 0.3
    assert experiment.objective.total_steps == 1  # resolved with the data
    assert experiment.run is None
    assert experiment.runtime.model_dir == "/tmp/nasvae/expr/eval-exp"
    assert experiment.runtime == RuntimeConfig()
    assert experiment.runtime.sync_batchnorm  # official SyncBN


def test_each_fact_has_one_owner():
    """batch_size and seed live in one section each; the data section's
    dataset facts are the model's; sync BN is a runtime choice."""
    experiment = configs_from("--batch_size=12", "--seed=7",
                              "--nosync_batchnorm")
    sections = experiment.to_dict()
    owners = {}
    for name, section in sections.items():
        if isinstance(section, dict):
            for field in section:
                owners.setdefault(field, []).append(name)
    assert owners["batch_size"] == ["data"]
    assert owners["seed"] == ["train"]
    assert owners["dataset"] == ["model"]
    assert owners["num_x_bits"] == ["model"]
    assert owners["sync_batchnorm"] == ["runtime"]
    assert sections["data"]["batch_size"] == 12
    assert sections["train"]["seed"] == 7
    assert sections["runtime"]["sync_batchnorm"] is False
    assert experiment.data.dataset == experiment.model.dataset == "mnist"


def test_every_flag_is_in_exactly_one_help_group_of_its_section():
    """--help groups follow the config tree: one group per section that
    flags set, every flag in one group, each field's flag in its section."""
    import dataclasses

    from nvae_tf.data import MODEL_IMPLIED_FIELDS
    from nvae_tf.experiment import ExperimentConfig

    fv = parse()
    groups = nvae_flags.flag_sections(fv)
    assert list(groups) == [f.name for f in dataclasses.fields(
        ExperimentConfig) if f.name != "run"]
    listed = [name for names in groups.values() for name in names]
    assert sorted(listed) == sorted(fv)  # each defined flag once
    assert len(listed) == 79
    # Every settable field's flag sits in its own section's group.
    section_types = nvae_flags.config_sections()
    unflagged = []
    for section, section_type in section_types.items():
        for field in dataclasses.fields(section_type):
            name = nvae_flags.flag_name(f"{section}.{field.name}")[2:]
            if name not in fv:
                unflagged.append(f"{section}.{field.name}")
            elif not (section == "data" and
                      field.name in MODEL_IMPLIED_FIELDS):
                assert name in groups[section], (section, name)
            else:  # a dataset fact the data section takes from the model
                assert name in groups["model"], name
    assert unflagged == ["objective.total_steps"]  # resolved from the data
    # The model owns the dataset facts; aliases join their target; the
    # non-field flags sit with what they concern.
    for section, name in [("model", "dataset"), ("model", "num_x_bits"),
                          ("data", "data"), ("data", "data_dir"),
                          ("runtime", "cont_training"), ("runtime", "root"),
                          ("runtime", "num_proc_node"), ("train", "export"),
                          ("train", "fast_adamax")]:
        assert name in groups[section], (section, name)
    # Each group is a key-flag "module" whose name is its --help heading.
    for section, heading in zip(groups, nvae_flags.HELP_GROUPS):
        assert heading.startswith(f"{section} (")
        assert sorted(flag.name for flag in
                      fv.get_key_flags_for_module(heading)) == \
            groups[section]


def test_config_errors_name_the_flag_without_guessing():
    assert nvae_flags.flag_name("train.epochs") == "--epochs"
    assert nvae_flags.flag_name("data.batch_size") == "--batch_size"
    assert nvae_flags.flag_name("runtime.require_checkpoint") == \
        "--cont_training"
    err = nvae_flags.flag_error(ConfigError.invalid(
        "epochs", 0, "an integer >= 1").within("train"))
    assert str(err) == "--epochs: 0 is invalid: expected an integer >= 1."


def test_remat_reaches_the_runtime_config():
    experiment = configs_from("--remat=groups")
    assert experiment.runtime.remat == "groups"
    assert configs_from().runtime.remat == "none"


def test_model_dir_defaults_to_root_and_save():
    runtime = configs_from("--root=/r", "--save=run7").runtime
    assert runtime.model_dir == "/r/eval-run7"


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(
    CONFIG_DIR, "*.cfg"))), ids=os.path.basename)
def test_every_preset_parses_and_validates(path):
    experiment = configs_from(f"--flagfile={path}")
    assert experiment.data.dataset == experiment.model.dataset
    assert experiment.runtime.model_dir.startswith("runs/")


def test_quickstart_preset_uses_the_embedded_data():
    experiment = configs_from(f"--flagfile={CONFIG_DIR}/quickstart.cfg")
    model, data = experiment.model, experiment.data
    assert model.dataset == data.dataset == "fashion_mnist"
    assert model.output_distribution == "logistic_mixture"


def test_readme_presets_reproduce_the_official_global_batches():
    expected = {"mnist": 400, "cifar10": 256, "celeba64": 128,
                "imagenet32": 576, "celebahq256": 96, "ffhq256": 96}
    for name, batch in expected.items():
        data = configs_from(f"--flagfile={CONFIG_DIR}/{name}.cfg").data
        assert data.batch_size == batch, name


@pytest.mark.parametrize("argv, flag", [
    (["--epochs=0"], "--epochs"),
    (["--batch_size=0"], "--batch_size"),
    (["--learning_rate=-1"], "--learning_rate"),
    (["--learning_rate_min=0.1"], "--learning_rate_min"),
    (["--epochs=5", "--warmup_epochs=5"], "--warmup_epochs"),
    (["--nan_lr_factor=1.5"], "--nan_lr_factor"),
    (["--nan_patience=0"], "--nan_patience"),
    (["--keep_checkpoints=0"], "--keep_checkpoints"),
    (["--summary_every_steps=0"], "--summary_every_steps"),
    (["--max_steps=-3"], "--max_steps"),
    (["--export_name=a/b"], "--export_name"),
    (["--num_x_bits=9"], "--num_x_bits"),
    (["--num_channels_enc=0"], "--num_channels_enc"),
    (["--num_postprocess_blocks=1"], "--num_postprocess_blocks"),
    (["--ada_groups", "--min_groups_per_scale=20"], "--min_groups_per_scale"),
    (["--kl_anneal_portion=0"], "--kl_anneal_portion"),
    (["--kl_const_coeff=2"], "--kl_const_coeff"),
    (["--weight_decay_norm=-1"], "--weight_decay_norm"),
    (["--weight_decay_norm_anneal"], "--weight_decay_norm"),
    (["--num_process_per_node=8"], "--num_process_per_node"),
    (["--num_proc_node=3"], "--num_proc_node"),
    (["--local_rank=1"], "--local_rank"),
    (["--dataset=ffhq"], "--dataset"),
    (["--dataset=image_folder", "--image_size=64", "--image_channels=3"],
     "--data_dir"),
    (["--dataset=image_folder", "--data_dir=/x", "--image_channels=3"],
     "--image_size"),
    (["--image_size=64"], "--image_size"),
    (["--image_channels=2"], "--image_channels"),
    (["--dataset=fashion_mnist", "--binary=true", "--num_x_bits=5"],
     "--num_x_bits"),
    (["--shuffle_buffer=0"], "--shuffle_buffer"),
    (["--strategy=mirrored", "--jit_compile"], "--jit_compile"),
    (["--strategy=one_device", "--num_cpu_devices=2"], "--num_cpu_devices"),
    (["--num_cpu_devices=-1"], "--num_cpu_devices"),
])
def test_bad_values_name_the_flag(argv, flag):
    with pytest.raises(nvae_flags.FlagError) as err:
        configs_from(*argv)
    assert flag in str(err.value)


def test_official_multi_gpu_flags_explain_the_global_batch():
    with pytest.raises(nvae_flags.FlagError,
                       match=r"--batch_size=256 \(per-GPU 32 x 8 GPUs\)"):
        configs_from("--num_process_per_node=8", "--batch_size=32")


@pytest.mark.parametrize("argv, flag", [
    (["--strategy=bogus"], "strategy"),
    (["--mixed_precision=fp8"], "mixed_precision"),
    (["--grappler=fast"], "grappler"),
    (["--remat=all"], "remat"),
    (["--batch_size=abc"], "batch_size"),
    (["--dataset=svhn"], "dataset"),
])
def test_unparsable_values_name_the_flag(argv, flag):
    with pytest.raises(flags.IllegalFlagValueError, match=flag):
        parse(*argv)


def test_cli_fails_fast_naming_the_flag(tmp_path):
    model_dir = tmp_path / "run"
    start = time.time()
    proc = subprocess.run(
        [sys.executable, "-m", "nvae_tf.train", "--dataset=fashion_mnist",
         f"--model_dir={model_dir}", "--epochs=3", "--warmup_epochs=3"],
        cwd=train_helpers.REPO, env=train_helpers.subprocess_env(),
        capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "--warmup_epochs: 3 is invalid" in proc.stderr
    assert not model_dir.exists()  # nothing was written
    assert time.time() - start < 60


def test_grappler_flag_reaches_the_runtime_config():
    assert configs_from().runtime.grappler == "auto"  # resolved with devices
    assert configs_from("--grappler=default").runtime.grappler == "default"
    assert configs_from("--grappler=lean").runtime.grappler == "lean"
    with pytest.raises(flags.IllegalFlagValueError,
                       match=r"--grappler=fast: value should be one of "
                             r"<auto\|default\|lean>"):
        parse("--grappler=fast")
    with pytest.raises(ConfigError, match=r"^grappler: 'fast' is invalid: "
                       r"expected one of auto, default, lean"):
        RuntimeConfig(grappler="fast")
