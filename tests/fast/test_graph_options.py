"""`graph_options.set_grappler_options`: the Grappler passes of the
function calls of this thread (the trainer's and bench's `--grappler`)."""

import pytest
from absl import logging
from tensorflow.core.protobuf import config_pb2, rewriter_config_pb2
from tensorflow.python.eager import context

from nvae_tf.fast import graph_options

RewriterConfig = rewriter_config_pb2.RewriterConfig


def rewriter_config():
    """The RewriterConfig that function calls of this thread pass on."""
    return config_pb2.ConfigProto.FromString(
        context.context().function_call_options.config_proto_serialized
    ).graph_options.rewrite_options


@pytest.fixture(autouse=True)
def _restore_defaults():
    yield
    graph_options.set_grappler_options(graph_options.GRAPPLER["default"])


def test_lean_sets_the_function_call_rewriter_config():
    assert graph_options.set_grappler_options(graph_options.GRAPPLER["lean"])
    rewrite = rewriter_config()
    assert rewrite.memory_optimization == RewriterConfig.NO_MEM_OPT
    assert rewrite.disable_tfg_optimizer
    for name in ("layout_optimizer", "loop_optimization",
                 "implementation_selector"):
        assert getattr(rewrite, name) == RewriterConfig.OFF, name
    # The passes that pay for themselves stay at TF's default (on).
    for name in ("constant_folding", "arithmetic_optimization", "remapping",
                 "dependency_optimization"):
        assert getattr(rewrite, name) == RewriterConfig.DEFAULT, name


def test_default_restores_tensorflows_passes():
    before = rewriter_config()
    graph_options.set_grappler_options(graph_options.GRAPPLER["lean"])
    assert graph_options.set_grappler_options(
        graph_options.GRAPPLER["default"])
    after = rewriter_config()
    assert after == before
    assert after.memory_optimization == RewriterConfig.DEFAULT_MEM_OPT
    assert not after.disable_tfg_optimizer


def test_missing_private_api_warns_and_keeps_the_defaults(monkeypatch):
    before = rewriter_config()
    warnings = []
    monkeypatch.setattr(logging, "warning",
                        lambda msg, *args: warnings.append(msg % args))
    assert not graph_options.set_grappler_options({"no_such_field": "OFF"})
    assert rewriter_config() == before

    class FutureContext:  # no function_call_options
        pass

    monkeypatch.setattr(context, "context", FutureContext)
    assert not graph_options.set_grappler_options(
        graph_options.GRAPPLER["lean"])
    assert len(warnings) == 2
    assert all("default passes" in w for w in warnings)


@pytest.mark.parametrize("name, devices, preset", [
    ("auto", ["CPU"], "lean"),
    ("auto", ["CPU", "GPU"], "default"),
    ("auto", ["CPU", "TPU"], "default"),
    ("lean", ["CPU", "GPU"], "lean"),  # the flag overrides
    ("default", ["CPU"], "default"),
])
def test_resolve_grappler_by_device_type(name, devices, preset):
    assert graph_options.resolve_grappler(name, devices) == preset


def test_resolve_grappler_lists_the_devices_itself(monkeypatch):
    import tensorflow as tf

    class Device:
        def __init__(self, device_type):
            self.device_type = device_type

    monkeypatch.setattr(tf.config, "list_physical_devices",
                        lambda: [Device("CPU"), Device("GPU")])
    assert graph_options.resolve_grappler("auto") == "default"
    monkeypatch.setattr(tf.config, "list_physical_devices",
                        lambda: [Device("CPU")])
    assert graph_options.resolve_grappler("auto") == "lean"
    with pytest.raises(ValueError, match="fast"):
        graph_options.resolve_grappler("fast")


@pytest.mark.parametrize("devices, visible", [
    (["CPU"], False), (["CPU", "GPU"], True), (["TPU", "CPU"], True)])
def test_accelerator_visible(devices, visible):
    assert graph_options.accelerator_visible(devices) is visible
