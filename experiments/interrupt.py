"""Ctrl-C during training: stop at the next safe point and say how to resume.

Inside ``with StopOnInterrupt() as stop:``, a first SIGINT only sets
``stop.requested``; the training loop looks at it between steps, saves a
checkpoint and raises :class:`Interrupted`, so no checkpoint is ever left half
written. A second SIGINT raises ``KeyboardInterrupt`` at once (Orbax commits a
checkpoint atomically, so the previous one survives even then).
"""

from __future__ import annotations

import signal
import threading


class Interrupted(Exception):
    """Training stopped on SIGINT at a safe point; the message is for the user."""


class StopOnInterrupt:
    """A context in which SIGINT requests a stop instead of raising.

    Args:
      enabled: False leaves SIGINT as it is (``requested`` stays False).
    """

    def __init__(self, *, enabled: bool = True):
        self.requested = False
        self._enabled = enabled
        self._previous = None

    def __enter__(self) -> StopOnInterrupt:
        # Signal handlers can only be set from the main thread; elsewhere SIGINT
        # keeps its usual meaning.
        if self._enabled and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def _handle(self, signum, frame) -> None:
        del signum, frame
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True


def message(step: int, run: str) -> str:
    """The one line printed when training stops on Ctrl-C."""
    return f"interrupted at step {step} of {run}; rerun the same command to resume"
