"""The configuration tree of an NVAE experiment, saved as config.json.

`ExperimentConfig` gathers every setting of a run in sections named after
what they configure, as TF Model Garden's `ExperimentConfig` does:

    model      NVAEConfig       the architecture and likelihood
    data       DataConfig       the input pipeline (its dataset, sizes, bits
                                and binarisation are the model's)
    objective  ObjectiveConfig  KL warm-up and regularisation
    train      TrainConfig      optimisation, seed, cadences
    runtime    RuntimeConfig    devices, precision, synchronized BN, graphs
    run        RunLength        step counts, resolved from the data (or None)

Each fact has one owner: the data section stores only the pipeline's own
settings and takes the rest from the model; `resolved()` computes the run
length and the objective's `total_steps` once. The trainer saves the tree
to MODEL_DIR/config.json, and resume, evaluation, export, conversion and
tuning read it back with `from_dict`, which also reads the earlier format
(see `migrate`). Errors are `ConfigError`s whose `field` is the path, e.g.
`train.epochs`.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from nvae_tf.config import ConfigError, NVAEConfig
from nvae_tf.data import MODEL_IMPLIED_FIELDS, DataConfig
from nvae_tf.fast import graph_options
from nvae_tf.objectives import ObjectiveConfig
from nvae_tf.training.config import RunLength, RuntimeConfig, TrainConfig

FORMAT_VERSION = 2  # 1: config.json of the five flat sections (before).
_SECTION_TYPES = {"objective": ObjectiveConfig, "train": TrainConfig,
                  "runtime": RuntimeConfig, "run": RunLength}


def build_section(name: str, cls, values: dict[str, Any]):
    """`cls(**values)`, its errors' field paths starting with `name.`."""
    unknown = sorted(set(values) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise ConfigError(name, f"unknown fields {unknown}.")
    try:
        return cls(**values)
    except ConfigError as err:
        raise err.within(name) from None


# The data section's own settings (the rest is implied by the model).
_DATA_SETTINGS = tuple(f.name for f in dataclasses.fields(DataConfig)
                       if f.name not in MODEL_IMPLIED_FIELDS)


def _data_settings(data: DataConfig) -> dict[str, Any]:
    return {name: getattr(data, name) for name in _DATA_SETTINGS}


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    """Every setting of a run (module docstring).

    Attributes:
      model: the architecture.
      data: the input pipeline; its dataset facts must be the model's.
      objective: KL warm-up and regularisation.
      train: optimisation and bookkeeping.
      runtime: devices and speed settings.
      run: the resolved step counts; None until `resolved()`.
    """

    model: NVAEConfig
    data: DataConfig
    objective: ObjectiveConfig = dataclasses.field(
        default_factory=ObjectiveConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    runtime: RuntimeConfig = dataclasses.field(default_factory=RuntimeConfig)
    run: RunLength | None = None

    def __post_init__(self):
        implied = DataConfig.from_model_config(self.model,
                                               **_data_settings(self.data))
        for name in MODEL_IMPLIED_FIELDS:
            if getattr(implied, name) != getattr(self.data, name):
                raise ConfigError(
                    f"data.{name}",
                    f"{getattr(self.data, name)!r} differs from the model's "
                    f"{getattr(implied, name)!r}; build the data section "
                    "with DataConfig.from_model_config.")
        if not self.train.final_test_eval and \
                not self.data.validation_fraction:
            raise ConfigError(
                "train.final_test_eval",
                "False needs a validation split (validation_fraction > 0)"
                ": without one, every evaluation is of the test split.")
        if self.run is not None and \
                self.objective.total_steps != self.run.total_steps:
            raise ConfigError(
                "objective.total_steps",
                f"{self.objective.total_steps} differs from run.total_steps "
                f"({self.run.total_steps}).")

    @classmethod
    def for_model(cls, model: NVAEConfig, **sections) -> ExperimentConfig:
        """The experiment of `model`: the data it implies (with the
        settings of a `data` dict, if given) and default other sections."""
        settings = sections.pop("data", {})
        unknown = sorted(set(settings) - set(_DATA_SETTINGS))
        if unknown:
            raise ConfigError("data", f"unknown or model-implied fields "
                              f"{unknown}; the data section sets "
                              f"{', '.join(_DATA_SETTINGS)}.")
        try:
            data = DataConfig.from_model_config(model, **settings)
        except ConfigError as err:
            raise err.within("data") from None
        return cls(model=model, data=data, **sections)

    def resolved(self, batches_per_pass: int, **facts) -> ExperimentConfig:
        """This experiment with the run length over a training split of
        `batches_per_pass` batches (and `facts`: split sizes, replicas), the
        objective's `total_steps` and the Grappler preset resolved."""
        run = RunLength.resolve(self.train, batches_per_pass, **facts)
        runtime = dataclasses.replace(
            self.runtime,
            grappler=graph_options.resolve_grappler(self.runtime.grappler))
        return dataclasses.replace(
            self, run=run, runtime=runtime,
            objective=dataclasses.replace(self.objective,
                                          total_steps=run.total_steps))

    # ----------------------------------------------------------- (de)serialise
    def to_dict(self) -> dict[str, Any]:
        sections = {"version": FORMAT_VERSION, "model": self.model.to_dict(),
                    "data": _data_settings(self.data)}
        for name in _SECTION_TYPES:
            value = getattr(self, name)
            if value is not None:
                sections[name] = dataclasses.asdict(value)
        return sections

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, sections: dict[str, Any]) -> ExperimentConfig:
        """Reads `to_dict`'s output, or a config.json of the earlier format.

        Sections other than `model` may be missing (a converted official
        checkpoint has only `model`): they take their defaults. Keys that
        are not sections (e.g. `source`) are ignored.
        """
        sections = migrate(sections)
        if "model" not in sections:
            raise ConfigError("model", "the section is missing.")
        try:
            model = NVAEConfig.from_dict(sections["model"])
        except ConfigError as err:
            raise err.within("model") from None
        others = {name: build_section(name, section_type, sections[name])
                  for name, section_type in _SECTION_TYPES.items()
                  if sections.get(name) is not None}
        return cls.for_model(model, data=dict(sections.get("data", {})),
                             **others)

    @classmethod
    def from_json(cls, text: str) -> ExperimentConfig:
        return cls.from_dict(json.loads(text))

    def differences(self, other: ExperimentConfig) -> list[tuple[str, Any,
                                                                 Any]]:
        """[(field path, this value, other's value)] where they differ."""
        mine, theirs = _flatten(self.to_dict()), _flatten(other.to_dict())
        return [(path, mine.get(path), theirs.get(path))
                for path in sorted(set(mine) | set(theirs))
                if mine.get(path) != theirs.get(path)]


def _flatten(sections: dict[str, Any]) -> dict[str, Any]:
    flat = {}
    for name, section in sections.items():
        if isinstance(section, dict):
            flat.update({f"{name}.{k}": v for k, v in section.items()})
        else:
            flat[name] = section
    return flat


def migrate(sections: dict[str, Any]) -> dict[str, Any]:
    """config.json of format 1 (no `version`) -> format 2; a copy.

    Format 1 kept synchronized batch norm in `model` (now `runtime`), the
    batch size in both `train` and `data` (now `data`), the seed in both
    (now `train`) and the model's dataset facts in `data` too; its
    `runtime.train_shards` (a removed CPU-only option that did not change
    the function) is dropped.
    """
    sections = {name: dict(value) if isinstance(value, dict) else value
                for name, value in sections.items()}
    if sections.get("version", 1) >= FORMAT_VERSION:
        return sections
    model = sections.get("model", {})
    data = sections.setdefault("data", {})
    train = sections.get("train")
    if "sync_batchnorm" in model:
        sync = model.pop("sync_batchnorm")
        if "runtime" in sections:
            sections["runtime"]["sync_batchnorm"] = sync
    if isinstance(sections.get("runtime"), dict):
        sections["runtime"].pop("train_shards", None)
    if train is not None:
        batch_size = train.pop("batch_size", None)
        if batch_size is not None:
            data.setdefault("batch_size", batch_size)
        seed = data.pop("seed", None)
        if seed is not None:
            train.setdefault("seed", seed)
    data.pop("seed", None)
    for name in MODEL_IMPLIED_FIELDS:
        data.pop(name, None)
    sections["version"] = FORMAT_VERSION
    return sections
