"""A one-line progress bar on stderr: loss and images per second.

Redrawn in place on a terminal; when stderr is a file or pipe (logs, CI) it
prints a plain line about every tenth of the epoch instead of a wall of
carriage returns.
"""
from __future__ import annotations

import sys
from typing import TextIO


class Progress:
    WIDTH = 24

    def __init__(self, label: str, total: int, enabled: bool, stream: TextIO | None = None):
        self.label, self.total, self.enabled = label, max(total, 1), enabled
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.next_line_at = 0.0
        self.drawn = False

    def update(self, done: int, loss: float, img_per_s: float) -> None:
        if not self.enabled:
            return
        fraction = min(done / self.total, 1.0)
        if not self.tty and fraction < self.next_line_at and done < self.total:
            return
        filled = int(fraction * self.WIDTH)
        bar = "#" * filled + "." * (self.WIDTH - filled)
        text = f"{self.label} [{bar}] {done}/{self.total} loss {loss:.4f} {img_per_s:,.0f} img/s"
        if self.tty:
            self.stream.write("\r" + text + "\x1b[K")
        else:
            self.stream.write(text + "\n")
            self.next_line_at = fraction + 0.1
        self.stream.flush()
        self.drawn = True

    def close(self) -> None:
        if self.enabled and self.tty and self.drawn:
            self.stream.write("\n")
            self.stream.flush()
