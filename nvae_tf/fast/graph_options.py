"""Grappler passes for the `tf.function`s of training and the benchmark.

`GRAPPLER["lean"]` (the default of `python -m nvae_tf.train` on a CPU-only
host and of `python -m benchmarks.bench`, flag `--grappler`) drops the passes
that cost setup time and memory but do nothing for these graphs on a CPU: the
memory optimiser (seconds per train step graph, more nodes, more peak RSS), the
TFG (MLIR) passes, layout (NHWC already), loop and implementation
selection (no loops or function alternatives). Pruning, common-subgraph
elimination, constant folding, arithmetic and dependency optimisation and
the remapper (which fuses conv + bias / BN + activation for oneDNN) stay,
with both of the default two meta-optimiser iterations: turning those off
cost step time or RSS. The first call of a train step is shorter and its
peak RSS lower (docs/performance.md, "What was tried"); loss and gradients
are unchanged (tests/training, tests/benchmarks/test_bench.py).
`GRAPPLER["default"]` is TensorFlow's own passes.
On a GPU the layout optimiser (NCHW kernels) and the memory optimiser
(swapping and recomputation that let large NVAE graphs fit in device memory)
do matter, so the trainer's `--grappler=auto` (`resolve_grappler`) keeps
TensorFlow's passes whenever a GPU or TPU is visible.

`tf.config.optimizer.set_experimental_options` cannot set
`memory_optimization` nor `disable_tfg_optimizer`, so `set_grappler_options`
edits the ConfigProto the eager context passes to function calls, a private
API (`context.context().function_call_options`). If a TensorFlow version
lacks it or the fields, a warning is logged and TF's defaults stay.
"""

from __future__ import annotations

from collections.abc import Sequence

from absl import logging

# RewriterConfig field -> value (enum values by name).
GRAPPLER = {
    "default": {},
    "lean": {"memory_optimization": "NO_MEM_OPT",
             "disable_tfg_optimizer": True,
             "layout_optimizer": "OFF",
             "loop_optimization": "OFF",
             "implementation_selector": "OFF"},
}
AUTO = "auto"  # lean on CPU-only hosts, TensorFlow's passes on accelerators
GRAPPLER_CHOICES = (AUTO, *GRAPPLER)
ACCELERATOR_DEVICE_TYPES = ("GPU", "TPU")


def resolve_grappler(name: str,
                     device_types: Sequence[str] | None = None) -> str:
    """The `GRAPPLER` preset that `name` (a `GRAPPLER_CHOICES` value) means.

    `auto` is `lean` when no GPU or TPU is visible and `default` otherwise;
    any other name is itself.

    Args:
      name: `auto`, `lean` or `default`.
      device_types: the visible physical device types (e.g. `["CPU",
        "GPU"]`); None lists them with `tf.config.list_physical_devices`.

    Returns:
      A key of `GRAPPLER`.
    """
    if name != AUTO:
        if name not in GRAPPLER:
            raise ValueError(f"`name` must be one of {GRAPPLER_CHOICES}. "
                             f"Received: name={name!r}")
        return name
    return "default" if accelerator_visible(device_types) else "lean"


def accelerator_visible(device_types: Sequence[str] | None = None) -> bool:
    """Whether a GPU or TPU is among `device_types` (None: the physical
    devices TensorFlow lists; listing them does not start its runtime)."""
    if device_types is None:
        import tensorflow as tf  # pylint: disable=import-outside-toplevel
        device_types = [d.device_type
                        for d in tf.config.list_physical_devices()]
    return any(t in ACCELERATOR_DEVICE_TYPES for t in device_types)


def set_grappler_options(options: dict) -> bool:
    """Sets `RewriterConfig` fields for `tf.function`s called in this thread.

    Starts from the context's own config (earlier calls are undone, so `{}`
    restores TensorFlow's defaults). Call it after any `tf.config` change
    (those rebuild the function-call ConfigProto, dropping these fields)
    and before the first call of a function (its graph is optimised then);
    it applies to functions called from this thread.

    Args:
      options: field name -> value; enum fields by name ("OFF",
        "NO_MEM_OPT", ...). `GRAPPLER[name]` for a preset.

    Returns:
      True if applied; False if this TensorFlow lacks the private API or a
      field (a warning is logged; TF's default passes are used).
    """
    # pylint: disable=import-outside-toplevel
    from tensorflow.core.protobuf import config_pb2
    from tensorflow.python.eager import context
    try:
        ctx = context.context()
        call_options = ctx.function_call_options
        # The context's own config, as TF builds it after a tf.config call;
        # the thread keeps its FunctionCallOptions object (edited in place).
        ctx.function_call_options = None
        try:
            base = ctx.function_call_options.config_proto_serialized
        finally:
            ctx.function_call_options = call_options
        config = config_pb2.ConfigProto.FromString(base)
        rewrite = config.graph_options.rewrite_options
        for name, value in options.items():
            field = rewrite.DESCRIPTOR.fields_by_name[name]
            if isinstance(value, str):
                value = field.enum_type.values_by_name[value].number
            setattr(rewrite, name, value)
        call_options.config_proto_serialized = config
    except (AttributeError, KeyError, TypeError, ValueError) as err:
        logging.warning("Grappler options %s not applied (this TensorFlow "
                        "lacks the private API or field: %r); using "
                        "TensorFlow's default passes.", options, err)
        return False
    return True
