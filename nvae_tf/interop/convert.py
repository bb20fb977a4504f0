"""Loads official NVAE PyTorch checkpoints into nvae_tf.

`load_official_checkpoint(path)` reads a `checkpoint.pt` written by the
official `train.py` (without needing PyTorch), builds the matching
`NVAEConfig` from its `args`, and copies every state_dict entry onto the
model's variables (NCHW -> NHWC activations, OIHW -> HWIO kernels). Every
entry is either mapped or reported: missing, unexpected or mis-shaped entries
raise.

CLI: python -m nvae_tf.convert --checkpoint=checkpoint.pt --model_dir=DIR
writes a model directory that `nvae_tf.train` (resume), `nvae_tf.evaluate`
and `nvae_tf.export` read. It never replaces a run: a model_dir that holds a
config or checkpoints is refused unless `--overwrite`, which moves the old
run aside to DIR.replaced-<time>.
"""

from __future__ import annotations

import argparse
import json
import sys

from absl import flags
from absl import logging
import numpy as np

from nvae_tf import cli as cli_lib
from nvae_tf.config import ARCH_INSTANCES, DATASETS, NVAEConfig
from nvae_tf.interop import torch_pickle
from nvae_tf.training import checkpoints

# `args` fields copied one to one into NVAEConfig, with the defaults that
# official evaluate.py assumes for old checkpoints that lack them.
_ARG_DEFAULTS = {"ada_groups": False, "min_groups_per_scale": 1,
                 "num_mixture_dec": 10, "num_x_bits": 8, "num_nf": 0,
                 "arch_instance": "res_mbconv", "use_se": False,
                 "res_dist": False}
_ARG_FIELDS = ("dataset", "num_channels_enc", "num_channels_dec",
               "num_latent_scales", "num_groups_per_scale",
               "num_latent_per_group", "num_preprocess_blocks",
               "num_preprocess_cells", "num_postprocess_blocks",
               "num_postprocess_cells", "num_cell_per_cond_enc",
               "num_cell_per_cond_dec") + tuple(_ARG_DEFAULTS)
_IGNORED_SUFFIXES = ("num_batches_tracked",)


# Keys named in a mismatch message; the rest are counted.
_KEYS_SHOWN = 5


class CheckpointMismatchError(ValueError):
    """The checkpoint's state_dict does not fit the model built from args."""


class UnsupportedCheckpointError(ValueError):
    """The file is a PyTorch checkpoint, but not one nvae_tf can rebuild."""


def _some(keys):
    """`keys` in a message: the first `_KEYS_SHOWN`, then a count."""
    keys = list(keys)
    if len(keys) <= _KEYS_SHOWN:
        return str(keys)
    return f"{keys[:_KEYS_SHOWN]} and {len(keys) - _KEYS_SHOWN} more"


def config_from_args(args) -> NVAEConfig:
    """NVAEConfig from an official `argparse.Namespace` (or dict)."""
    values = dict(vars(args)) if isinstance(args, argparse.Namespace) \
        else dict(args)
    missing = [f for f in _ARG_FIELDS
               if f not in values and f not in _ARG_DEFAULTS]
    if missing:
        raise UnsupportedCheckpointError(
            f"Checkpoint args lack {missing}; is this an official NVAE "
            "checkpoint?")
    if values.get("arch_instance", "res_mbconv") not in ARCH_INSTANCES:
        raise UnsupportedCheckpointError(
            f"arch_instance {values['arch_instance']!r} is not supported; "
            f"supported: {sorted(ARCH_INSTANCES)}.")
    if values["dataset"] not in DATASETS:
        raise UnsupportedCheckpointError(
            f"dataset {values['dataset']!r} is not supported (the official "
            "code cannot build stacked_mnist either).")
    fields = {f: values.get(f, _ARG_DEFAULTS.get(f)) for f in _ARG_FIELDS}
    return NVAEConfig(**fields)


# ------------------------------------------------------------------ mapping
def _conv_kernel(layer, value):
    # [O, I/g, kh, kw] -> [kh, kw, I, O], depthwise [C, 1, kh, kw] -> [kh, kw, C, 1]
    return value.transpose((2, 3, 0, 1) if layer.depthwise else (2, 3, 1, 0))


def _conv_entries(prefix, layer):
    entries = {f"{prefix}.weight": (layer.kernel,
                                    lambda v, l=layer: _conv_kernel(l, v))}
    if layer.use_bias:
        entries[f"{prefix}.bias"] = (layer.bias, None)
    if layer.weight_norm:
        entries[f"{prefix}.log_weight_norm"] = (
            layer.log_weight_norm, lambda v: v.reshape(-1))
    else:
        entries[f"{prefix}.weight_normalized"] = (None, None)  # alias
    return entries


def _bn_entries(prefix, layer):
    return {f"{prefix}.weight": (layer.gamma, None),
            f"{prefix}.bias": (layer.beta, None),
            f"{prefix}.running_mean": (layer.moving_mean, None),
            f"{prefix}.running_var": (layer.moving_variance, None)}


def _dense_entries(prefix, layer):
    return {f"{prefix}.weight": (layer.kernel, lambda v: v.T),
            f"{prefix}.bias": (layer.bias, None)}


def _op_entries(prefix, op, upsampling):
    if hasattr(op, "bn") and hasattr(op, "conv") and not hasattr(op, "expand"):
        # BNSwishConv
        return {**_bn_entries(f"{prefix}.bn_act", op.bn),
                **_conv_entries(f"{prefix}.conv_0", op.conv)}
    o = 1 if upsampling else 0  # the nearest up-sampling takes index 0
    p = f"{prefix}.conv"
    return {**_bn_entries(f"{p}.{o}.bn", op.bn_in),
            **_conv_entries(f"{p}.{o + 1}.conv.0", op.expand.conv),
            **_bn_entries(f"{p}.{o + 1}.conv.1", op.expand.bn),
            **_conv_entries(f"{p}.{o + 2}.conv.0", op.depthwise.conv),
            **_bn_entries(f"{p}.{o + 2}.conv.1", op.depthwise.bn),
            **_conv_entries(f"{p}.{o + 3}", op.project),
            **_bn_entries(f"{p}.{o + 4}.bn", op.bn_out)}


def _cell_entries(prefix, cell):
    entries = {}
    for j, op in enumerate(cell.ops):
        entries.update(_op_entries(f"{prefix}._ops.{j}", op,
                                   upsampling=j == 0 and cell.upsample))
    if cell.strides == 2:
        for i, conv in enumerate(cell.skip.convs):
            entries.update(_conv_entries(f"{prefix}.skip.conv_{i + 1}", conv))
    elif cell.upsample:
        entries.update(_conv_entries(f"{prefix}.skip.1", cell.skip.conv))
    if cell.se is not None:
        entries.update(_dense_entries(f"{prefix}.se.se.0", cell.se.squeeze))
        entries.update(_dense_entries(f"{prefix}.se.se.2", cell.se.excite))
    return entries


def _flow_entries(prefix, flow):
    entries = {}
    for name in ("cell1", "cell2"):
        cell = getattr(flow, name)
        p = f"{prefix}.{name}"
        entries.update(_conv_entries(f"{p}.conv.convz.0", cell.conv_in))
        entries.update(_conv_entries(f"{p}.conv.convz.2", cell.conv_depthwise))
        entries.update(_conv_entries(f"{p}.mu.conv_0", cell.conv_mu))
    return entries


def official_variable_map(model):
    """official state_dict key -> (variable or None for aliases, transform)."""
    c = model.config
    entries = {"prior_ftr0": (model.prior_ftr0,
                              lambda v: v.transpose(1, 2, 0))}
    entries.update(_conv_entries("stem", model.stem))
    for i, cell in enumerate(model.preprocess):
        entries.update(_cell_entries(f"pre_process.{i}", cell))
    index, cells = 0, iter(model.encoder_cells)
    combiners = iter(model.encoder_combiners)
    for scale in range(c.num_latent_scales):
        for g in range(c.groups_per_scale[scale]):
            for _ in range(c.num_cell_per_cond_enc):
                entries.update(_cell_entries(f"enc_tower.{index}", next(cells)))
                index += 1
            last = scale == c.num_latent_scales - 1 and \
                g == c.groups_per_scale[scale] - 1
            if not last:
                entries.update(_conv_entries(f"enc_tower.{index}.conv",
                                             next(combiners).conv))
                index += 1
        if scale < c.num_latent_scales - 1:
            entries.update(_cell_entries(f"enc_tower.{index}",
                                         model.encoder_down_cells[scale]))
            index += 1
    entries.update(_conv_entries("enc0.1", model.enc0))
    for k, sampler in enumerate(model.encoder_samplers):
        entries.update(_conv_entries(f"enc_sampler.{k}", sampler))
    for k, sampler in enumerate(model.decoder_samplers):
        entries.update(_conv_entries(f"dec_sampler.{k}.1", sampler))
    for i, flow in enumerate(model.flows):
        entries.update(_flow_entries(f"nf_cells.{i}", flow))
    index, cells, k = 0, iter(model.decoder_cells), 0
    for scale, groups in enumerate(c.groups_per_decoder_scale):
        for _ in range(groups):
            if k > 0:
                for _ in range(c.num_cell_per_cond_dec):
                    entries.update(_cell_entries(f"dec_tower.{index}",
                                                 next(cells)))
                    index += 1
            entries.update(_conv_entries(f"dec_tower.{index}.conv",
                                         model.decoder_combiners[k].conv))
            index += 1
            k += 1
        if scale < c.num_latent_scales - 1:
            entries.update(_cell_entries(f"dec_tower.{index}",
                                         model.decoder_up_cells[scale]))
            index += 1
    for i, cell in enumerate(model.postprocess):
        entries.update(_cell_entries(f"post_process.{i}", cell))
    entries.update(_conv_entries("image_conditional.1", model.image_head))
    return entries


def assign_official_weights(model, state_dict):
    """Copies an official state_dict onto `model` (built), strictly."""
    entries = official_variable_map(model)
    keys = {k for k in state_dict if not k.endswith(_IGNORED_SUFFIXES)}
    aliases = {k for k, (var, _) in entries.items() if var is None}
    missing = sorted(set(entries) - keys - aliases)
    unexpected = sorted(keys - set(entries))
    problems = []
    if missing:
        problems.append(f"missing keys {_some(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_some(unexpected)}")
    assigned = set()
    for key in sorted(keys & set(entries)):
        variable, transform = entries[key]
        if variable is None:
            continue
        value = np.asarray(state_dict[key], np.float32)
        if transform is not None:
            value = transform(value)
        if tuple(value.shape) != tuple(variable.shape):
            problems.append(f"{key}: checkpoint shape {value.shape} after "
                            f"layout conversion, model shape "
                            f"{tuple(variable.shape)}")
            continue
        variable.assign(value)
        assigned.add(id(variable))
    unassigned = [v.path for v in model.trainable_variables
                  if id(v) not in assigned]
    if unassigned and not problems:
        problems.append(f"model variables without a checkpoint entry "
                        f"{_some(unassigned)}")
    if problems:
        raise CheckpointMismatchError(
            "The checkpoint's weights do not fit the model built from its "
            "args (was it written by a modified NVAE code?): "
            + "; ".join(problems))
    return len(assigned)


def load_official_checkpoint(path):
    """Reads an official NVAE checkpoint.

    Args:
      path: a `checkpoint.pt` of the official `train.py`.

    Returns:
      (model, config): the built `NVAE` holding the checkpoint's weights, and
      its `NVAEConfig`.

    Raises:
      FileNotFoundError: no file at `path`.
      torch_pickle.ForbiddenGlobalError: the pickle references code that a
        weights file has no need of; nothing of it is run.
      torch_pickle.CheckpointFormatError: not a readable PyTorch checkpoint.
      UnsupportedCheckpointError: not an NVAE checkpoint nvae_tf rebuilds.
      CheckpointMismatchError: the weights do not fit the model of its args.
    """
    from nvae_tf.model import NVAE  # pylint: disable=import-outside-toplevel
    checkpoint = torch_pickle.load_torch_checkpoint(path)
    for key in ("state_dict", "args"):
        if not isinstance(checkpoint, dict) or key not in checkpoint:
            raise UnsupportedCheckpointError(
                f"{path} has no {key!r} entry; official NVAE checkpoints "
                "hold 'state_dict' and 'args'.")
    config = config_from_args(checkpoint["args"])
    model = NVAE(config)
    model.build()
    assign_official_weights(model, checkpoint["state_dict"])
    return model, config


# Errors of a checkpoint that cannot be converted: the user's to fix.
CHECKPOINT_ERRORS = (torch_pickle.ForbiddenGlobalError,
                     torch_pickle.CheckpointFormatError,
                     UnsupportedCheckpointError, CheckpointMismatchError)


def convert_to_model_dir(checkpoint, model_dir, overwrite=False):
    """Converts an official checkpoint into a new model directory.

    The checkpoint is read and checked before `model_dir` is touched.

    Args:
      checkpoint: an official `checkpoint.pt`.
      model_dir: the nvae_tf model directory to write.
      overwrite: if `model_dir` already holds a run (a config or
        checkpoints), move it to `<model_dir>.replaced-<time>` first.

    Returns:
      (checkpoint path written, `NVAEConfig`, path the old run was moved to
      or None).

    Raises:
      cli.UserError: `model_dir` holds a run and `overwrite` is False, or
        the checkpoint cannot be converted (the cause is chained).
      FileNotFoundError: no file at `checkpoint`.
    """
    found = checkpoints.existing_run(model_dir)
    if found and not overwrite:
        raise cli_lib.UserError(
            f"--model_dir={model_dir} already holds a run "
            f"({', '.join(found)}); not converted. Pass a new --model_dir, "
            f"or --overwrite to move that run to "
            f"{model_dir.rstrip('/')}{checkpoints.REPLACED_SUFFIX}<time>.")
    try:
        model, config = load_official_checkpoint(checkpoint)
    except CHECKPOINT_ERRORS as err:
        message = str(err) if str(checkpoint) in str(err) \
            else f"{checkpoint}: {err}"
        raise cli_lib.UserError(f"Not converted: {message}") from err
    moved_to = checkpoints.move_aside(model_dir) if found else None
    path = checkpoints.save_model_dir(model, model_dir,
                                      source=str(checkpoint))
    return path, config, moved_to


# --------------------------------------------------------------------- CLI
FLAGS = flags.FLAGS


def define_flags():
    flags.DEFINE_string("checkpoint", None,
                        "Official NVAE checkpoint.pt to convert.")
    flags.DEFINE_string("model_dir", None,
                        "nvae_tf model directory to write (new or empty).")
    flags.DEFINE_bool("overwrite", False,
                      "If model_dir already holds a run, move it to "
                      "<model_dir>.replaced-<time> (nothing is deleted) and "
                      "convert into model_dir.")
    flags.mark_flags_as_required(["checkpoint", "model_dir"])


def main(argv):
    if len(argv) > 1:
        raise cli_lib.UserError(f"Unexpected arguments {argv[1:]}; pass "
                                "--checkpoint=... --model_dir=...")
    path, config, moved_to = convert_to_model_dir(
        FLAGS.checkpoint, FLAGS.model_dir, FLAGS.overwrite)
    if moved_to:
        logging.warning("The run that was in %s is now in %s.",
                        FLAGS.model_dir, moved_to)
    summary = {"checkpoint": FLAGS.checkpoint, "dataset": config.dataset,
               "model_dir": FLAGS.model_dir, "saved": path,
               "replaced_run_moved_to": moved_to}
    sys.stdout.write(json.dumps(summary) + "\n")


def cli():
    """Entry point of `python -m nvae_tf.convert`."""
    define_flags()
    cli_lib.run(main)


if __name__ == "__main__":
    cli()
