"""Timing for `resnet-fast bench` and the benchmarks/ scripts: one call at a time, contenders interleaved.

Round-robin with a rotating start: every timed round runs each contender once,
so slow drift of the machine (clocks, other processes, thermal) hits all of
them alike instead of whichever happened to run last.
"""
from __future__ import annotations

import sys
import time
from typing import Callable, NamedTuple, Optional

import torch


class Progress:
    """A progress bar on stderr: tqdm when installed, otherwise a plain \\r counter."""

    def __init__(self, total: int, desc: str = "bench"):
        try:
            from tqdm import tqdm
        except ImportError:
            self._bar = None
        else:
            self._bar = tqdm(total=total, desc=desc, file=sys.stderr, unit="call", dynamic_ncols=True)
        self._n, self._total, self._desc = 0, total, desc

    def set_description(self, desc: str) -> None:
        self._desc = desc
        if self._bar is not None:
            self._bar.set_description(desc)
        else:
            self._draw()

    def update(self, n: int = 1) -> None:
        self._n += n
        if self._bar is not None:
            self._bar.update(n)
        else:
            self._draw()

    def shrink(self, n: int) -> None:
        """n fewer calls than announced will come (a failed contender, a time limit)."""
        self._total -= n
        if self._bar is not None:
            self._bar.total = self._total
            self._bar.refresh()
        else:
            self._draw()

    def write(self, message: str) -> None:
        """A message on stderr that does not garble the bar."""
        if self._bar is not None:
            self._bar.write(message, file=sys.stderr)
        else:
            print("\r" + message, file=sys.stderr)
            self._draw()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        else:
            print(file=sys.stderr)

    def _draw(self) -> None:
        print(f"\r{self._desc}: {self._n}/{self._total}", end="", file=sys.stderr, flush=True)


class Timer:
    """Seconds one call takes: CUDA events on a GPU (the queue drained first), perf_counter on CPU."""

    def __init__(self, device: torch.device):
        self._cuda = device.type == "cuda"
        self._device = device
        if self._cuda:
            self._start = torch.cuda.Event(enable_timing=True)
            self._end = torch.cuda.Event(enable_timing=True)

    def sync(self) -> None:
        if self._cuda:
            torch.cuda.synchronize(self._device)

    def __call__(self, fn: Callable[[], object]) -> float:
        if not self._cuda:
            start = time.perf_counter()
            fn()
            return time.perf_counter() - start
        self.sync()
        self._start.record()
        fn()
        self._end.record()
        self._end.synchronize()
        return self._start.elapsed_time(self._end) / 1e3


MIN_ROUNDS = 3  # a time limit never cuts timing shorter than this


def interleaved(steps: dict[str, Callable[[], object]], rounds: int, timer: Timer,
                progress: Optional[Progress] = None, max_time: Optional[float] = None) -> dict[str, list[float]]:
    """Seconds of each call: up to `rounds` rounds; round r runs every step once, starting from the r-th
    (mod len). With max_time, no new round starts after that many seconds (past the first MIN_ROUNDS)."""
    names = list(steps)
    times: dict[str, list[float]] = {name: [] for name in names}
    start = time.perf_counter()
    for r in range(rounds):
        if max_time is not None and r >= MIN_ROUNDS and time.perf_counter() - start >= max_time:
            if progress is not None:
                progress.shrink(len(names) * (rounds - r))
            break
        k = r % len(names)
        for name in names[k:] + names[:k]:
            times[name].append(timer(steps[name]))
            if progress is not None:
                progress.update()
    return times


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated q-th percentile (0..100), as numpy's default."""
    data = sorted(values)
    pos = (len(data) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


class Spread(NamedTuple):
    median: float
    p20: float
    p80: float
    min: float


def spread(values: list[float]) -> Spread:
    """Median, p20, p80 and minimum of repeated measurements."""
    return Spread(percentile(values, 50), percentile(values, 20), percentile(values, 80), min(values))


def measure(fn: Callable[[], object], device: torch.device, reps: int, warmup: int = 2) -> Spread:
    """Seconds one call of fn takes: `warmup` untimed calls (compilation, caches), then `reps` timed ones."""
    for _ in range(warmup):
        fn()
    return spread(interleaved({"fn": fn}, reps, Timer(device))["fn"])


def throughput(seconds: list[float], batch_size: int) -> dict[str, float]:
    """img/s: median, and p20/p80 of the per-iteration throughput (p20 = the slower end)."""
    # Percentiles of the rates, not rates of the time percentiles: interpolation does not commute with 1/x.
    rates = spread([batch_size / s for s in seconds])
    return {"img_per_s": rates.median, "p20": rates.p20, "p80": rates.p80,
            "ms_per_iter": percentile(seconds, 50) * 1e3}
