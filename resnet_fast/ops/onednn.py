"""The CPU eval conv of the "torch" backend: oneDNN's fused conv (+ add) (+ ReLU) on folded weights.

The folded weights are reordered once per weight version and input shape into
the blocked layout oneDNN's kernel for that shape wants (without that, oneDNN
reorders the weight on every call: ~25% of a ResNet-50 forward at batch 8,
~80% at batch 1). A whole ResNet forward on this path runs through
resnet_fast.models.cpu_runner.
"""
from __future__ import annotations

import functools
from collections import OrderedDict
from typing import Optional

import torch
from torch import Tensor, nn

from .. import fold

# Prepacked weights kept per conv and dtype: one per input shape, the most recently used first out.
# Several resolutions or batch sizes in turn each keep theirs; a stream of new shapes stays bounded.
SHAPES_PER_CONV = 4


class _Packs:
    """A conv's folded bias and its weights prepacked for each recent input shape."""
    __slots__ = ("bias", "by_shape")

    def __init__(self, bias: Tensor):
        self.bias, self.by_shape = bias, OrderedDict()


def _packed(conv: nn.Conv2d, bn: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """(weight, bias) for oneDNN, the weight reordered into the blocked layout oneDNN's kernel picks for
    x's shape. Packed for a default shape instead, oneDNN reorders the weight again on every call
    whenever its kernel for the real shape wants another layout: 104 ms instead of 2.2 ms for a
    512->512 3x3 conv at batch 1, 7x7 (benchmarks/cpu_micro.py on a 2-core AVX2 EPYC, torch 2.14.1)."""
    packs = fold.cached(conv, bn, ("onednn", x.dtype), lambda: _Packs(fold.fold_conv_bn(conv, bn)[1].to(x.dtype)))
    # The layout depends on the conv's arguments too, which may be changed between calls.
    shape = (tuple(x.shape), conv.padding, conv.stride, conv.dilation, conv.groups)
    weight = packs.by_shape.get(shape)
    if weight is not None:
        packs.by_shape.move_to_end(shape)
        return weight, packs.bias
    with torch.no_grad():  # the fold cache entry checks the sources: a new one starts empty
        w = fold.fold_conv_bn(conv, bn)[0].to(x.dtype)
        weight = torch.ops.mkldnn._reorder_convolution_weight(
            w, list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups, list(x.shape))
    packs.by_shape[shape] = weight
    if len(packs.by_shape) > SHAPES_PER_CONV:
        packs.by_shape.popitem(last=False)
    return weight, packs.bias


@functools.lru_cache(maxsize=None)
def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype oneDNN computes a conv of `dtype` in: bf16 natively where the CPU has bf16 kernels
    (AVX512-BW/VL/DQ or AVX-NE-CONVERT); otherwise fp32 (torch's own bf16 conv there is a scalar
    reference loop: eager bf16 ran 7.5-10x slower than this in README's recorded CPU benchmark)."""
    if dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return torch.float32
    return dtype


def conv_bn_eval(x: Tensor, conv_module: nn.Conv2d, bn: nn.Module, residual: Optional[Tensor], relu: bool) -> Tensor:
    """relu?(conv(x) folded with bn + residual?) as one oneDNN primitive, in x's dtype (float32 or
    bfloat16, CPU); see compute_dtype for bf16 on CPUs without bf16 kernels."""
    dtype = compute_dtype(x.dtype)
    if dtype != x.dtype:
        out = conv(x.to(dtype), conv_module, bn, None if residual is None else residual.to(dtype), relu,
                   overwrite_residual=True)  # a private copy
        return out.to(x.dtype)
    return conv(x, conv_module, bn, residual, relu)


def conv(x: Tensor, conv: nn.Conv2d, bn: nn.Module, residual: Optional[Tensor], relu: bool,
         overwrite_residual: bool = False) -> Tensor:
    """conv_bn_eval in x's dtype, which must be one oneDNN computes in. overwrite_residual: the result
    may be written into residual (no new buffer), for a caller that owns it."""
    w, b = _packed(conv, bn, x)
    args = (list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups)
    attr = "relu" if relu else "none"
    if residual is None:
        return torch.ops.mkldnn._convolution_pointwise(x, w, b, *args, attr, [], "")
    if conv.groups != 1 or (not overwrite_residual and residual.shape[2] * residual.shape[3] == 1):
        # Grouped: torch runs the add+ReLU post-op as at::add_relu, which has no bf16 kernel.
        # 1x1 outputs: torch 2.11's out-of-place binary conv fails there ("could not create a memory").
        out = torch.ops.mkldnn._convolution_pointwise(x, w, b, *args, "none", [], "").add_(residual)
        return out.relu_() if relu else out
    unary = attr if relu else None
    if overwrite_residual:
        return torch.ops.mkldnn._convolution_pointwise_.binary(residual, x, w, b, *args, "add", 1.0, unary,
                                                                [None], "")
    return torch.ops.mkldnn._convolution_pointwise.binary(x, residual, w, b, *args, "add", 1.0, unary, [], "")
