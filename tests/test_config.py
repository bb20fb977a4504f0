"""NVAEConfig: validation, derived quantities, JSON round trip."""

import dataclasses
import json

import pytest

from nvae_tf.config import ARCH_INSTANCES, DATASETS, ConfigError, NVAEConfig

# (overrides, field named in the error). Each entry is invalid on its own.
BAD_VALUES = [
    (dict(dataset="svhn"), "dataset"),
    (dict(dataset=None), "dataset"),
    (dict(num_channels_enc=0), "num_channels_enc"),
    (dict(num_channels_enc=2.5), "num_channels_enc"),
    (dict(num_channels_dec=-4), "num_channels_dec"),
    (dict(num_latent_scales=0), "num_latent_scales"),
    (dict(num_groups_per_scale=0), "num_groups_per_scale"),
    (dict(min_groups_per_scale=0), "min_groups_per_scale"),
    (dict(num_latent_per_group=0), "num_latent_per_group"),
    (dict(num_latent_per_group=True), "num_latent_per_group"),
    (dict(num_preprocess_cells=0), "num_preprocess_cells"),
    (dict(num_postprocess_cells=0), "num_postprocess_cells"),
    (dict(num_mixture_dec=0), "num_mixture_dec"),
    (dict(num_preprocess_blocks=-1), "num_preprocess_blocks"),
    (dict(num_postprocess_blocks=1), "num_postprocess_blocks"),
    (dict(num_cell_per_cond_enc=-1), "num_cell_per_cond_enc"),
    (dict(num_cell_per_cond_dec=-1), "num_cell_per_cond_dec"),
    (dict(num_nf=-1), "num_nf"),
    (dict(num_nf=1.5), "num_nf"),
    (dict(num_x_bits=0), "num_x_bits"),
    (dict(num_x_bits=9), "num_x_bits"),
    (dict(num_x_bits=7.5), "num_x_bits"),
    (dict(num_x_bits="8"), "num_x_bits"),
    (dict(arch_instance="res_mbconv9"), "arch_instance"),
    (dict(ada_groups=True, num_groups_per_scale=2, min_groups_per_scale=3),
     "min_groups_per_scale"),
    (dict(image_channels=2), "image_channels"),
    (dict(image_size=0), "image_size"),
    (dict(image_size=-32), "image_size"),
    (dict(image_size=30), "image_size"),  # not a multiple of 2**3
    (dict(dataset="image_folder"), "image_size"),
    (dict(num_latent_scales=1, num_groups_per_scale=1),
     "num_groups_per_scale"),  # the unsupported vanilla-VAE branch
    (dict(channel_mult=(2, 2)), "channel_mult"),  # needs 3 entries
    (dict(channel_mult=0), "channel_mult"),
    (dict(channel_mult=(1, 1, 1), num_channels_enc=3), "num_channels_enc"),
    (dict(dataset="fashion_mnist", num_mixture_dec=1), "num_mixture_dec"),
    (dict(use_se="false"), "use_se"),
    (dict(res_dist=1), "res_dist"),
    (dict(ada_groups="yes"), "ada_groups"),
    (dict(binary="true"), "binary"),
]
BASE = dict(dataset="mnist", num_latent_scales=2)  # 2 + 2 - 1 halvings


@pytest.mark.parametrize("overrides, field", BAD_VALUES,
                         ids=[f"{f}-{i}" for i, (_, f) in
                              enumerate(BAD_VALUES)])
def test_invalid_values_raise_value_error_naming_the_field(overrides, field):
    with pytest.raises(ConfigError) as err:
        NVAEConfig(**{**BASE, **overrides})
    assert isinstance(err.value, ValueError)
    assert err.value.field == field
    assert str(err.value).startswith(f"{field}: ")
    assert err.value.within("model").field == f"model.{field}"


def test_base_of_the_bad_value_table_is_valid():
    NVAEConfig(**BASE)


def test_unknown_field():
    with pytest.raises(ValueError, match=r"num_chanels_enc"):
        NVAEConfig.from_dict({"dataset": "mnist", "num_chanels_enc": 16})
    with pytest.raises(ValueError, match=r"num_chanels_enc"):
        NVAEConfig.from_json(json.dumps({"num_chanels_enc": 16}))


@pytest.mark.parametrize("kwargs, groups", [
    (dict(num_latent_scales=2, num_groups_per_scale=10, ada_groups=True),
     (10, 5)),  # MNIST
    (dict(dataset="celeba_64", num_latent_scales=3, num_groups_per_scale=20,
          ada_groups=True, num_preprocess_blocks=1,
          num_postprocess_blocks=1), (20, 10, 5)),  # CelebA-64
    (dict(dataset="celeba_256", num_latent_scales=5,
          num_groups_per_scale=16, ada_groups=True, min_groups_per_scale=4,
          num_preprocess_blocks=1, num_postprocess_blocks=1),
     (16, 8, 4, 4, 4)),  # CelebA-HQ / FFHQ
    (dict(num_latent_scales=2, num_groups_per_scale=3, ada_groups=True),
     (3, 1)),
    (dict(num_latent_scales=2, num_groups_per_scale=6), (6, 6)),
])
def test_groups_per_scale(kwargs, groups):
    config = NVAEConfig(**kwargs)
    assert config.groups_per_scale == groups
    assert config.groups_per_decoder_scale == tuple(reversed(groups))
    assert config.num_groups == sum(groups)


def test_derived_quantities_mnist():
    c = NVAEConfig(dataset="mnist", num_latent_scales=2)
    assert c.image_size_resolved == 32 and c.data_size == 28
    assert c.data_shape == (28, 28, 1)
    assert c.pads_28_to_32 and c.is_binary
    assert c.output_distribution == "bernoulli" and c.output_channels == 1
    assert c.num_pixels == 784
    assert c.num_downsamplings == 3
    assert [c.latent_size(s) for s in range(2)] == [8, 4]
    assert [c.level_mult(level) for level in range(4)] == [1, 2, 4, 8]
    # An explicit image size switches the MNIST padding off.
    small = NVAEConfig(dataset="mnist", image_size=8, num_latent_scales=2,
                       num_preprocess_blocks=1, num_postprocess_blocks=1)
    assert not small.pads_28_to_32 and small.data_size == 8
    assert small.num_pixels == 64


@pytest.mark.parametrize("kwargs, dist, channels", [
    (dict(dataset="cifar10"), "logistic_mixture", 100),  # 10 M
    (dict(dataset="cifar10", num_mixture_dec=1), "normal", 6),
    (dict(dataset="fashion_mnist"), "logistic_mixture", 30),  # 3 M, grey
    (dict(dataset="cifar10", binary=True), "bernoulli", 3),
    (dict(dataset="mnist", binary=False), "logistic_mixture", 30),
])
def test_output_head(kwargs, dist, channels):
    c = NVAEConfig(**kwargs)
    assert c.output_distribution == dist
    assert c.output_channels == channels


@pytest.mark.parametrize("dataset, size, channels", [
    ("cifar10", 32, 3), ("celeba_64", 64, 3), ("imagenet_32", 32, 3),
    ("ffhq", 256, 3), ("omniglot", 32, 1), ("lsun_church_128", 128, 3),
])
def test_official_image_sizes(dataset, size, channels):
    c = NVAEConfig(dataset=dataset)
    assert c.image_size_resolved == size
    assert c.image_channels_resolved == channels
    assert c.num_pixels == (28 * 28 if dataset == "omniglot" else
                            size * size * channels)


def test_json_round_trip():
    config = NVAEConfig(dataset="celeba_256", num_latent_scales=5,
                        num_groups_per_scale=16, ada_groups=True,
                        min_groups_per_scale=4, num_x_bits=5, num_nf=2,
                        use_se=True, res_dist=True, num_preprocess_blocks=1,
                        num_postprocess_blocks=1, num_channels_enc=30,
                        num_channels_dec=30,
                        channel_mult=(2, 2, 2, 2, 2))
    text = config.to_json()
    restored = NVAEConfig.from_json(text)
    assert restored == config
    assert isinstance(restored.channel_mult, tuple)
    assert json.loads(text)["num_x_bits"] == 5
    assert NVAEConfig.from_dict(config.to_dict()) == config
    assert set(config.to_dict()) == {
        f.name for f in dataclasses.fields(NVAEConfig)}


def test_config_is_frozen():
    config = NVAEConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.num_nf = 2


def test_tables_are_complete():
    assert "res_mbconv" in ARCH_INSTANCES
    for cells in ARCH_INSTANCES.values():
        assert set(cells) == {"enc", "pre", "dec", "post"}
    assert "mnist" in DATASETS and "image_folder" in DATASETS


def test_tiny_config_fixture(tiny_config):
    config = tiny_config(num_nf=1)
    assert config.num_nf == 1
    assert config.groups_per_scale == (2, 2)
    assert config.image_size_resolved == 8
