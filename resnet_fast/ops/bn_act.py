"""bn_act: act(bn(x) + residual) as fused ops, with nn.BatchNorm's exact semantics.

Training (batch statistics): one fused forward op (statistics, normalize,
residual add, ReLU), then the running-stats update; backward is one fused op
producing grad x, weight, bias and residual, the ReLU mask recomputed from the
output. Eval (running statistics): scale_bias_act with the folded scale/shift.

bn2_relu: relu(bn(x) + shortcut_bn(shortcut)), a projection block's end. In CPU training with the
extension both BNs, the add and the ReLU run as one op (bn2_relu_bits_fwd): the shortcut's normalized
output is never written; elsewhere it is bn_act twice.

Implementations (resnet_fast.ops.dispatch routes "bn_act"): "ext" (resnet_fast._C),
"triton", "torch" (reference.bn_act: the module, + residual, relu). Also exports
scale_bias_act and add_relu, the other fused epilogue ops.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .. import fold
from ..backend import get_backend
from . import bn_act_train, dispatch, reference
from ._op_meta import acc_dtype
from .add_relu import add_relu
from .scale_bias_act import scale_bias_act

__all__ = ["bn_act", "bn2_relu", "scale_bias_act", "add_relu"]

# Exactly these classes run fused; subclasses (SyncBatchNorm, ...) may change forward().
FUSABLE = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _check(x: Tensor, bn: _BatchNorm, residual: Optional[Tensor]) -> None:
    if not isinstance(bn, _BatchNorm):
        raise TypeError(f"bn_act: bn must be a torch.nn BatchNorm module, got {type(bn).__name__}")
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError(f"bn_act: x must be a floating-point tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    if residual is not None:
        if not isinstance(residual, Tensor):
            raise TypeError(f"bn_act: residual must be a tensor or None, got {type(residual).__name__}")
        if residual.shape != x.shape or residual.device != x.device:
            raise ValueError(f"bn_act: residual must have x's shape {tuple(x.shape)} on {x.device}, "
                             f"got {tuple(residual.shape)} on {residual.device}")


def _uses_batch_stats(bn: _BatchNorm) -> bool:
    """Whether bn.forward normalizes with the batch's statistics (training, or no running ones)."""
    return bn.training or (bn.running_mean is None and bn.running_var is None)


def _forward_state(bn: _BatchNorm) -> tuple[float, bool, Optional[Tensor], Optional[Tensor]]:
    """What nn.BatchNorm.forward computes before F.batch_norm, with the same side
    effect (num_batches_tracked += 1): (momentum, use batch stats, running_mean, running_var)."""
    momentum = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        momentum = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    keep = not bn.training or bn.track_running_stats
    return momentum, _uses_batch_stats(bn), bn.running_mean if keep else None, bn.running_var if keep else None


def bn_act(x: Tensor, bn: _BatchNorm, residual: Optional[Tensor] = None, relu: bool = True) -> Tensor:
    """act(bn(x) + residual) with bn.forward's semantics (training/eval, running
    stats and num_batches_tracked, momentum=None, affine=False), differentiable."""
    _check(x, bn, residual)
    if type(bn) not in FUSABLE:
        requested = get_backend()
        if requested not in ("auto", "torch"):
            raise ValueError(f"bn_act: backend {requested!r} fuses nn.BatchNorm1d/2d/3d only, got "
                             f"{type(bn).__name__}; use backend 'torch' or 'auto'")
        dispatch.CALLS[("bn_act", "torch")] += 1
        return reference.bn_act(x, bn, residual, relu)
    impl = dispatch.route("bn_act", x.device, x.dtype)
    if impl == "torch":
        return reference.bn_act(x, bn, residual, relu)

    bn._check_input_dim(x)
    if residual is not None and residual.dtype != x.dtype:
        # bn(x) + residual type-promotes; the fused ops take one dtype.
        dtype = torch.promote_types(x.dtype, residual.dtype)
        x, residual = x.to(dtype), residual.to(dtype)
    momentum, batch_stats, running_mean, running_var = _forward_state(bn)
    if not batch_stats:
        acc = acc_dtype(x.dtype)
        scale, shift = (t.to(acc) for t in fold.bn_scale_shift(bn))
        return dispatch.op(impl, "scale_bias_act")(x, scale, shift, residual, relu)
    count = x.numel() // x.shape[1] if x.shape[1] else 0
    if count <= 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {x.size()}")
    out, mean, var = bn_act_train.bn_act_fwd(impl, x, bn.weight, bn.bias, residual, bn.eps, relu)
    if running_mean is not None:
        with torch.no_grad():
            update = dispatch.op if torch.compiler.is_compiling() else dispatch.eager_op
            update(impl, "bn_update_stats_")(running_mean, running_var, mean, var, momentum, count)
    return out


def bn2_relu(x: Tensor, bn: _BatchNorm, shortcut: Tensor, shortcut_bn: _BatchNorm) -> Tensor:
    """relu(bn(x) + shortcut_bn(shortcut)), each BN with bn.forward's semantics, differentiable."""
    if not _fuses_both(x, bn, shortcut, shortcut_bn):
        return bn_act(x, bn, residual=bn_act(shortcut, shortcut_bn, relu=False), relu=True)
    states = []
    for t, norm in ((x, bn), (shortcut, shortcut_bn)):
        norm._check_input_dim(t)
        dispatch.route("bn_act", t.device, t.dtype)
        states.append(_forward_state(norm))
    count = x.numel() // x.shape[1] if x.shape[1] else 0
    if count <= 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {x.size()}")
    dispatch.CALLS[("bn2_relu", "ext")] += 1
    out, mean, var, s_mean, s_var, _ = dispatch.eager_op("ext", "bn2_relu_bits_fwd")(
        x, bn.weight, bn.bias, bn.eps, shortcut, shortcut_bn.weight, shortcut_bn.bias, shortcut_bn.eps)
    update = dispatch.eager_op("ext", "bn_update_stats_")
    with torch.no_grad():
        for (momentum, _, running_mean, running_var), m, v in zip(states, (mean, s_mean), (var, s_var)):
            if running_mean is not None:
                update(running_mean, running_var, m, v, momentum, count)
    return out


def _fuses_both(x: Tensor, bn: _BatchNorm, shortcut: Tensor, shortcut_bn: _BatchNorm) -> bool:
    """Whether bn2_relu runs as bn2_relu_bits_fwd: eager CPU training on the extension, both BNs plain
    BatchNorm modules using batch statistics, x and shortcut alike."""
    if torch.compiler.is_compiling() or type(bn) not in FUSABLE or type(shortcut_bn) not in FUSABLE:
        return False
    if not (_uses_batch_stats(bn) and _uses_batch_stats(shortcut_bn)):
        return False
    if not (isinstance(shortcut, Tensor) and isinstance(x, Tensor) and x.is_floating_point()
            and shortcut.dtype == x.dtype and shortcut.shape == x.shape and shortcut.device == x.device):
        return False
    return (dispatch.route("bn_act", x.device, x.dtype, count=False) == "ext"
            and bn_act_train.relu_bits_usable("ext", x, True))
