"""The project's accuracy rule, shared by the tuner (which judges kernels with it at run time) and the tests.

The 2x rule (flash-attention's): our error against a high-precision reference is at most twice eager
PyTorch's own error in the same precision, plus a small floor relative to the reference's size.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

# The floor: two roundings of a half type; for fp32 room for another summation order over a few
# hundred terms. Absolute for values of order one (a result that cancels to ~0 keeps the rounding
# noise of its inputs), relative beyond; relative to the whole tensor in the L2 norm.
FLOOR = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2 ** -9, torch.bfloat16: 2 ** -6}


def error(ours: torch.Tensor, ref: torch.Tensor, norm: str = "max") -> float:
    """max |ours - ref| ("max") or ||ours - ref||_2 ("l2"), in float64."""
    d = ours.detach().double() - ref.detach().double().to(ours.device)
    return (d.abs().max() if norm == "max" else d.norm()).item() if d.numel() else 0.0


class Verdict(NamedTuple):
    ok: bool
    error: float  # ours vs the reference
    bound: float  # 2 x eager's error + the floor
    why: str  # "" when ok


def within_2x(ours: torch.Tensor, eager: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype,
              norm: str = "max") -> Verdict:
    """|ours - ref| <= 2 |eager - ref| + FLOOR[dtype] * scale, in the max norm with scale = max(1, |ref|),
    or in the L2 norm with scale = |ref|. Non-finite values or a wrong shape never pass."""
    if tuple(ours.shape) != tuple(ref.shape):
        return Verdict(False, float("inf"), 0.0, f"shape {tuple(ours.shape)} != {tuple(ref.shape)}")
    if not bool(torch.isfinite(ours).all()):
        return Verdict(False, float("inf"), 0.0, "non-finite values")
    size = error(ref, torch.zeros_like(ref), norm)
    scale = size if norm == "l2" else max(1.0, size)
    err, eager_err = error(ours, ref, norm), error(eager, ref, norm)
    bound = 2 * eager_err + FLOOR[dtype] * scale
    if err <= bound:
        return Verdict(True, err, bound, "")
    return Verdict(False, err, bound, f"error {err:.3g} > 2 x eager's {eager_err:.3g} + floor "
                                      f"{FLOOR[dtype] * scale:.3g} ({dtype}, |ref| {size:.3g})")
