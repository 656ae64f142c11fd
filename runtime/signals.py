"""Graceful stop on SIGTERM/SIGINT for the long-running commands (``mordasr-serve``,
``mordasr-run --ray``): the first signal asks the command to stop (it drains and exits 0), a
second one exits at once. Container orchestrators send SIGTERM and kill after a grace period; a
person presses Ctrl-C, and again when they do not want to wait."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Callable

DEFAULT_GRACE_S = 30.0
SIGNALS = (signal.SIGTERM, signal.SIGINT)


class GracefulStop:
    """Handlers for SIGTERM and SIGINT while in the ``with`` block (main thread only).

    ``requested`` is set by the first signal; the second calls ``os._exit(128 + signal number)``
    (the shell's convention) without waiting for anything.
    """

    def __init__(self, prog: str, on_first: Callable[[int], None] | None = None) -> None:
        self.prog = prog
        self.requested = threading.Event()
        self.signal: int | None = None
        self.on_first = on_first
        self._previous: dict[int, object] = {}

    def __enter__(self) -> GracefulStop:
        self.install()
        return self

    def install(self) -> None:
        """(Re)take SIGTERM and SIGINT. Libraries that start runtimes may install their own handlers:
        ``ray.init`` sets one that logs "SIGTERM received" and exits 15 with nothing drained, so
        callers install again after starting Ray."""
        for sig in SIGNALS:
            previous = signal.signal(sig, self._handle)
            self._previous.setdefault(sig, previous)

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]

    def _handle(self, signum: int, _frame) -> None:
        if self.requested.is_set():
            print(f"{self.prog}: second {signal.Signals(signum).name}: exiting now", file=sys.stderr, flush=True)
            os._exit(128 + signum)
        self.signal = signum
        self.requested.set()
        if self.on_first is not None:
            self.on_first(signum)

    def wait(self, poll_s: float = 0.2) -> None:
        """Block until the first signal (polling, so the handler runs promptly in the main thread)."""
        while not self.requested.wait(poll_s):
            pass


def wait_until(done: Callable[[], bool], timeout_s: float, poll_s: float = 0.1) -> bool:
    """Poll ``done`` until it is true or ``timeout_s`` passes; whether it became true."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if done():
            return True
        time.sleep(poll_s)
    return done()


def run_bounded(step: Callable[[], object], timeout_s: float) -> bool:
    """Run ``step`` in a daemon thread for at most ``timeout_s``; whether it finished (a step that
    hangs, such as shutting down a Ray whose processes a group signal already killed, is left
    behind rather than holding the exit)."""
    worker = threading.Thread(target=step, daemon=True)
    worker.start()
    worker.join(timeout_s)
    return not worker.is_alive()
