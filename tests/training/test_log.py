"""The run's progress line, its ETA, and plain logs off a terminal."""

import io
import logging
import re

import numpy as np
import pytest

from nvae_tf.training import log as log_lib
from nvae_tf.training.config import TrainConfig
from nvae_tf.training.config import RunLength

# 3 epochs of 10 steps.
LENGTH = RunLength(batches_per_pass=10, steps_per_epoch=10, total_steps=30,
                   schedule_epochs=3)
FIELDS = {"loss": 2075.3, "nelbo": 2074.0, "kl_coeff": 1.0, "lr": 0.0099}


class _Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


class _Stream(io.StringIO):
    def __init__(self, tty):
        super().__init__()
        self.tty = tty

    def isatty(self):
        return self.tty


@pytest.mark.parametrize("seconds, text", [
    (0.4, "0s"), (45, "45s"), (125, "2:05"), (3723, "1:02:03"),
    (36000, "10:00:00")])
def test_format_duration(seconds, text):
    assert log_lib.format_duration(seconds) == text


def _run_steps(progress, clock, steps, seconds_per_step):
    for step in steps:
        clock.now += seconds_per_step
        progress.update(step, FIELDS, 64 / seconds_per_step)


def test_run_eta_extrapolates_the_time_per_step():
    clock = _Clock()
    progress = log_lib.RunProgress(LENGTH, stream=_Stream(False),
                                   clock=clock)
    assert progress.run_eta(1) is None
    clock.now += 30.0  # the first step traces: not counted
    progress.update(1, FIELDS, 2.0)
    assert progress.run_eta(1) is None
    _run_steps(progress, clock, range(2, 5), 2.0)
    assert progress.run_eta(4) == pytest.approx(2.0 * 26)
    clock.now += 14.0  # e.g. an evaluation: part of the measured rate
    progress.update(5, FIELDS, 64.0)
    assert progress.run_eta(5) == pytest.approx(20.0 / 4 * 25)
    progress.restart()  # after a restore, measured anew
    clock.now += 1.0
    progress.update(3, FIELDS, 64.0)
    assert progress.run_eta(3) is None


def test_no_output_when_the_stream_is_not_a_terminal():
    stream, clock = _Stream(False), _Clock()
    progress = log_lib.RunProgress(LENGTH, stream=stream, clock=clock)
    assert not progress.interactive
    _run_steps(progress, clock, range(1, 31), 1.0)
    assert stream.getvalue() == ""


def test_terminal_line_has_both_etas_and_no_escape_codes():
    stream, clock = _Stream(True), _Clock()
    progress = log_lib.RunProgress(LENGTH, stream=stream, clock=clock)
    assert progress.interactive
    _run_steps(progress, clock, range(1, 16), 2.0)
    text = stream.getvalue()
    assert "\x1b" not in text and "\b" not in text
    lines = text.split("\n")
    # Epoch 1 ended with a newline; epoch 2 is being redrawn in place.
    assert len(lines) == 2
    last = lines[-1].split("\r")[-1]
    assert last.startswith("epoch 2/3 5/10 [==========..........] "
                           "loss 2075 nelbo 2074 kl_coeff 1 lr 0.0099 "
                           "32.0 img/s - ETA epoch 10s, run 30s")
    epoch_one = lines[0].split("\r")[-1]
    assert epoch_one.startswith("epoch 1/3 10/10 [====================]")
    assert "epoch" not in epoch_one.split("ETA")[-1]  # epoch done, run left
    assert re.search(r"ETA run 40s\s*$", epoch_one)


def test_terminal_redraws_at_most_every_tenth_of_a_second():
    stream, clock = _Stream(True), _Clock()
    progress = log_lib.RunProgress(LENGTH, stream=stream, clock=clock)
    _run_steps(progress, clock, range(1, 10), 0.01)
    assert stream.getvalue().count("\r") == 1 + int(
        9 * 0.01 / log_lib.PROGRESS_REDRAW_SECONDS)


def test_summary_lines_carry_the_run_eta(caplog, monkeypatch):
    monkeypatch.setattr(log_lib.time, "monotonic", _Clock())
    clock = log_lib.time.monotonic
    train = TrainConfig(summary_every_steps=5)
    log = log_lib.TrainLog(None, train, LENGTH, "/nonexistent",
                           is_chief=False, fixed_images=None,
                           nan_recoveries=None)
    metrics = {"loss": np.float32(3.0), "nelbo": np.float32(2.0),
               "kl_coeff": np.float32(1.0), "learning_rate": np.float32(0.01),
               "finite": np.float32(1.0)}
    with caplog.at_level(logging.INFO, logger="absl"):
        for step in range(1, 31):
            clock.now += 2.0
            log.step_done(step, metrics, 32.0)
    lines = [r.getMessage() for r in caplog.records]
    summaries = [line for line in lines if line.startswith("step ")]
    assert len(summaries) == 6
    assert summaries[0] == ("step 5/30: loss 3, nelbo 2, lr 0.01, kl_coeff "
                            "1, 32.0 img/s, run ETA 50s")
    assert summaries[-1].endswith("32.0 img/s")  # the run is over
    assert [line for line in lines if line.startswith("Epoch")] == [
        "Epoch 1/3", "Epoch 2/3", "Epoch 3/3"]
