"""Model directories: every variable survives a checkpoint round trip."""

import numpy as np
import pytest
import tensorflow as tf

from nvae_tf.training import checkpoints
from nvae_tf.config import NVAEConfig
from nvae_tf.experiment import ExperimentConfig
from nvae_tf.model import NVAE

TINY = NVAEConfig(dataset="cifar10", image_size=16, num_channels_enc=8,
                  num_channels_dec=8, num_latent_scales=2,
                  num_groups_per_scale=2, num_latent_per_group=2,
                  num_preprocess_blocks=1, num_postprocess_blocks=1,
                  num_preprocess_cells=2, num_postprocess_cells=1,
                  num_mixture_dec=2, use_se=True, res_dist=True, num_nf=1)


def test_checkpoint_holds_every_variable(tmp_path):
    model = NVAE(TINY, seed=3)
    model.build()
    model.spectral_regularization()  # moves the power-iteration state
    for v in model.variables:  # make every value distinctive
        if "float" in v.dtype:
            v.assign(tf.random.normal(v.shape))
    path = checkpoints.save_model_dir(model, str(tmp_path), step=7)
    saved = {name for name, _ in tf.train.list_variables(path)}
    assert len([n for n in saved if "VARIABLE_VALUE" in n and
                not n.startswith("save_counter")]) == len(model.variables)
    restored = checkpoints.load_model_dir(str(tmp_path))
    assert restored.config == TINY
    for a, b in zip(model.variables, restored.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)


def test_not_a_model_dir_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not an nvae_tf model"):
        checkpoints.load_model_dir(str(tmp_path))


def test_corrupt_config_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        checkpoints.read_config(str(tmp_path))


def test_incompatible_checkpoint_is_refused(tmp_path):
    model = NVAE(TINY)
    model.build()
    checkpoints.save_model_dir(model, str(tmp_path))
    other = NVAEConfig(**{**TINY.to_dict(), "num_channels_enc": 16})
    checkpoints.write_config(str(tmp_path),
                             ExperimentConfig.for_model(other))
    with pytest.raises(ValueError, match="cannot be restored"):
        checkpoints.load_model_dir(str(tmp_path))
