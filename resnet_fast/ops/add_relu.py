"""add_relu: relu(x + residual) in one pass, differentiable (grad masked by out > 0)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import dispatch, reference


def check_same(t: Tensor, x: Tensor, what: str, name: str) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{what}: {name} must be a tensor, got {type(t).__name__}")
    if t.shape != x.shape or t.dtype != x.dtype or t.device != x.device:
        raise ValueError(f"{what}: {name} must have x's shape, dtype and device "
                         f"({tuple(x.shape)}, {x.dtype}, {x.device}), got ({tuple(t.shape)}, {t.dtype}, {t.device})")


def check_float(x: Tensor, what: str) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{what}: x must be a tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{what}: x must be a floating-point tensor, got {x.dtype}")


def add_relu(x: Tensor, residual: Tensor, out: Optional[Tensor] = None) -> Tensor:
    """relu(x + residual). x and residual must have the same shape, dtype and device.

    out= (inference only) writes the result into `out`, which may be x itself
    (in place); it does not support autograd, like torch's out= variants.
    """
    check_float(x, "add_relu")
    check_same(residual, x, "add_relu", "residual")
    if out is not None:
        check_same(out, x, "add_relu", "out")
        if torch.is_grad_enabled() and (x.requires_grad or residual.requires_grad):
            raise RuntimeError("add_relu(out=...) does not support autograd; call add_relu(x, residual)")
    impl = dispatch.route("add_relu", x.device, x.dtype)
    if out is not None:
        if impl == "torch":
            return torch.add(x, residual, out=out).relu_()
        if out is x:
            dispatch.op(impl, "add_relu_")(x, residual)
        else:
            dispatch.op(impl, "add_relu_out")(x, residual, out)
        return out
    if impl == "torch":
        return reference.add_relu(x, residual)
    return dispatch.op(impl, "add_relu")(x, residual)
