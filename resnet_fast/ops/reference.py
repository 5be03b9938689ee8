"""The "torch" backend: each fused op written as plain PyTorch ops.

These composites are what the other backends must equal: the tests compare
every kernel against them (in the kernel's dtype: eager PyTorch's own error;
in float64: the reference). They always run, on any device and dtype.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import fold
from ._op_meta import acc_dtype


def conv_bias_act(x: Tensor, weight: Tensor, bias: Tensor, residual: Optional[Tensor] = None,
                  stride=1, padding=0, dilation=1, relu: bool = False, groups: int = 1) -> Tensor:
    """relu?(conv2d(x, weight) + bias + residual?), each step rounded to x's dtype as eager does."""
    y = F.conv2d(x, weight.to(x.dtype), bias.to(x.dtype), stride, padding, dilation, groups)
    if residual is not None:
        y = y + residual
    return F.relu(y) if relu else y


def conv_bn_eval(x: Tensor, conv: nn.Conv2d, bn: nn.Module, residual: Optional[Tensor], relu: bool,
                 differentiable: bool = False) -> Tensor:
    """conv + eval BatchNorm (+ residual) (+ ReLU) as a conv on the folded weights.

    differentiable: fold on every call (autograd and torch.compile trace through it); otherwise the
    folded weights come from the version-keyed cache and the epilogue runs in place."""
    if differentiable:
        w, b = fold.fold_conv_bn(conv, bn)
        return conv_bias_act(x, w, b, residual, conv.stride, conv.padding, conv.dilation, relu, conv.groups)
    w, b = fold.folded(conv, bn, x.device, x.dtype)
    out = F.conv2d(x, w, b.to(x.dtype), conv.stride, conv.padding, conv.dilation, conv.groups)
    if residual is not None:
        out.add_(residual)
    return out.relu_() if relu else out


def bn_act(x: Tensor, bn: nn.Module, residual: Optional[Tensor] = None, relu: bool = True) -> Tensor:
    """act(bn(x) + residual): the module itself, so every BatchNorm semantic is torch's."""
    y = bn(x)
    stats = getattr(bn, "running_mean", None), getattr(bn, "running_var", None)
    if bn.training and stats[0] is not None and y.grad_fn is None:
        # torch's batch_norm updates the running statistics without bumping their version counters
        # (torch 2.14: only the first update shows): bump them, as every resnet_fast write does. Not when
        # autograd recorded the op: it saved them and checks their versions in backward. Then the fold
        # cache sees the update through num_batches_tracked, which torch's BatchNorm bumps every time.
        torch.autograd.graph.increment_version([t for t in stats if t is not None])
    if residual is not None:
        y = y + residual
    return torch.relu(y) if relu else y


def scale_bias_act(x: Tensor, scale: Tensor, bias: Tensor, residual: Optional[Tensor] = None,
                   relu: bool = True) -> Tensor:
    """act(x * scale[c] + bias[c] (+ residual)), math in fp32 (fp64 for fp64), x's dtype out."""
    acc = acc_dtype(x.dtype)
    shape = (1, -1) + (1,) * (x.dim() - 2)
    y = torch.addcmul(bias.to(acc).view(shape), x.to(acc), scale.to(acc).view(shape))
    if residual is not None:
        y = y + residual
    return (torch.relu(y) if relu else y).to(x.dtype)


def add_relu(x: Tensor, residual: Tensor) -> Tensor:
    return torch.relu(x + residual)


def max_pool_3x3s2(x: Tensor) -> Tensor:
    return F.max_pool2d(x, 3, 2, 1)


def avg_pool_2x2_ceil(x: Tensor) -> Tensor:
    return F.avg_pool2d(x, 2, 2, ceil_mode=True, count_include_pad=False)


def avg_pool_fc(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    return F.linear(x.mean((2, 3)), weight, bias.to(x.dtype))
