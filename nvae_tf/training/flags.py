"""Command-line flags of `python -m nvae_tf.train` and their validation.

`define_flags()` defines every flag of the official NVAE `train.py` with its
name and default plus nvae_tf's own (`--model_dir`,
`--strategy`, ...). `from_flags()` is the only code that reads the flags: it
checks every value and combination and returns the
`nvae_tf.experiment.ExperimentConfig`, or raises `FlagError` naming the
offending flag, before any work starts. The config sections raise
`ConfigError`s naming a field path; `flag_name` maps a path to its flag.

`--help` lists the flags in one group per config section (`HELP_GROUPS`),
in the order of the config tree. `flag_sections` derives each flag's
section from the field it sets, so a new field's flag lands in its
section's group without a second list to keep in step.

Differences from the official flags, on purpose:
- `--batch_size` is the GLOBAL batch (all replicas and workers); the
  official one is per GPU. The official multi-process flags
  (`--num_proc_node`, `--num_process_per_node`, ranks, `--master_address`)
  are accepted at their defaults only: replicas come from `--strategy` and
  `TF_CONFIG`.
- `--data` is an alias of `--data_dir`, whose default (None) is the
  dataset's own location (the Debian package's folder for fashion_mnist,
  TFDS's data directory otherwise).
- `--cont_training` is not needed to resume (rerunning a command on the same
  `--model_dir` always resumes); it makes a missing checkpoint an error.
- `--fast_adamax` is accepted and changes nothing: there is one Adamax, with
  the official maths.
"""

from __future__ import annotations

import dataclasses
import os
import typing

from absl import flags

from nvae_tf import config as config_lib
from nvae_tf import data as data_lib
from nvae_tf import datasets
from nvae_tf.config import ConfigError, NVAEConfig
from nvae_tf.data import MODEL_IMPLIED_FIELDS
from nvae_tf.experiment import ExperimentConfig, build_section
from nvae_tf.fast.graph_options import GRAPPLER_CHOICES
from nvae_tf.layers.remat import REMAT_MODES
from nvae_tf.objectives import ObjectiveConfig
from nvae_tf.training.config import (MIXED_PRECISION, STRATEGIES,
                                     RuntimeConfig, TrainConfig)

TRISTATE = ("auto", "true", "false")
_TRISTATE_VALUES = {"auto": None, "true": True, "false": False}
# Official launch flags and the only values nvae_tf accepts for them.
_OFFICIAL_LAUNCH_DEFAULTS = {"num_proc_node": 1, "num_process_per_node": 1,
                             "node_rank": 0, "local_rank": 0,
                             "global_rank": 0}
# Flag aliases: alias -> the flag it stands for (and whose group it joins).
_ALIASES = {"data": "data_dir"}

# What each config section holds: its flags' heading in `--help`. The keys
# are the sections of `ExperimentConfig` that flags set, in the tree's order
# (`run` is computed from the data and has no flags).
SECTION_SUMMARIES = {
    "model": "the dataset, architecture and likelihood",
    "data": "where the data are and the input pipeline",
    "objective": "KL warm-up and the spectral and BN regularisation",
    "train": "optimisation, run length and seed; checkpoints, summaries, "
             "evaluation, NaN recovery and export",
    "runtime": "run directory and resuming, devices, precision, speed and "
               "memory",
}
# Flags that set no config field of the same name, and the section whose
# behaviour they concern (the run directory, the launch and the optimiser).
_SECTION_OF_OTHER_FLAGS = {
    "root": "runtime", "save": "runtime",
    **{name: "runtime" for name in _OFFICIAL_LAUNCH_DEFAULTS},
    "master_address": "runtime", "fast_adamax": "train",
}


class FlagError(ValueError):
    """A flag value or a combination of flags is invalid (names the flag)."""


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """Defines the trainer's flags on `flag_values` (absl's FLAGS)."""
    fv = dict(flag_values=flag_values)
    f = flags

    # ---- official: run directory, data, optimisation
    f.DEFINE_string("root", "/tmp/nasvae/expr",
                    "Official results root; --model_dir defaults to "
                    "ROOT/eval-SAVE.", **fv)
    f.DEFINE_string("save", "exp", "Official run id (see --root).", **fv)
    f.DEFINE_enum("dataset", datasets.DEFAULT_DATASET, list(datasets.NAMES),
                  "Dataset. fashion_mnist is the embedded default of the "
                  "quickstart (Debian package dataset-fashion-mnist); "
                  "image_folder reads PNG/JPEG files from --data_dir; the "
                  "others are read from prepared TFDS data.", **fv)
    f.DEFINE_integer("batch_size", 200,
                     "GLOBAL batch size: images per step over all replicas "
                     "and workers (the official flag is per GPU: multiply "
                     "it by the number of GPUs).", **fv)
    f.DEFINE_float("learning_rate", 1e-2, "Peak learning rate.", **fv)
    f.DEFINE_float("learning_rate_min", 1e-4,
                   "Final learning rate of the cosine decay.", **fv)
    f.DEFINE_float("weight_decay", 3e-4,
                   "Coupled L2 weight decay inside Adamax.", **fv)
    f.DEFINE_float("weight_decay_norm", 0.0,
                   "lambda of the spectral and BN regularisation (final "
                   "value when annealed); 0 switches them off.", **fv)
    f.DEFINE_float("weight_decay_norm_init", 10.0,
                   "Initial lambda of the anneal.", **fv)
    f.DEFINE_bool("weight_decay_norm_anneal", False,
                  "Anneal lambda geometrically from --weight_decay_norm_init "
                  "to --weight_decay_norm with the KL warm-up.", **fv)
    f.DEFINE_integer("epochs", 200, "Training epochs.", **fv)
    f.DEFINE_integer("warmup_epochs", 5,
                     "Epochs of linear learning-rate warm-up.", **fv)
    f.DEFINE_bool("fast_adamax", False,
                  "Accepted for compatibility: nvae_tf's Adamax is the "
                  "official algorithm either way.", **fv)
    f.DEFINE_float("kl_anneal_portion", 0.3,
                   "Fraction of the steps over which the KL coefficient "
                   "rises to 1.", **fv)
    f.DEFINE_float("kl_const_portion", 1e-4,
                   "Fraction of the steps at the KL floor.", **fv)
    f.DEFINE_float("kl_const_coeff", 1e-4, "Floor of the KL coefficient.",
                   **fv)
    # ---- official: architecture (NVAEConfig fields of the same name)
    f.DEFINE_enum("arch_instance", "res_mbconv",
                  list(config_lib.ARCH_INSTANCES),
                  "Cell operations (official table).", **fv)
    for name, default, help_text in (
            ("num_nf", 0, "Pairs of autoregressive flow cells per group."),
            ("num_x_bits", 8, "Bit depth of the modelled pixels (1..8)."),
            ("num_latent_scales", 1, "Latent scales S."),
            ("num_groups_per_scale", 10,
             "Latent groups at the finest scale."),
            ("num_latent_per_group", 20, "Latent channels per group."),
            ("min_groups_per_scale", 1, "Floor on groups with --ada_groups."),
            ("num_channels_enc", 32, "Encoder channels at the stem."),
            ("num_preprocess_blocks", 2, "Pre-process blocks."),
            ("num_preprocess_cells", 3, "Cells per pre-process block."),
            ("num_cell_per_cond_enc", 1, "Encoder cells per latent group."),
            ("num_channels_dec", 32, "Decoder channels at the output."),
            ("num_postprocess_blocks", 2, "Post-process blocks."),
            ("num_postprocess_cells", 3, "Cells per post-process block."),
            ("num_cell_per_cond_dec", 1, "Decoder cells per latent group."),
            ("num_mixture_dec", 10,
             "Logistic mixture components (1: Normal decoder).")):
        f.DEFINE_integer(name, default, help_text, **fv)
    f.DEFINE_list("channel_mult", [str(config_lib.CHANNEL_MULT)],
                  "Channel multiplier at each down-sampling step: one value "
                  "for every step (official: 2) or a comma-separated list "
                  "with one per step (num_preprocess_blocks + "
                  "num_latent_scales - 1 entries).", **fv)
    f.DEFINE_bool("ada_groups", False,
                  "Halve the groups at each coarser scale.", **fv)
    f.DEFINE_bool("use_se", False, "Squeeze-and-excitation in every cell.",
                  **fv)
    f.DEFINE_bool("res_dist", False,
                  "Residual posterior q = N(mu_p + dmu, sigma_p dsigma).",
                  **fv)
    # ---- official: resume and launch
    f.DEFINE_bool("cont_training", False,
                  "Require a checkpoint to resume (rerunning a command on "
                  "the same --model_dir resumes anyway).", **fv)
    f.DEFINE_bool("extend_run", False,
                  "Resume although --epochs, --max_steps or "
                  "--steps_per_epoch (or the batches per pass) differ from "
                  "the saved run, e.g. to extend a finished run; the LR and "
                  "KL schedules become those of the new length at the "
                  "resumed step. Without it such a resume is refused.", **fv)
    for name, default in _OFFICIAL_LAUNCH_DEFAULTS.items():
        f.DEFINE_integer(name, default,
                         "Official launcher flag; only the default is "
                         "accepted (use --strategy and TF_CONFIG).", **fv)
    f.DEFINE_string("master_address", "127.0.0.1",
                    "Official launcher flag; ignored (use TF_CONFIG).", **fv)
    f.DEFINE_integer("seed", 1, "Seed of initialisation, data order, "
                     "augmentation and latent noise.", **fv)

    # ---- nvae_tf: run, data, hardware
    f.DEFINE_string("model_dir", None,
                    "Run directory (config.json, checkpoints/, TensorBoard "
                    "events, eval_history.jsonl); default ROOT/eval-SAVE. "
                    "Rerunning on it resumes.", **fv)
    f.DEFINE_string("data_dir", None,
                    "Data folder: the Fashion-MNIST IDX files, the TFDS "
                    "data_dir, or the image folder; default: the dataset's "
                    "own location.", **fv)
    for alias, target in _ALIASES.items():
        f.DEFINE_alias(alias, target, flag_values=flag_values)
    f.DEFINE_integer("image_size", 0, "Side of image_folder images "
                     "(0: the dataset's size).", **fv)
    f.DEFINE_integer("image_channels", 0, "1 or 3 for image_folder (0: the "
                     "dataset's channels).", **fv)
    f.DEFINE_enum("binary", "auto", list(TRISTATE),
                  "Dynamically binarised data with a Bernoulli likelihood; "
                  "auto: mnist and omniglot only.", **fv)
    f.DEFINE_enum("random_flip", "auto", list(TRISTATE),
                  "Random horizontal flips of training images; auto: the "
                  "official setting of the dataset.", **fv)
    f.DEFINE_enum("image_check", "scan", list(data_lib.IMAGE_CHECKS),
                  "image_folder files that cannot be decoded: scan decodes "
                  "every file before training and stops naming the bad "
                  "ones; skip trains without them, naming each in a warning "
                  "and counting them at the end.", **fv)
    f.DEFINE_float("validation_fraction", 0.0,
                   "Share of the training split held out as a validation "
                   "split (the same images for every seed): evaluated every "
                   "epoch instead of the test split, and what tuning trials "
                   "are scored on. 0: none.", **fv)
    f.DEFINE_integer("shuffle_buffer", 10000,
                     "Examples in the training shuffle buffer.", **fv)
    f.DEFINE_bool("sync_batchnorm", True,
                  "Batch statistics over all replicas (official SyncBN).",
                  **fv)
    f.DEFINE_integer("steps_per_epoch", 0,
                     "Steps per epoch; 0: one pass over the training split.",
                     **fv)
    f.DEFINE_integer("max_steps", 0,
                     "If > 0, train this many steps instead of --epochs "
                     "epochs (the schedules are compressed to it).", **fv)
    f.DEFINE_enum("strategy", "auto", list(STRATEGIES),
                  "tf.distribute strategy; auto: multi_worker with a "
                  "multi-task TF_CONFIG, mirrored over several local "
                  "devices, else one_device.", **fv)
    f.DEFINE_enum("mixed_precision", "none", list(MIXED_PRECISION),
                  "Compute precision (float16 adds a dynamic loss scale).",
                  **fv)
    f.DEFINE_bool("jit_compile", False,
                  "XLA-compile the step (one replica; slower on CPU).", **fv)
    f.DEFINE_enum("grappler", "auto", list(GRAPPLER_CHOICES),
                  "Grappler passes of the training graphs; lean: without "
                  "the memory optimiser, TFG, layout, loop and "
                  "implementation-selector passes (on a CPU: first step "
                  "~20% less CPU, less memory, same results); default: "
                  "TensorFlow's (what GPUs need); auto: lean on a CPU-only "
                  "host, default when a GPU or TPU is visible.", **fv)
    f.DEFINE_integer("num_cpu_devices", 0,
                     "Split the CPU into this many logical devices (to run "
                     "MirroredStrategy without GPUs).", **fv)
    f.DEFINE_enum("remat", "none", list(REMAT_MODES),
                  "Recompute activations in the backward pass instead of "
                  "keeping them: none, cells (each residual cell) or groups "
                  "(each latent group's cells). Same step, less memory, "
                  "more time; see BUILD.md, 'Memory per image'.", **fv)
    f.DEFINE_bool("run_eagerly", False,
                  "Run the training step op by op instead of tracing it "
                  "(Keras' run_eagerly): for models whose traced graph "
                  "costs more host memory than their activations (the "
                  "256x256 ones, with --remat); slower for small models.",
                  **fv)
    f.DEFINE_integer("checkpoint_every_steps", 0,
                     "Checkpoint every N steps; 0: every epoch.", **fv)
    f.DEFINE_integer("keep_checkpoints", 5, "Checkpoints kept.", **fv)
    f.DEFINE_integer("summary_every_steps", 100,
                     "TensorBoard scalars and images every N steps.", **fv)
    f.DEFINE_integer("eval_every_epochs", 0,
                     "Validation-split NELBO (test split without "
                     "--validation_fraction) every N epochs; 0: official "
                     "cadence (1 if --epochs <= 50, else 20).", **fv)
    f.DEFINE_integer("max_eval_images", 0,
                     "Evaluate at most this many images of a split (0: "
                     "all); for cheap tuning trials.", **fv)
    f.DEFINE_bool("final_test_eval", True,
                  "Evaluate the test split after the last step; "
                  "--nofinal_test_eval never reads it (needs "
                  "--validation_fraction).", **fv)
    f.DEFINE_integer("num_summary_images", 16,
                     "Images per TensorBoard sample/reconstruction grid.",
                     **fv)
    f.DEFINE_integer("nan_patience", 10,
                     "Consecutive non-finite (skipped) steps before the last "
                     "checkpoint is restored with a lower learning rate.",
                     **fv)
    f.DEFINE_float("nan_lr_factor", 0.5,
                   "Learning-rate factor applied at each NaN recovery.", **fv)
    f.DEFINE_integer("max_nan_recoveries", 5,
                     "Fail after this many NaN recoveries.", **fv)
    f.DEFINE_integer("debug_inject_nan_at_step", -1,
                     "Test hook: NaN loss at steps [N, N + nan_patience) "
                     "until the first recovery; -1: off.", **fv)
    f.DEFINE_bool("export", True, "Export a SavedModel to "
                  "EXPORT_DIR_BASE/EXPORT_NAME/<step> at the end.", **fv)
    f.DEFINE_string("export_dir_base", "saved_models",
                    "Folder of exported models (TF Serving layout).", **fv)
    f.DEFINE_string("export_name", "",
                    "Serving name of the export; default: the model "
                    "directory's base name.", **fv)
    _register_help_groups(flag_values)


# Config fields whose flag has another name (the official one); every other
# field's flag is its last path component (`train.epochs` -> `--epochs`).
_FIELD_FLAGS = {"runtime.require_checkpoint": "cont_training"}


def flag_name(field: str) -> str:
    """`--flag` of a config field path (`data.batch_size` -> `--batch_size`)."""
    return "--" + _FIELD_FLAGS.get(field, field.rsplit(".", 1)[-1])


def config_sections() -> dict[str, type]:
    """The config sections that flags set and their types, in tree order."""
    types = typing.get_type_hints(ExperimentConfig)
    return {f.name: types[f.name]
            for f in dataclasses.fields(ExperimentConfig)
            if f.name in SECTION_SUMMARIES}


def _section_fields(section: str, section_type: type) -> list[str]:
    """The field paths of a section; the data fields the model implies
    belong to the model section."""
    return [f"{section}.{f.name}" for f in dataclasses.fields(section_type)
            if not (section == "data" and f.name in MODEL_IMPLIED_FIELDS)]


def flag_sections(flag_values: flags.FlagValues) -> dict[str, list[str]]:
    """Names of the trainer flags defined on `flag_values`, by section.

    A flag belongs to the section of the config field it sets (`flag_name`),
    an alias to its target's section, and the few flags that set no field
    of their name to the section they concern.

    Returns:
      {section: sorted flag names}, sections in the config tree's order.
    """
    section_of = dict(_SECTION_OF_OTHER_FLAGS)
    for section, section_type in config_sections().items():
        for field in _section_fields(section, section_type):
            name = flag_name(field)[2:]
            if section_of.setdefault(name, section) != section:
                raise ValueError(f"--{name} would belong to two sections: "
                                 f"{section_of[name]} and {section}.")
    for alias, target in _ALIASES.items():
        section_of[alias] = section_of[target]
    groups = {section: [] for section in SECTION_SUMMARIES}
    for name, section in section_of.items():
        if name in flag_values:
            groups[section].append(name)
    return {section: sorted(names) for section, names in groups.items()}


def help_group(section: str) -> str:
    """The `--help` heading of a section's flags."""
    return f"{section} ({SECTION_SUMMARIES[section]})"


# The `--help` headings of the trainer's flags, in the config tree's order.
HELP_GROUPS = tuple(help_group(section) for section in SECTION_SUMMARIES)


def _register_help_groups(flag_values: flags.FlagValues) -> None:
    """Makes each trainer flag a key flag of its section's help group (the
    name `--help` lists it under; see `flagfiles.command_line`)."""
    for section, names in flag_sections(flag_values).items():
        for name in names:
            flag_values.register_key_flag_for_module(help_group(section),
                                                     flag_values[name])


def flag_error(err: ConfigError) -> FlagError:
    """A config error as a flag error: the field's flag, then the message."""
    return FlagError(f"{flag_name(err.field)}: {err.message}")


def _check(condition: bool, flag: str, value, expected: str) -> None:
    if not condition:
        raise flag_error(ConfigError.invalid(flag, value, expected))


def _check_official_launch_flags(fv) -> None:
    for name, default in _OFFICIAL_LAUNCH_DEFAULTS.items():
        value = fv[name].value
        if value == default:
            continue
        hint = ""
        if name in ("num_proc_node", "num_process_per_node"):
            gpus = fv.num_proc_node * fv.num_process_per_node
            hint = (f" nvae_tf's --batch_size is the global batch: for this "
                    f"official command pass --batch_size="
                    f"{fv.batch_size * gpus} (per-GPU {fv.batch_size} x "
                    f"{gpus} GPUs) and drop --{name}.")
        raise FlagError(
            f"--{name}={value} is not supported: nvae_tf does not launch "
            "one process per GPU. Replicas come from --strategy (all local "
            "GPUs with mirrored; several machines with multi_worker and "
            f"TF_CONFIG, see README).{hint}")


def _channel_mult(values):
    """--channel_mult as NVAEConfig.channel_mult (int or tuple of ints)."""
    try:
        mults = tuple(int(v) for v in values)
    except ValueError as err:
        raise FlagError(f"--channel_mult={','.join(values)}: expected "
                        "positive integers.") from err
    if not mults:
        raise FlagError("--channel_mult is empty: expected one or more "
                        "positive integers.")
    return mults[0] if len(mults) == 1 else mults


def from_flags(fv: flags.FlagValues = flags.FLAGS) -> ExperimentConfig:
    """The validated experiment configuration of parsed flags.

    The run length is not resolved yet (`run` is None; the objective's
    `total_steps` is 1): it depends on the training split's size, and
    `ExperimentConfig.resolved` completes it once the data are opened.

    Raises:
      FlagError: naming the flag whose value or combination is invalid.
    """
    _check_official_launch_flags(fv)
    _check(fv.image_size >= 0, "image_size", fv.image_size, "an integer >= 0")
    _check(fv.image_channels in (0, 1, 3), "image_channels",
           fv.image_channels, "0 (the dataset's), 1 or 3")
    folder = fv.dataset == datasets.IMAGE_FOLDER
    if folder:
        _check(fv.data_dir is not None, "data_dir", fv.data_dir,
               "the folder of images with --dataset=image_folder")
        _check(fv.image_size > 0, "image_size", fv.image_size,
               "a positive size with --dataset=image_folder")
        _check(fv.image_channels > 0, "image_channels", fv.image_channels,
               "1 or 3 with --dataset=image_folder")
    else:
        for name in ("image_size", "image_channels"):
            _check(fv[name].value == 0, name, fv[name].value,
                   f"0 unless --dataset=image_folder ({fv.dataset} has a "
                   "fixed stored size)")
    binary = _TRISTATE_VALUES[fv.binary]
    if binary and fv.num_x_bits != 8:
        raise FlagError(f"--num_x_bits={fv.num_x_bits} with --binary=true: "
                        "binary images have one bit; leave --num_x_bits=8.")

    def values_of(section_type, skip=()):
        return {f.name: fv[f.name].value
                for f in dataclasses.fields(section_type)
                if f.name in fv and f.name not in skip}

    try:
        model = build_section("model", NVAEConfig, {
            **values_of(NVAEConfig, skip=("image_size", "image_channels",
                                          "binary", "channel_mult")),
            "image_size": fv.image_size if folder else None,
            "image_channels": fv.image_channels if folder else None,
            "binary": binary, "channel_mult": _channel_mult(fv.channel_mult)})
        objective = build_section("objective", ObjectiveConfig,
                                  values_of(ObjectiveConfig,
                                            skip=("total_steps",)))
        train = build_section("train", TrainConfig, values_of(TrainConfig))
        runtime = build_section("runtime", RuntimeConfig, dict(
            model_dir=fv.model_dir or os.path.join(fv.root,
                                                   f"eval-{fv.save}"),
            strategy=fv.strategy, mixed_precision=fv.mixed_precision,
            jit_compile=fv.jit_compile, num_cpu_devices=fv.num_cpu_devices,
            sync_batchnorm=fv.sync_batchnorm, grappler=fv.grappler,
            require_checkpoint=fv.cont_training, remat=fv.remat,
            run_eagerly=fv.run_eagerly, extend_run=fv.extend_run))
        return ExperimentConfig.for_model(
            model, objective=objective, train=train, runtime=runtime,
            data=dict(data_dir=fv.data_dir, batch_size=fv.batch_size,
                      shuffle_buffer=fv.shuffle_buffer,
                      validation_fraction=fv.validation_fraction,
                      random_flip=_TRISTATE_VALUES[fv.random_flip],
                      image_check=fv.image_check))
    except ConfigError as err:
        raise flag_error(err) from err
