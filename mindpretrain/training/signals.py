"""SIGTERM (a scheduler's preemption, `kill`, msrun shutting down) ends training cleanly.

The handler only records the request; the loop finishes the step in flight, agrees with the
other ranks (the flag is all-reduced with the step's losses), saves a checkpoint and exits 0, so
a preempted job resumes with `--resume_training True` without losing more than one step.
"""
import signal

from mindpretrain.utils.logging import get_logger

logger = get_logger("train")


class StopRequest:
    def __init__(self, signals=(signal.SIGTERM,)):
        self.signals = signals
        self.requested = False
        self._previous = {}

    def _handle(self, signum, frame):
        if not self.requested:
            logger.warning("received %s: finishing the current step, then saving and stopping",
                           signal.Signals(signum).name)
        self.requested = True

    def install(self):
        for signum in self.signals:
            try:
                self._previous[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not the main thread: signals cannot be caught here
                logger.warning("cannot install a %s handler outside the main thread", signal.Signals(signum).name)

    def uninstall(self):
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous = {}
