"""Graceful stop on SIGTERM / SIGINT (preemption, Ctrl-C).

The first signal only sets a flag: the loop finishes the step it is in,
writes last.pt at that position and exits with 128 + the signal number
(143 for SIGTERM, 130 for SIGINT). A second signal restores the default
action and re-raises itself, so the process dies at once with the same
status; checkpoints are replaced by rename (files.atomic_write), so last.pt
is then the last complete save, never half of one.

A repeat within DEBOUNCE_S of the first counts as the same request: Ctrl-C
in a terminal, or a scheduler's SIGTERM to every process of a job, reaches
torchrun and its workers, and torchrun then forwards it to the workers again.
Once the stop is `done` (last.pt written and every rank past it) further
signals are ignored while the process exits: torchrun sends SIGTERM to the
workers still running (shutting down) when the first one exits, so a torchrun
worker (`hold`) keeps ignoring them after the handlers would be restored.
"""
from __future__ import annotations

import os
import signal
import threading
import time

SIGNALS = (signal.SIGTERM, signal.SIGINT)
DEBOUNCE_S = 1.0


def exit_code(signum: int) -> int:
    return 128 + signum


def name(signum: int) -> str:
    return signal.Signals(signum).name


class StopRequest:
    """Holds the first signal received while installed (`signum`, None until then)."""

    def __init__(self, announce: bool = True, hold: bool = False):
        self.signum: int | None = None
        self.done = False
        self.announce, self.hold = announce, hold
        self._first_at = 0.0
        self._pid = os.getpid()
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():  # signal handlers live there only
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, signal.SIG_IGN if self.done and self.hold else handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        if os.getpid() != self._pid or self.done:  # a forked DataLoader worker (before its init); exiting
            return
        if self.signum is None:
            self.signum, self._first_at = signum, time.monotonic()
            self._notice(f"resnet-fast train: {name(signum)} received: stopping after this step and saving "
                         "last.pt (a second signal exits at once)")
            return
        if time.monotonic() - self._first_at < DEBOUNCE_S:
            return
        self._notice(f"resnet-fast train: second signal ({name(signum)}): exiting at once; last.pt is the last "
                     "complete save")
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    def _notice(self, text: str) -> None:
        if self.announce:  # os.write, not print: the handler may interrupt a print to the same stream
            os.write(2, (text + "\n").encode())


def ignore_in_worker(_worker_id: int) -> None:
    """DataLoader worker_init_fn: workers leave signals to the main process, which
    shuts them down; a worker killed by Ctrl-C would fail the step being finished."""
    for sig in SIGNALS:
        signal.signal(sig, signal.SIG_IGN)

