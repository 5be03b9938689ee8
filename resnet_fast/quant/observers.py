"""Per-tensor activation observers: the uint8 (scale, zero point) of one activation from calibration data.

Each observer sees the calibration batches twice: first for the range, then for a 2048-bin histogram
over that range (so the histogram never has to be re-binned, and the result does not depend on batch order).
The clipping range is then chosen by
  "mse":        the range minimising the expected squared quantization error over the histogram
                (rounding error delta^2/12 inside the range, the clipped distance outside);
  "percentile": the 0.01% / 99.99% quantiles;
  "minmax":     the observed range.
Post-ReLU activations (non-negative) always keep 0 as their lower end, so their zero point is 0.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

METHODS = ("mse", "percentile", "minmax")
BINS = 2048
QMAX = 255  # uint8 activations


class HistogramObserver:
    def __init__(self, method: str = "mse"):
        if method not in METHODS:
            raise ValueError(f"observer must be one of {METHODS}, got {method!r}")
        self.method = method
        self.lo, self.hi = math.inf, -math.inf
        self.hist = torch.zeros(BINS, dtype=torch.float64)
        self.zeros = 0  # exact zeros (ReLU's): quantized exactly at any scale, kept out of the error estimate

    def observe_range(self, t: Tensor) -> None:
        lo, hi = torch.aminmax(t.detach().float())
        self.lo, self.hi = min(self.lo, lo.item()), max(self.hi, hi.item())

    def observe_histogram(self, t: Tensor) -> None:
        t = t.detach().float()
        self.hist += torch.histc(t, BINS, self.lo, max(self.hi, self.lo + 1e-12)).double()
        self.zeros += int((t == 0).sum())

    def qparams(self) -> tuple[float, int]:
        """(scale, zero_point) of the uint8 quantization of this activation."""
        if not math.isfinite(self.lo):
            raise RuntimeError("observer saw no data")
        lo, hi = min(self.lo, 0.0), max(self.hi, 0.0)
        if self.method == "percentile":
            lo, hi = self._percentile(lo, hi)
        elif self.method == "mse":
            lo, hi = self._mse(lo, hi)
        return _qparams(lo, hi)

    def _centers(self) -> tuple[Tensor, Tensor]:
        width = (max(self.hi, self.lo + 1e-12) - self.lo) / BINS
        centers = self.lo + width * (torch.arange(BINS, dtype=torch.float64) + 0.5)
        counts = self.hist.clone()
        if self.lo <= 0 <= self.hi:  # the exact zeros sit in the bin holding 0
            i = min(int((0 - self.lo) / width), BINS - 1)
            counts[i] = (counts[i] - self.zeros).clamp_min(0)
        return centers, counts

    def _percentile(self, lo: float, hi: float) -> tuple[float, float]:
        centers, _ = self._centers()
        cdf = self.hist.cumsum(0) / self.hist.sum().clamp_min(1)
        q_lo, q_hi = (centers[min(int(torch.searchsorted(cdf, torch.tensor(p, dtype=torch.float64))), BINS - 1)].item()
                      for p in (1e-4, 1 - 1e-4))
        return (min(q_lo, 0.0) if lo < 0 else 0.0), max(q_hi, 0.0)

    def _mse(self, lo: float, hi: float) -> tuple[float, float]:
        centers, counts = self._centers()
        fractions = torch.linspace(0.02, 1.0, 50, dtype=torch.float64)
        his = hi * fractions
        los = lo * fractions if lo < 0 else torch.zeros(1, dtype=torch.float64)
        cand_lo, cand_hi = torch.meshgrid(los, his, indexing="ij")
        cand_lo, cand_hi = cand_lo.reshape(-1, 1), cand_hi.reshape(-1, 1)
        delta = (cand_hi - cand_lo) / QMAX
        clipped = centers.clamp(min=cand_lo, max=cand_hi)  # broadcasts to (candidates, bins)
        err = torch.where((centers >= cand_lo) & (centers <= cand_hi), delta ** 2 / 12, (centers - clipped) ** 2)
        best = int((err * counts).sum(1).argmin())
        return cand_lo[best].item(), cand_hi[best].item()


def _qparams(lo: float, hi: float) -> tuple[float, int]:
    scale = max((hi - lo) / QMAX, 1e-8)
    zero_point = int(min(max(round(-lo / scale), 0), QMAX))
    return scale, zero_point
