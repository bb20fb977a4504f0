"""The memory report of a training step (`python -m benchmarks.memory`)."""

import json
import os
import subprocess
import sys

import pytest

from benchmarks import bench, memory
from nvae_tf import cli

REPO = os.path.join(os.path.dirname(__file__), "..", "..")
TIMEOUT = 900
STATE_TOLERANCE = 0.01


@pytest.mark.parametrize("argv, message", [
    ([], "--config (or --flagfile) is required"),
    (["--config=tiny", "--remat=none,all"],
     "flag --remat=none,all: 'all' is not one of none, cells, groups"),
    (["--config=tiny", "--steps=0"], "flag --steps=0: 0 is not a positive"),
    (["--config=tiny", "--batch_size=0"], "flag --batch_size=0: 0 is not"),
    (["--flagfile=nope.cfg"], "flag --config=nope.cfg: 'nope.cfg' is "
     "neither a preset"),
])
def test_bad_arguments_are_one_clear_error(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        memory.parse_args(argv)
    assert info.value.code == cli.EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err


def test_flagfile_is_an_alias_of_config_and_modes_split():
    args = memory.parse_args(["--flagfile=configs/mnist.cfg,tiny",
                              "--remat=none,cells"])
    assert args.configs == ("configs/mnist.cfg", "tiny")
    assert args.remats == ("none", "cells")
    # Repeated, as --config, and a packaged flagfile by name.
    args = memory.parse_args(["--flagfile", "quickstart", "--config=tiny"])
    assert args.configs == ("quickstart", "tiny")
    assert args.remats == ("none",) and args.steps == 3


def test_bench_and_memory_share_the_config_flags():
    assert bench.parse_args(["--flagfile=tiny,mnist-small"]).configs == (
        "tiny", "mnist-small")
    for parse in (bench.parse_args, memory.parse_args):
        args = parse(["--config=tiny", "--batch_size=2",
                      "--mixed_precision=bfloat16"])
        assert (args.batch_size, args.mixed_precision) == (2, "bfloat16")
        assert not args.json and not args.worker


def test_bench_rejects_an_unknown_remat_mode(capsys):
    with pytest.raises(SystemExit) as info:
        bench.parse_args(["--remat=sometimes"])
    assert info.value.code == cli.EXIT_USER_ERROR
    assert "flag --remat=sometimes: value should be one of <none|cells|" \
        "groups>" in capsys.readouterr().err
    assert bench.parse_args(["--remat=groups"]).remat == "groups"


@pytest.mark.slow
def test_report_of_a_step_adds_up():
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench", "--memory",
         "--config=tiny", "--remat=none,cells", "--steps=2", "--json"],
        cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT,
        check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    plain, cells = [json.loads(line) for line in proc.stdout.splitlines()]
    for result in (plain, cells):
        assert result["peak_bytes"] == result["state_bytes"] + \
            result["step_bytes"]
        # The weights and Adamax slots are allocated before the step.
        assert result["state_bytes"] >= result["variable_bytes"] > 0
        assert result["step_bytes"] > 0
        assert result["step_bytes_per_image"] == result["step_bytes"] // 4
        assert result["step_s"] > 0 and result["peak_rss_mb"] > 500
    assert (plain["remat"], cells["remat"]) == ("none", "cells")
    # The same model and optimizer: the same state, up to a few small
    # tensors the runtime keeps (a few kB).
    assert abs(plain["state_bytes"] - cells["state_bytes"]) <= \
        STATE_TOLERANCE * plain["state_bytes"]


def test_run_eagerly_reaches_the_worker():
    args = memory.parse_args(["--config=tiny", "--run_eagerly"])
    assert args.run_eagerly
    assert "--run_eagerly" in memory._worker_command(args, "tiny", "cells")
    args = memory.parse_args(["--config=tiny"])
    assert not args.run_eagerly
    assert "--run_eagerly" not in memory._worker_command(args, "tiny", "none")
