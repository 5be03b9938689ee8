"""The CPU eval conv of the "torch" backend: oneDNN's fused conv (+ add) (+ ReLU) on folded weights.

The folded weights are reordered once per weight version into oneDNN's blocked
layout (without that, oneDNN reorders every weight on every call: ~25% of a
ResNet-50 forward at batch 8). A block's last conv may write its result into
the residual it adds (inductor's trick: no new buffer, one stream less), but
only while a ResNet forward that owns every activation is running and nothing
outside it (a hook, autograd, a compiler) can see them.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Iterator, Optional

import torch
from torch import Tensor, nn

from .. import fold

_local = threading.local()


@contextlib.contextmanager
def activations_owned_by(model: nn.Module) -> Iterator[None]:
    """Inside, a residual may be overwritten by the conv that consumes it, if `model` lets nobody else
    see its activations. The check runs at most once per forward, and only when this path runs."""
    previous = getattr(_local, "owner", None), getattr(_local, "private", None)
    _local.owner, _local.private = model, None
    try:
        yield
    finally:
        _local.owner, _local.private = previous


def _residual_reusable() -> bool:
    if getattr(_local, "owner", None) is None:
        return False  # a block called directly never overwrites its caller's tensor
    if _local.private is None:
        _local.private = activations_private(_local.owner)
    return _local.private


def activations_private(model: nn.Module) -> bool:
    """True when nothing outside model's forward can see the activations between its blocks (eval,
    no autograd, no compile, no forward hooks), so a block's input may be overwritten by its last conv."""
    if model.training or torch.is_grad_enabled() or torch.compiler.is_compiling():
        return False
    from torch.nn.modules import module as _module
    if _module._global_forward_hooks or _module._global_forward_pre_hooks:
        return False
    return not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def _packed(conv: nn.Conv2d, bn: nn.Module, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    def build():
        w, b = fold.fold_conv_bn(conv, bn)
        packed = torch.ops.mkldnn._reorder_convolution_weight(
            w.to(dtype), list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups, None)
        return packed, b.to(dtype)
    return fold.cached(conv, bn, ("onednn", dtype), build)


def conv_bn_eval(x: Tensor, conv: nn.Conv2d, bn: nn.Module, residual: Optional[Tensor], relu: bool) -> Tensor:
    """relu?(conv(x) folded with bn + residual?) as one oneDNN primitive (float32 or bfloat16, CPU)."""
    w, b = _packed(conv, bn, x.dtype)
    args = (list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups)
    attr = "relu" if relu else "none"
    if residual is None:
        return torch.ops.mkldnn._convolution_pointwise(x, w, b, *args, attr, [], "")
    if conv.groups != 1:
        # torch runs a grouped conv's add+ReLU post-op as at::add_relu, which has no bf16 kernel.
        out = torch.ops.mkldnn._convolution_pointwise(x, w, b, *args, "none", [], "").add_(residual)
        return out.relu_() if relu else out
    unary = attr if relu else None
    if _residual_reusable():
        return torch.ops.mkldnn._convolution_pointwise_.binary(residual, x, w, b, *args, "add", 1.0, unary,
                                                                [None], "")
    return torch.ops.mkldnn._convolution_pointwise.binary(x, residual, w, b, *args, "add", 1.0, unary, [], "")
