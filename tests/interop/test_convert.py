"""The official-checkpoint converter: strict mapping, CLI, model directory."""

import argparse
import os

import numpy as np
import pytest

from nvae_tf.training import checkpoints

from nvae_tf.interop import convert
from nvae_tf.interop.torch_pickle import load_torch_checkpoint

from tests.test_official_fixtures import FIXTURE_DIR

BINARY = os.path.join(FIXTURE_DIR, "tiny_binary.pt")


@pytest.fixture(scope="module")
def official():
    if not os.path.exists(BINARY):
        pytest.skip(f"{BINARY} not found")
    return load_torch_checkpoint(BINARY)


@pytest.fixture(scope="module")
def model(official):
    from nvae_tf.model import NVAE
    m = NVAE(convert.config_from_args(official["args"]))
    m.build()
    return m


def test_every_state_dict_entry_is_mapped(official, model):
    entries = convert.official_variable_map(model)
    keys = {k for k in official["state_dict"]
            if not k.endswith("num_batches_tracked")}
    assert keys == set(entries)
    mapped = {id(v) for v, _ in entries.values() if v is not None}
    assert {id(v) for v in model.trainable_variables} <= mapped


def test_missing_entry_is_reported(official, model):
    state = dict(official["state_dict"])
    del state["stem.weight"]
    with pytest.raises(convert.CheckpointMismatchError, match="stem.weight"):
        convert.assign_official_weights(model, state)


def test_unexpected_entry_is_reported(official, model):
    state = dict(official["state_dict"])
    state["enc_tower.99.conv.weight"] = np.zeros((1, 1, 1, 1), np.float32)
    with pytest.raises(convert.CheckpointMismatchError,
                       match=r"unexpected keys \['enc_tower.99.conv.weight'\]"):
        convert.assign_official_weights(model, state)


def test_shape_mismatch_is_reported(official, model):
    state = dict(official["state_dict"])
    state["prior_ftr0"] = np.zeros((3, 2, 2), np.float32)
    with pytest.raises(convert.CheckpointMismatchError, match="prior_ftr0"):
        convert.assign_official_weights(model, state)


def test_unsupported_arch_instance_is_refused(official):
    args = argparse.Namespace(**vars(official["args"]))
    args.arch_instance = "mbconv_den"
    with pytest.raises(ValueError, match="mbconv_den"):
        convert.config_from_args(args)


def test_old_checkpoint_args_get_official_defaults(official):
    values = dict(vars(official["args"]))
    for name in ("ada_groups", "min_groups_per_scale", "num_mixture_dec"):
        values.pop(name)
    config = convert.config_from_args(values)
    assert (config.ada_groups, config.min_groups_per_scale,
            config.num_mixture_dec) == (False, 1, 10)


def test_cli_writes_a_model_directory_that_reloads(tmp_path, official):
    model_dir = str(tmp_path / "converted")
    convert.main([f"--checkpoint={BINARY}", f"--model_dir={model_dir}"])
    assert checkpoints.read_sections(model_dir)["source"] == BINARY
    experiment = checkpoints.read_config(model_dir)
    assert experiment.model == convert.config_from_args(official["args"])
    assert experiment.run is None  # not trained here
    reloaded = checkpoints.load_model_dir(model_dir)
    arrays = np.load(BINARY.replace(".pt", ".npz"))
    eps = [arrays[k] for k in sorted(arrays.files)
           if k.startswith("eps_forward_")]
    out = reloaded(arrays["x"], training=False, eps=eps)
    np.testing.assert_allclose(out.logits, arrays["logits"], rtol=1e-4,
                               atol=1e-5)
