"""The residual cell of NVAE: skip(x) + 0.1 * SE(ops(x)).

One class serves the eight cell types of the pre-process, encoder, decoder
and post-process towers, as the official `Cell`. The cell type fixes the
resampling (normal: none, down: stride 2, up: nearest x2 up-sampling) and,
with the architecture instance, the list of operations; only the first
operation changes resolution and channel count.
"""

import re

import keras

from nvae_tf.config import ARCH_INSTANCES
from nvae_tf.layers.blocks import (FactorizedReduce, InvertedResidual,
                                   SqueezeExcite, UpsampleSkip)
from nvae_tf.layers.conv import BNSwishConv
from nvae_tf.layers.tracking import CheckpointableCollections

RESIDUAL_BRANCH_SCALE = 0.1  # official `skip + 0.1 * branch`, a constant

CELL_TYPES = ("normal_pre", "down_pre", "normal_enc", "down_enc",
              "normal_dec", "up_dec", "normal_post", "up_post")
_STRIDES = {"normal": 1, "down": 2, "up": 1}  # "up" cells upsample instead
_MBCONV = re.compile(r"^mconv_e(\d+)k(\d+)g0$")


def make_operation(op_name, filters, strides, sync_batchnorm, name, dtype,
                   upsample=False):
    """Builds one official operation (`res_bnswish`, `mconv_e6k5g0`, ...)."""
    if op_name in ("res_bnswish", "res_bnswish5"):
        dilation = 2 if op_name == "res_bnswish5" else 1
        return BNSwishConv(filters, 3, strides=strides, dilation_rate=dilation,
                           sync_batchnorm=sync_batchnorm, name=name,
                           dtype=dtype, upsample=upsample)
    match = _MBCONV.match(op_name)
    if match:
        return InvertedResidual(
            filters, strides=strides, expansion=int(match.group(1)),
            kernel_size=int(match.group(2)), sync_batchnorm=sync_batchnorm,
            name=name, dtype=dtype, upsample=upsample)
    raise ValueError(f"Unsupported operation {op_name!r}.")


@keras.saving.register_keras_serializable(package="nvae_tf")
class ResidualCell(CheckpointableCollections, keras.layers.Layer):
    """A residual cell of one of the NVAE towers.

    Args:
      cell_type: one of `CELL_TYPES`, e.g. `"down_enc"` or `"up_post"`.
      filters: output channels (2x input for down cells, input / 2 for up).
      arch_instance: official operation table (`"res_mbconv"`).
      use_se: squeeze-and-excitation on the residual branch.
      sync_batchnorm: synchronise BN statistics across replicas.
    """

    def __init__(self, cell_type, filters, arch_instance="res_mbconv",
                 use_se=True, sync_batchnorm=False, **kwargs):
        super().__init__(**kwargs)
        if cell_type not in CELL_TYPES:
            raise ValueError(f"cell_type={cell_type!r}; expected one of "
                             f"{CELL_TYPES}.")
        if arch_instance not in ARCH_INSTANCES:
            raise ValueError(f"arch_instance={arch_instance!r}; expected one "
                             f"of {tuple(ARCH_INSTANCES)}.")
        self.cell_type = cell_type
        self.filters = filters
        self.arch_instance = arch_instance
        self.use_se = use_se
        self.sync_batchnorm = sync_batchnorm
        kind, family = cell_type.split("_")
        self.strides = _STRIDES[kind]
        self.upsample = kind == "up"
        op_names = ARCH_INSTANCES[arch_instance][family]
        self.ops = [
            make_operation(op, filters, self.strides if i == 0 else 1,
                           sync_batchnorm, f"op_{i}", self.dtype_policy,
                           upsample=self.upsample and i == 0)
            for i, op in enumerate(op_names)]
        if self.strides == 2:
            self.skip = FactorizedReduce(filters, name="skip",
                                         dtype=self.dtype_policy)
        elif self.upsample:
            self.skip = UpsampleSkip(filters, name="skip",
                                     dtype=self.dtype_policy)
        else:
            self.skip = None
        self.se = SqueezeExcite(name="se", dtype=self.dtype_policy) \
            if use_se else None

    def build(self, input_shape):
        if self.skip is None and input_shape[-1] != self.filters:
            raise ValueError(
                f"{self.cell_type} cell keeps the channel count: got input "
                f"{input_shape[-1]} channels, filters={self.filters}.")
        shape = input_shape
        for op in self.ops:
            op.build(shape)
            shape = op.compute_output_shape(shape)
        if self.skip is not None:
            self.skip.build(input_shape)
        if self.se is not None:
            self.se.build(shape)

    def call(self, inputs, training=None):
        if training:
            branch = inputs
            for op in self.ops:
                branch = op(branch, training=training)
        else:
            branch = self._inference_branch(inputs)
        skip = inputs if self.skip is None else self.skip(inputs)
        return self._join(skip, branch)

    def _join(self, skip, branch):
        if self.se is not None:  # the 0.1 goes into the SE gate
            return skip + self.se(branch, scale=RESIDUAL_BRANCH_SCALE)
        return skip + RESIDUAL_BRANCH_SCALE * branch

    def _inference_branch(self, inputs):
        """The operations in inference mode, each BN folded into a conv.

        A `BNSwishConv` followed by another one takes the second one's BN
        into its convolution (conv -> BN is exact to fold; BN -> Swish ->
        conv is not).
        """
        branch, normalized = inputs, False
        for op, after in zip(self.ops, self.ops[1:] + [None]):
            if isinstance(op, BNSwishConv):
                next_bn = after.bn if isinstance(after, BNSwishConv) \
                    else None
                branch = op.inference(branch, normalized=normalized,
                                      next_bn=next_bn)
                normalized = next_bn is not None
            else:
                branch = op.inference(branch)
        return branch

    def compute_output_shape(self, input_shape):
        shape = input_shape
        for op in self.ops:
            shape = op.compute_output_shape(shape)
        return shape

    def get_config(self):
        config = super().get_config()
        config.update(cell_type=self.cell_type, filters=self.filters,
                      arch_instance=self.arch_instance, use_se=self.use_se,
                      sync_batchnorm=self.sync_batchnorm)
        return config
