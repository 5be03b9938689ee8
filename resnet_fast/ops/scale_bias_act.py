"""scale_bias_act: act(x * scale[c] + bias[c] (+ residual)) per channel (dim 1), in one pass.

The inference epilogue of an eval-mode BatchNorm (scale = weight / sqrt(var + eps),
bias = beta - mean * scale), used on CPU and after convs that stay on cuDNN.
NCHW and channels_last; the output has x's dtype, math in fp32 (fp64 for fp64).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import dispatch, reference
from .add_relu import check_float, check_same


def _check(x: Tensor, scale: Tensor, bias: Tensor, residual: Optional[Tensor]) -> None:
    what = "scale_bias_act"
    check_float(x, what)
    if x.dim() < 2:
        raise ValueError(f"{what}: x must be (N, C, ...) with at least 2 dims, got shape {tuple(x.shape)}")
    for name, p in (("scale", scale), ("bias", bias)):
        if not isinstance(p, Tensor) or not p.is_floating_point():
            raise TypeError(f"{what}: {name} must be a floating-point tensor, got {getattr(p, 'dtype', type(p))}")
        if p.shape != (x.shape[1],) or p.device != x.device:
            raise ValueError(f"{what}: {name} must have shape ({x.shape[1]},) on {x.device}, "
                             f"got {tuple(p.shape)} on {p.device}")
    if residual is not None:
        check_same(residual, x, what, "residual")


def scale_bias_act(x: Tensor, scale: Tensor, bias: Tensor, residual: Optional[Tensor] = None,
                   relu: bool = True, out: Optional[Tensor] = None) -> Tensor:
    """act(x * scale + bias (+ residual)); differentiable. out= (inference only) may be x (in place)."""
    _check(x, scale, bias, residual)
    if out is not None:
        check_same(out, x, "scale_bias_act", "out")
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, scale, bias, residual)):
            raise RuntimeError("scale_bias_act(out=...) does not support autograd; call it without out=")
    impl = dispatch.route("scale_bias_act", x.device, x.dtype)
    if out is not None:
        if impl == "torch":
            return out.copy_(reference.scale_bias_act(x, scale, bias, residual, relu))
        if out is x:
            dispatch.op(impl, "scale_bias_act_")(x, scale, bias, residual, relu)
        else:
            dispatch.op(impl, "scale_bias_act_out")(x, scale, bias, residual, relu, out)
        return out
    if impl == "torch":
        return reference.scale_bias_act(x, scale, bias, residual, relu)
    return dispatch.op(impl, "scale_bias_act")(x, scale, bias, residual, relu)
