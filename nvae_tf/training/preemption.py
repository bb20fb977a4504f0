"""SIGTERM and SIGINT stop the trainer after the current step, saved.

A scheduler's preemption (SIGTERM) or Ctrl-C (SIGINT) only sets a flag.
The trainer checks it after every step (a step in flight is never cut
short: Python runs signal handlers between TensorFlow calls), saves a
checkpoint at that step and raises `Interrupted`; the command then exits
with `exit_status` and no traceback. In a multi-worker run the flag is
all-reduced after every step, so every worker stops and saves at the same
step even when only one of them was signalled. A second signal of either
kind ends the process at once (the signal's default action). A signal
after the last step lets the final evaluation and export finish (the
final checkpoint is already saved).

Exit status: 143 (128 + SIGTERM) after SIGTERM, 130 (128 + SIGINT) after
SIGINT, the shell's conventions for a process ended by the signal: the
run is not finished, but its state at the signal's step is on disk and
rerunning the same command resumes from it. A worker stopped because
another one was signalled exits with 143.
"""

from __future__ import annotations

import signal
import threading

from absl import logging

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
# The shell's status of a process ended by signal N is 128 + N.
SIGNAL_EXIT_BASE = 128


class Interrupted(Exception):
    """The run stopped on a signal after saving a checkpoint at `step`.

    Attributes:
      signum: the signal received by this process (None when another
        worker received it).
      step: the step of the saved checkpoint.
    """

    def __init__(self, signum, step: int):
        self.signum = signum
        self.step = step
        name = signal.Signals(signum).name if signum else "another worker's signal"
        super().__init__(f"Stopped by {name} at step {step}")

    @property
    def exit_status(self) -> int:
        return SIGNAL_EXIT_BASE + int(self.signum or signal.SIGTERM)


class StopRequest:
    """Records SIGTERM / SIGINT while installed (a context manager).

    Installs nothing outside the main thread (Python allows signal handlers
    only there), so library callers in other threads keep their own.
    """

    def __init__(self):
        self.signum = None
        self._previous = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum, frame):  # pylint: disable=unused-argument
        if self.signum is not None:  # a second signal: stop at once
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)
            return
        self.signum = signum
        logging.warning("Received %s: stopping after the current step with "
                        "a checkpoint (send it again to stop at once).",
                        signal.Signals(signum).name)

    def install(self) -> None:
        """(Re)installs the handlers: call again after creating a
        MultiWorkerMirroredStrategy, whose coordination service replaces
        the SIGTERM handler with its own preemption notifier."""
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in STOP_SIGNALS:
            previous = signal.signal(signum, self._handle)
            self._previous.setdefault(signum, previous)

    def __enter__(self):
        self.install()
        return self

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
