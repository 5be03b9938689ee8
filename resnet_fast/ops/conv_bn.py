"""conv + BatchNorm (+ residual add) (+ ReLU): the one op every ResNet block is made of.

eval() BN (running statistics): BN is folded into the conv and the whole thing runs as one fused op
on the implementation resnet_fast.ops.dispatch routes it to (Triton, oneDNN, the extension's epilogue
after torch's conv, or plain torch). With autograd on, or under torch.compile, the fold runs on every
call so gradients and traces follow the parameters.
train() BN (batch statistics): torch's conv, then the fused bn_act op (BN + add + ReLU forward and
backward; resnet_fast.ops.bn_act).
Anything else (another norm layer, a custom conv, a hooked module) runs module by module.

Activations are kept in channels_last from the stem on: no hidden layout copies.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..backend import get_backend
from . import dispatch, ext, onednn, reference
from .bn_act import bn2_relu, bn_act
from .skip import skippable

_CL = torch.channels_last

# dispatch's implementation name -> the eval conv it runs; "triton" is added on first use, since
# importing triton fixes its TRITON_INTERPRET setting.
_EVAL = {"ext": ext.conv_bn_eval, "onednn": onednn.conv_bn_eval, "torch": reference.conv_bn_eval}


def conv_bn_act(x: Tensor, conv: nn.Module, bn: nn.Module,
                residual: Optional[Tensor] = None, relu: bool = False) -> Tensor:
    """relu?(bn(conv(x)) + residual?), through the fastest path for bn's mode; a conv or bn the fused
    ops do not recognise (is_plain_conv, is_batch_norm) runs as modules."""
    if is_plain_conv(conv) and is_batch_norm(bn):
        return fused_conv_bn_act(x, conv, bn, residual, relu)
    return _as_modules(x, conv, bn, residual, relu)


def fused_conv_bn_act(x: Tensor, conv: nn.Conv2d, bn: nn.Module,
                      residual: Optional[Tensor] = None, relu: bool = False) -> Tensor:
    """conv_bn_act for a conv and bn its caller has checked (is_plain_conv, is_batch_norm)."""
    if has_running_stats(bn):
        dtype = _compute_dtype(x)
        x = x.to(dtype).contiguous(memory_format=_CL)
        if residual is not None:
            residual = residual.to(dtype).contiguous(memory_format=_CL)
        impl = dispatch.route("conv_bias_act" if conv.groups == 1 else "grouped_conv_bias_act", x.device, dtype)
        if _needs_autograd(x, conv, bn, residual) or torch.compiler.is_compiling():
            # Only Triton's op and the torch composite are differentiable and traceable.
            run = _triton_eval() if impl == "triton" else reference.conv_bn_eval
            return run(x, conv, bn, residual, relu, differentiable=True)
        return (_EVAL.get(impl) or _triton_eval())(x, conv, bn, residual, relu)
    x = _train_layout(x)
    if type(bn) is nn.BatchNorm2d:  # the shortcut's BN too: the fused ops beat aten's BN without ReLU as well
        return bn_act(conv(x), bn, residual=residual, relu=relu)
    return _as_modules(x, conv, bn, residual, relu)


def fused_projection_end(x: Tensor, conv: nn.Conv2d, bn: nn.Module, shortcut_x: Tensor,
                         shortcut_conv: nn.Conv2d, shortcut_bn: nn.Module) -> Tensor:
    """relu(bn(conv(x)) + shortcut_bn(shortcut_conv(shortcut_x))): the last step of a block with a projection
    shortcut, for modules its caller has checked. In training both BNs, the add and the ReLU are one op
    (bn_act.bn2_relu); otherwise the shortcut's fused_conv_bn_act, then the main one adding it."""
    if type(bn) is nn.BatchNorm2d and type(shortcut_bn) is nn.BatchNorm2d and not (
            has_running_stats(bn) or has_running_stats(shortcut_bn)):
        return bn2_relu(conv(_train_layout(x)), bn, shortcut_conv(_train_layout(shortcut_x)), shortcut_bn)
    identity = fused_conv_bn_act(shortcut_x, shortcut_conv, shortcut_bn, None, False)
    return fused_conv_bn_act(x, conv, bn, identity, True)


def _as_modules(x: Tensor, conv: nn.Module, bn: nn.Module, residual: Optional[Tensor], relu: bool) -> Tensor:
    dispatch.CALLS[("conv_bn_act", "modules")] += 1
    out = bn(conv(x))
    if residual is not None:
        out = out + residual
    return F.relu(out) if relu else out


def _train_layout(x: Tensor) -> Tensor:
    """CPU: channels_last. oneDNN's NCHW training step is slower (conv backward, and aten's NCHW
    max-pool ~13x its channels_last one: torch.profiler, resnet18 batch 8); the first conv converts once.
    The "torch" backend keeps the caller's layout: it is the reference, op for op torchvision's."""
    if x.device.type == "cpu" and x.dim() == 4 and get_backend() != "torch":
        return x.contiguous(memory_format=_CL)
    return x


def _triton_eval():
    if "triton" not in _EVAL:
        from .triton import conv
        _EVAL["triton"] = conv.conv_bn_eval
    return _EVAL["triton"]


def is_plain_conv(conv: nn.Module) -> bool:
    """An nn.Conv2d that the fused ops compute exactly: zero padding given as numbers (stride, dilation,
    groups and bias are read on every call), no hook, no forward of its own."""
    return (skippable(conv, (nn.Conv2d,)) and conv.padding_mode == "zeros"
            and not isinstance(conv.padding, str))


_BATCH_NORMS = (nn.BatchNorm2d, nn.SyncBatchNorm)


def is_batch_norm(bn: nn.Module) -> bool:
    """torch's BatchNorm2d or SyncBatchNorm, or torchvision's FrozenBatchNorm2d (by name: timm's copy
    computes the same), with no hook and no forward of its own."""
    return skippable(bn, _BATCH_NORMS) or (type(bn).__name__ == "FrozenBatchNorm2d" and skippable(bn, (type(bn),)))


def has_running_stats(bn: nn.Module) -> bool:
    """A BatchNorm module (is_batch_norm) that normalizes with its running statistics: foldable."""
    if isinstance(bn, _BatchNorm):
        return not bn.training and bn.running_mean is not None
    return type(bn).__name__ == "FrozenBatchNorm2d"


def _compute_dtype(x: Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def _needs_autograd(x: Tensor, conv: nn.Module, bn: nn.Module, residual: Optional[Tensor]) -> bool:
    if not torch.is_grad_enabled():
        return False
    tensors = (x, residual, conv.weight, conv.bias, getattr(bn, "weight", None), getattr(bn, "bias", None))
    return any(t is not None and t.requires_grad for t in tensors)
