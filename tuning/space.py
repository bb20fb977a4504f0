"""The architecture search space: which NVAEConfig fields vary, and how.

A space maps a hyper-parameter name to a list of choices, or to
`{"min": a, "max": b, "step": s}` for an integer range. Names are NVAEConfig
fields (so a winning trial pastes back as training flags), plus two derived
ones:

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
        if name not in _FIELDS and name not in _DERIVED:
            raise ValueError(
                f"{source}: {name!r} is neither an NVAEConfig field nor one "
                f"of {_DERIVED}.")
        if isinstance(spec, list):
            if not spec:
                raise ValueError(f"{source}: {name} has no choices.")
        elif not (isinstance(spec, dict) and {"min", "max"} <= set(spec)):
            raise ValueError(f"{source}: {name} must be a list of choices or "
                             "{'min': a, 'max': b[, 'step': s]}.")


def _define(hp, name, spec):
    if isinstance(spec, list):
        return hp.Choice(name, spec)
    return hp.Int(name, spec["min"], spec["max"], step=spec.get("step", 1))


def sample_config(hp, space: dict, base: NVAEConfig) -> NVAEConfig:
    """Registers the space in `hp` and returns `base` with its values."""
    values = {}
    for name, spec in space.items():
        if name == "channel_mult":
            steps = base.num_downsamplings
            mults = tuple(_define(hp, f"channel_mult_{i}", spec)
                          for i in range(steps))
            values["channel_mult"] = mults
        elif name != "decoder_width_mult":
            values[name] = _define(hp, name, spec)
    config = dataclasses.replace(base, **values)
    if "decoder_width_mult" in space:
        mult = _define(hp, "decoder_width_mult", space["decoder_width_mult"])
        config = dataclasses.replace(
            config, num_channels_dec=config.num_channels_enc * mult)
    return config


def searched_fields(space: dict) -> list[str]:
    """The NVAEConfig fields a space sets."""
    names = [n for n in space if n not in _DERIVED]
    if "decoder_width_mult" in space:
        names.append("num_channels_dec")
    if "channel_mult" in space:
        names.append("channel_mult")
    return names


def training_flags(config: NVAEConfig, space: dict) -> list[str]:
    """`--flag=value` lines for the searched fields of `config`."""
    lines = []
    for name in searched_fields(space):
        value = getattr(config, name)
        if isinstance(value, bool):
            lines.append(f"--{name}" if value else f"--no{name}")
        elif isinstance(value, tuple):
            lines.append(f"--{name}={','.join(str(v) for v in value)}")
        else:
            lines.append(f"--{name}={value}")
    return lines
