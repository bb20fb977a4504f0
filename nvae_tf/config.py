"""The model configuration of NVAE (Vahdat & Kautz, 2020), with official flag names.

`NVAEConfig` holds every architecture and objective setting that changes the
function the model computes. Field names are the official `train.py` flag names
so that official commands and checkpoints carry over; derived quantities
(image size, groups per scale, channel widths) are properties.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from nvae_tf import datasets

CHANNEL_MULT = 2  # official: channels double at each down-sampling step.

DATASETS = datasets.NAMES  # accepted `dataset` names (the table's keys)


class ConfigError(ValueError):
    """An invalid configuration value or combination.

    Attributes:
      field: the value's path in the experiment configuration, e.g.
        `train.epochs` (a section's own checks give the bare field name,
        `epochs`; `within` prefixes the section).
      message: what is wrong and what is expected, without the field.
    """

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message

    @classmethod
    def invalid(cls, field: str, value, expected: str) -> "ConfigError":
        """`field`'s `value` is not what is `expected`."""
        return cls(field, f"{value!r} is invalid: expected {expected}.")

    def within(self, section: str) -> "ConfigError":
        """The same error with `section.` before the field path."""
        return ConfigError(f"{section}.{self.field}", self.message)


# Operation lists per cell type, as the official `get_arch_cells` tables
# Keys: cell family -> op names of the cell.
_RES = ("res_bnswish", "res_bnswish")
ARCH_INSTANCES: dict[str, dict[str, tuple[str, ...]]] = {
    "res_mbconv": {"enc": _RES, "pre": _RES,
                   "dec": ("mconv_e6k5g0",), "post": ("mconv_e3k5g0",)},
    "res_bnswish": {"enc": _RES, "pre": _RES, "dec": _RES, "post": _RES},
    "mbconv_sep": {"enc": ("mconv_e6k5g0",), "pre": ("mconv_e3k5g0",),
                   "dec": ("mconv_e6k5g0",), "post": ("mconv_e3k5g0",)},
    "mbconv_sep11": {"enc": ("mconv_e6k11g0",), "pre": ("mconv_e3k5g0",),
                     "dec": ("mconv_e6k11g0",), "post": ("mconv_e3k5g0",)},
    "res53_mbconv": {"enc": ("res_bnswish5", "res_bnswish"),
                     "pre": ("res_bnswish5", "res_bnswish"),
                     "dec": ("mconv_e6k5g0",), "post": ("mconv_e3k5g0",)},
    "res35_mbconv": {"enc": ("res_bnswish", "res_bnswish5"),
                     "pre": ("res_bnswish", "res_bnswish5"),
                     "dec": ("mconv_e6k5g0",), "post": ("mconv_e3k5g0",)},
    "res55_mbconv": {"enc": ("res_bnswish5", "res_bnswish5"),
                     "pre": ("res_bnswish5", "res_bnswish5"),
                     "dec": ("mconv_e6k5g0",), "post": ("mconv_e3k5g0",)},
}


@dataclasses.dataclass(frozen=True)
class NVAEConfig:
    """Architecture and objective of an NVAE model.

    Attributes:
      dataset: official dataset name (`mnist`, `cifar10`, `celeba_64`, ...),
        `fashion_mnist` (embedded default) or `image_folder`. Fixes the image
        size, the channel count and the likelihood unless overridden.
      image_size: side length fed to the network; `None` derives it from
        `dataset` (MNIST-like data: 32, the padded size).
      image_channels: 1 or 3; `None` derives it from `dataset`.
      num_channels_enc: Ce, encoder channels at the stem resolution.
      num_channels_dec: Cd, decoder channels at the output resolution.
      num_latent_scales: S, number of latent resolutions.
      num_groups_per_scale: latent groups at the finest latent scale.
      ada_groups: halve the number of groups at each coarser scale.
      min_groups_per_scale: floor on groups per scale with `ada_groups`.
      num_latent_per_group: L, latent channels per group.
      num_preprocess_blocks / num_preprocess_cells: Bpre / Cpre.
      num_postprocess_blocks / num_postprocess_cells: Bpost / Cpost.
      num_cell_per_cond_enc / num_cell_per_cond_dec: Ne / Nd, residual cells
        per latent group in the encoder / decoder tower.
      num_mixture_dec: M, logistic mixture components (1 selects the
        continuous Normal decoder of the official code).
      num_x_bits: bit depth of the modelled pixels (8, or 5 for CelebA-HQ).
      use_se: squeeze-and-excitation at the end of every residual cell.
      res_dist: residual posterior q = N(mu_p + dmu, sigma_p * dsigma).
      num_nf: pairs of autoregressive flow cells per latent group.
      arch_instance: official table of cell operations (`res_mbconv`).
      channel_mult: channel multiplier at each down-sampling step; an int for
        every step or a tuple with one entry per step
        (`num_preprocess_blocks + num_latent_scales - 1` steps).
      binary: model images as binary (Bernoulli likelihood); `None` derives it
        from `dataset` (MNIST and Omniglot).

    How batch statistics are gathered over replicas (synchronized batch
    norm) is a runtime choice: `RuntimeConfig.sync_batchnorm`.
    """

    dataset: str = datasets.DEFAULT_DATASET
    image_size: int | None = None
    image_channels: int | None = None
    num_channels_enc: int = 32
    num_channels_dec: int = 32
    num_latent_scales: int = 1
    num_groups_per_scale: int = 10
    ada_groups: bool = False
    min_groups_per_scale: int = 1
    num_latent_per_group: int = 20
    num_preprocess_blocks: int = 2
    num_preprocess_cells: int = 3
    num_postprocess_blocks: int = 2
    num_postprocess_cells: int = 3
    num_cell_per_cond_enc: int = 1
    num_cell_per_cond_dec: int = 1
    num_mixture_dec: int = 10
    num_x_bits: int = 8
    use_se: bool = False
    res_dist: bool = False
    num_nf: int = 0
    arch_instance: str = "res_mbconv"
    channel_mult: int | tuple[int, ...] = CHANNEL_MULT
    binary: bool | None = None

    def __post_init__(self):
        if isinstance(self.channel_mult, list):
            object.__setattr__(self, "channel_mult", tuple(self.channel_mult))
        self._validate()

    # ------------------------------------------------------------------ checks
    def _validate(self):
        def fail(field, value, allowed):
            raise ConfigError.invalid(field, value, allowed)

        if self.dataset not in DATASETS:
            fail("dataset", self.dataset, f"one of {', '.join(DATASETS)}")
        positive = ("num_channels_enc", "num_channels_dec", "num_latent_scales",
                    "num_groups_per_scale", "min_groups_per_scale",
                    "num_latent_per_group", "num_preprocess_cells",
                    "num_postprocess_cells", "num_mixture_dec")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                fail(name, value, "an integer >= 1")
        non_negative = ("num_preprocess_blocks", "num_postprocess_blocks",
                        "num_cell_per_cond_enc", "num_cell_per_cond_dec",
                        "num_nf")
        for name in non_negative:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                fail(name, value, "an integer >= 0")
        if self.num_preprocess_blocks != self.num_postprocess_blocks:
            fail("num_postprocess_blocks", self.num_postprocess_blocks,
                 f"the same as num_preprocess_blocks "
                 f"({self.num_preprocess_blocks}) so that the output has the "
                 "input's size")
        if not isinstance(self.num_x_bits, int) or \
                isinstance(self.num_x_bits, bool) or \
                not 1 <= self.num_x_bits <= 8:
            fail("num_x_bits", self.num_x_bits, "an integer in [1, 8]")
        for name in ("ada_groups", "use_se", "res_dist"):
            if not isinstance(getattr(self, name), bool):
                fail(name, getattr(self, name), "True or False")
        if self.binary is not None and not isinstance(self.binary, bool):
            fail("binary", self.binary, "True, False or None")
        if self.arch_instance not in ARCH_INSTANCES:
            fail("arch_instance", self.arch_instance,
                 f"one of {', '.join(ARCH_INSTANCES)}")
        if self.ada_groups and self.min_groups_per_scale > self.num_groups_per_scale:
            fail("min_groups_per_scale", self.min_groups_per_scale,
                 f"<= num_groups_per_scale ({self.num_groups_per_scale})")
        if self.image_size is not None and (
                not isinstance(self.image_size, int) or
                isinstance(self.image_size, bool) or self.image_size < 1):
            fail("image_size", self.image_size, "an integer >= 1 or None")
        if self.image_channels not in (None, 1, 3):
            fail("image_channels", self.image_channels, "1, 3 or None")
        if self.dataset == datasets.IMAGE_FOLDER and (
                self.image_size is None or self.image_channels is None):
            fail("image_size", self.image_size,
                 "an explicit image_size and image_channels for image_folder")
        if self.is_vanilla_vae:
            fail("num_groups_per_scale", self.num_groups_per_scale,
                 "> 1 when num_latent_scales is 1 (the official single-group "
                 "'vanilla VAE' branch is not supported)")
        steps = self.num_downsamplings
        mults = self.channel_mults
        if len(mults) != steps or any(
                not isinstance(m, int) or m < 1 for m in mults):
            fail("channel_mult", self.channel_mult,
                 f"a positive int or a tuple of {steps} positive ints")
        size = self.image_size_resolved
        if size % (2 ** steps) != 0:
            fail("image_size", size,
                 f"a multiple of 2**{steps} (num_preprocess_blocks + "
                 "num_latent_scales - 1 halvings)")
        for width, name in ((self.num_channels_enc, "num_channels_enc"),
                            (self.num_channels_dec, "num_channels_dec")):
            for level in range(steps):
                if (width * self.level_mult(level + 1)) % 2:
                    fail(name, width, "widths that stay even at every scale "
                         "(the factorized reduction splits channels)")
        if not self.is_binary and self.num_mixture_dec == 1 and \
                self.image_channels_resolved != 3:
            fail("num_mixture_dec", 1, "> 1 for 1-channel images (the Normal "
                 "decoder is defined for RGB)")

    # --------------------------------------------------------------- derived
    @property
    def image_size_resolved(self) -> int:
        """Side length of the network input (after MNIST padding)."""
        if self.image_size is not None:
            return self.image_size
        return datasets.DATASETS[self.dataset].network_size

    @property
    def image_channels_resolved(self) -> int:
        if self.image_channels is not None:
            return self.image_channels
        return datasets.DATASETS[self.dataset].channels

    @property
    def pads_28_to_32(self) -> bool:
        """True for MNIST-like data: 28x28 padded to 32, likelihood cropped."""
        table = datasets.DATASETS
        return (self.image_size is None and self.dataset in table
                and table[self.dataset].pads_28_to_32)

    @property
    def data_size(self) -> int:
        """Side length of the images as stored (28 for MNIST-like data)."""
        size = self.image_size_resolved
        return size - 2 * datasets.MNIST_PAD if self.pads_28_to_32 else size

    @property
    def data_shape(self) -> tuple[int, int, int]:
        return (self.data_size, self.data_size, self.image_channels_resolved)

    @property
    def is_binary(self) -> bool:
        if self.binary is not None:
            return self.binary
        table = datasets.DATASETS
        return self.dataset in table and table[self.dataset].binary

    @property
    def output_distribution(self) -> str:
        """`bernoulli`, `logistic_mixture` or `normal` (official decoders)."""
        if self.is_binary:
            return "bernoulli"
        return "normal" if self.num_mixture_dec == 1 else "logistic_mixture"

    @property
    def output_channels(self) -> int:
        """Channels of the decoder's output head (official layout)."""
        dist = self.output_distribution
        channels = self.image_channels_resolved
        if dist == "bernoulli":
            return channels
        if dist == "normal":
            return 2 * channels
        # M logits, then per colour channel M means, M log-scales and (RGB
        # only) M coupling coefficients: 10M for RGB, 3M for grayscale.
        per_colour = 3 if channels == 3 else 2
        return self.num_mixture_dec * (1 + per_colour * channels)

    @property
    def num_pixels(self) -> int:
        """Dimensions D used for bits/dim (28*28 for MNIST-like data)."""
        return self.data_size ** 2 * self.image_channels_resolved

    @property
    def is_vanilla_vae(self) -> bool:
        return self.num_latent_scales == 1 and self.num_groups_per_scale == 1

    @property
    def num_downsamplings(self) -> int:
        return self.num_preprocess_blocks + self.num_latent_scales - 1

    @property
    def channel_mults(self) -> tuple[int, ...]:
        if isinstance(self.channel_mult, int):
            return (self.channel_mult,) * self.num_downsamplings
        return tuple(self.channel_mult)

    def level_mult(self, level: int) -> int:
        """Channel multiplier after `level` down-sampling steps."""
        mult = 1
        for m in self.channel_mults[:level]:
            mult *= m
        return mult

    @property
    def groups_per_scale(self) -> tuple[int, ...]:
        """Groups per encoder scale, index 0 = finest (official order)."""
        groups, n = [], self.num_groups_per_scale
        for _ in range(self.num_latent_scales):
            groups.append(n)
            if self.ada_groups:
                n = max(self.min_groups_per_scale, n // 2)
        return tuple(groups)

    @property
    def groups_per_decoder_scale(self) -> tuple[int, ...]:
        """Groups per decoder scale, index 0 = coarsest (top-down order)."""
        return tuple(reversed(self.groups_per_scale))

    @property
    def num_groups(self) -> int:
        return sum(self.groups_per_scale)

    def latent_size(self, scale: int) -> int:
        """Spatial side of latents at encoder scale `scale` (0 = finest)."""
        return self.image_size_resolved // 2 ** (
            self.num_preprocess_blocks + scale)

    # ----------------------------------------------------------- (de)serialise
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "NVAEConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"Unknown NVAEConfig fields {unknown}; known: "
                             f"{sorted(names)}.")
        return cls(**values)

    @classmethod
    def from_json(cls, text: str) -> "NVAEConfig":
        return cls.from_dict(json.loads(text))
