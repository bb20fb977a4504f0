"""The architecture search space: which NVAEConfig fields vary, and how.

A space maps a hyper-parameter name to a list of choices, or to a range
`{"min": a, "max": b[, "step": s][, "sampling": "log"]}` (integers when both
bounds are integers, else floats). Names are NVAEConfig fields or the
recipe's trainer flags in `RECIPE_FLAGS` (learning rate, batch, KL and
weight-decay schedule), so a winning trial pastes back as training flags,
plus two derived ones:

- `decoder_width_mult`: `num_channels_dec = num_channels_enc * value` (the
  base width is `num_channels_enc`);
- `channel_mult_<i>`: the channel multiplier of down-sampling step i (the
  per-scale `channel_mult`), for i < num_preprocess_blocks +
  num_latent_scales - 1 of the base configuration.

Load a custom space with `load_space(path)` from a JSON file of that form.
"""

from __future__ import annotations

import dataclasses
import json

from nvae_tf.config import NVAEConfig

DEFAULT_SPACE = {
    "num_channels_enc": [8, 16, 32],
    "decoder_width_mult": [1, 2],
    "channel_mult": [1, 2],  # expanded to channel_mult_<i> per step
    "num_cell_per_cond_enc": [1, 2],
    "num_cell_per_cond_dec": [1, 2],
    "num_preprocess_cells": [1, 2],
    "num_postprocess_cells": [1, 2],
    "num_groups_per_scale": [2, 4],
}
_DERIVED = ("decoder_width_mult", "channel_mult")
_FIELDS = {f.name for f in dataclasses.fields(NVAEConfig)}
# Trainer flags of the training recipe that a space may search beside the
# architecture (the learning rate matters as much as the width on a short
# budget). Each is a flag of `python -m nvae_tf.train` of the same name; the
# trainer validates the values a trial gets.
RECIPE_FLAGS = ("learning_rate", "learning_rate_min", "weight_decay",
                "warmup_epochs", "batch_size", "kl_anneal_portion",
                "kl_const_portion", "kl_const_coeff", "weight_decay_norm")


def load_space(path: str | None) -> dict:
    """The default space, or the JSON space in `path` (replaces it whole)."""
    if not path:
        return dict(DEFAULT_SPACE)
    with open(path) as f:
        try:
            space = json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"--search_space={path}: not valid JSON "
                             f"({err}).") from err
    validate_space(space, source=path)
    return space


def validate_space(space: dict, source: str = "space") -> None:
    if not isinstance(space, dict) or not space:
        raise ValueError(f"{source}: expected a non-empty JSON object.")
    for name, spec in space.items():
        if (name not in _FIELDS and name not in _DERIVED
                and name not in RECIPE_FLAGS):
            raise ValueError(
                f"{source}: {name!r} is neither an NVAEConfig field, one of "
                f"{_DERIVED} nor a recipe flag {RECIPE_FLAGS}.")
        if isinstance(spec, list):
            if not spec:
                raise ValueError(f"{source}: {name} has no choices.")
        elif not (isinstance(spec, dict) and {"min", "max"} <= set(spec)):
            raise ValueError(f"{source}: {name} must be a list of choices or "
                             "{'min': a, 'max': b[, 'step': s]"
                             "[, 'sampling': 'log']}.")


def _define(hp, name, spec):
    if isinstance(spec, list):
        return hp.Choice(name, spec)
    sampling = spec.get("sampling", "linear")
    if isinstance(spec["min"], int) and isinstance(spec["max"], int):
        return hp.Int(name, spec["min"], spec["max"],
                      step=spec.get("step", 1), sampling=sampling)
    return hp.Float(name, spec["min"], spec["max"], step=spec.get("step"),
                    sampling=sampling)


def sample_config(hp, space: dict, base: NVAEConfig) -> NVAEConfig:
    """Registers the space in `hp` and returns `base` with its values."""
    values = {}
    for name, spec in space.items():
        if name == "channel_mult":
            steps = base.num_downsamplings
            mults = tuple(_define(hp, f"channel_mult_{i}", spec)
                          for i in range(steps))
            values["channel_mult"] = mults
        elif name != "decoder_width_mult" and name not in RECIPE_FLAGS:
            values[name] = _define(hp, name, spec)
    config = dataclasses.replace(base, **values)
    if "decoder_width_mult" in space:
        mult = _define(hp, "decoder_width_mult", space["decoder_width_mult"])
        config = dataclasses.replace(
            config, num_channels_dec=config.num_channels_enc * mult)
    return config


def sample_recipe(hp, space: dict) -> dict:
    """Registers the space's recipe flags in `hp`; returns their values."""
    return {name: _define(hp, name, spec) for name, spec in space.items()
            if name in RECIPE_FLAGS}


def searched_fields(space: dict) -> list[str]:
    """The NVAEConfig fields a space sets."""
    names = [n for n in space if n not in _DERIVED and n not in RECIPE_FLAGS]
    if "decoder_width_mult" in space:
        names.append("num_channels_dec")
    if "channel_mult" in space:
        names.append("channel_mult")
    return names


def searched_flags(space: dict) -> list[str]:
    """The trainer flags a space sets (architecture and recipe)."""
    return searched_fields(space) + [n for n in space if n in RECIPE_FLAGS]


def training_flags(config: NVAEConfig, space: dict,
                   recipe: dict | None = None) -> list[str]:
    """`--flag=value` lines for the searched fields of `config` and the
    searched recipe flags' values in `recipe` (`sample_recipe`)."""
    lines = [f"--{name}={value}" for name, value in (recipe or {}).items()]
    for name in searched_fields(space):
        value = getattr(config, name)
        if isinstance(value, bool):
            lines.append(f"--{name}" if value else f"--no{name}")
        elif isinstance(value, tuple):
            lines.append(f"--{name}={','.join(str(v) for v in value)}")
        else:
            lines.append(f"--{name}={value}")
    return lines
