"""Ctrl-C (SIGINT) and SIGTERM during a run: what a signal stops at once, and what it waits for.

A scheduler sends SIGTERM some time before it kills a job, and Ctrl-C is how a user stops a
run: either way the run should end with the last good state on disk and one line saying how
to continue. Each part of a run declares what a signal may do to it (`Signals.phase`):

    "drop"   work that can be thrown away, because nothing on disk depends on it and the
             next start redoes it (loading, an evaluation): the handler raises Stop at once.
    "defer"  work the next checkpoint keeps (a GRPO step, the cold start): the signal is only
             recorded, and the run stops at the next safe point, after saving (`first`). A
             second Ctrl-C raises Stop at once, as a crash would, leaving the last checkpoint.
    "hold"   a write (a checkpoint, final/): every signal, a second Ctrl-C included, waits
             until it is complete, so what is on disk is whole.

Stop is a BaseException, as KeyboardInterrupt is, so that no `except Exception` in the code it
interrupts swallows it, and the atomic writes of grpo.files clean up after it. Python runs
handlers in the main thread only: elsewhere `installed` changes nothing and a signal keeps
its default action.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

SIGNALS = (signal.SIGINT, signal.SIGTERM)
MODES = ("drop", "defer", "hold")


class Stop(BaseException):
    """Raised by the handler where the work in progress is dropped; signum: the first signal
    received (the exit status is 128 + signum); again: raised by a second Ctrl-C."""

    def __init__(self, signum: int, *, again: bool = False) -> None:
        self.signum, self.again = signum, again
        super().__init__(signal.Signals(signum).name)


class Interrupted(Exception):
    """A signal ended the run; the message says what is on disk and how to continue."""

    def __init__(self, signum: int, message: str) -> None:
        self.signum = signum
        super().__init__(message)


class Signals:
    """The SIGINT and SIGTERM a process received, and what the next one does (`mode`)."""

    def __init__(self, mode: str = "drop") -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.mode = mode
        self.received: list[int] = []

    @property
    def first(self) -> int:
        """The first signal received, 0 if none."""
        return self.received[0] if self.received else 0

    @contextmanager
    def phase(self, mode: str) -> Iterator[None]:
        """Run the block in `mode`; a signal already waiting stops a "drop" block at once."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        previous, self.mode = self.mode, mode
        try:
            if mode == "drop" and self.received:
                raise Stop(self.first)
            yield
        finally:
            self.mode = previous

    @contextmanager
    def installed(self) -> Iterator[Signals]:
        """This object handles SIGINT and SIGTERM inside the block (the previous handlers
        come back after it)."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def _handle(self, signum: int, frame) -> None:
        self.received.append(signum)
        again = signum == signal.SIGINT and self.received.count(signal.SIGINT) > 1
        if self.mode == "drop" or (self.mode == "defer" and again):
            raise Stop(self.first, again=again and self.mode == "defer")
