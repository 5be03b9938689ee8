"""The CPU int8 kernels: torch's oneDNN u8 x s8 convolution (onednn::qconv2d_pointwise and its .binary
variant, the ops inductor lowers PT2E int8 convs to), with weights prepacked once per input shape.

Every activation is uint8 with a per-tensor (scale, zero point); weights are per-output-channel symmetric
int8 with an fp32 bias. oneDNN accumulates in int32 and requantizes in fp32:
    out = saturate_u8(round_half_even((x_scale * w_scale[c] * acc + bias[c] [+ accum_scale * (accum - accum_zp)])
                                     [relu] / out_scale) + out_zp)
so the only rounding of a float is that last one (where a reference computing in fp64 can land on the other
side of a .5 and differ by one).
"""
from __future__ import annotations

from collections import Counter, OrderedDict
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..ops import ext

# Calls per kernel ("conv", "conv_sum_relu", "prepack"): tests read them to prove the int8 kernels ran.
CALLS: Counter = Counter()

# Prepacked weights kept per conv: one per input shape, the least recently used dropped first.
SHAPES_PER_CONV = 4


class PackedConv:
    """One int8 conv's arguments as oneDNN takes them, and its weight prepacked per input shape."""
    __slots__ = ("weight", "w_scale", "w_zero_point", "bias", "stride", "padding", "dilation", "groups",
                 "x_scale", "x_zero_point", "out_scale", "out_zero_point", "by_shape")

    def __init__(self, weight: Tensor, w_scale: Tensor, bias: Tensor, geometry: list[int],
                 x_qparams: tuple[float, int], out_qparams: tuple[float, int]):
        self.weight, self.w_scale, self.bias = weight, w_scale.float(), bias.float()
        self.w_zero_point = torch.zeros(weight.shape[0], dtype=torch.long)
        self.stride, self.padding, self.dilation = geometry[0:2], geometry[2:4], geometry[4:6]
        self.groups = geometry[6]
        self.x_scale, self.x_zero_point = x_qparams
        self.out_scale, self.out_zero_point = out_qparams
        self.by_shape: OrderedDict = OrderedDict()

    def packed_weight(self, x: Tensor) -> Tensor:
        """The weight in the blocked layout oneDNN's kernel for x's shape wants (reordered on every call otherwise)."""
        shape = tuple(x.shape)
        w = self.by_shape.get(shape)
        if w is not None:
            self.by_shape.move_to_end(shape)
            return w
        CALLS["prepack"] += 1
        w = self.by_shape[shape] = torch.ops.onednn.qconv_prepack(
            self.weight, self.w_scale, self.x_scale, self.x_zero_point, self.stride, self.padding, self.dilation,
            self.groups, list(shape))
        if len(self.by_shape) > SHAPES_PER_CONV:
            self.by_shape.popitem(last=False)
        return w


def conv(x: Tensor, c: PackedConv, relu: bool, accum: Optional[Tensor] = None,
         accum_qparams: tuple[float, int] = (1.0, 0)) -> Tensor:
    """relu?(conv(x) + accum?) requantized to c's output uint8, channels_last. accum (uint8, channels_last)
    is oneDNN's sum post-op: it is overwritten (the caller must own it)."""
    w = c.packed_weight(x)
    if accum is None:
        CALLS["conv"] += 1
        return torch.ops.onednn.qconv2d_pointwise(
            x, c.x_scale, c.x_zero_point, w, c.w_scale, c.w_zero_point, c.bias, c.stride, c.padding, c.dilation,
            c.groups, c.out_scale, c.out_zero_point, None, "relu" if relu else "none", [], "")
    CALLS["conv_sum_relu" if relu else "conv_sum"] += 1
    return torch.ops.onednn.qconv2d_pointwise.binary(
        x, c.x_scale, c.x_zero_point, w, c.w_scale, c.w_zero_point, accum, c.bias, c.stride, c.padding,
        c.dilation, c.groups, c.out_scale, c.out_zero_point, None, accum_qparams[0], accum_qparams[1], "sum", 1.0,
        "relu" if relu else None, [], "")


def quantize_input(x: Tensor, scale: float, zero_point: int) -> Tensor:
    """fp32 NCHW or channels_last -> uint8 channels_last: clamp(round_half_even(x * (1 / scale)) + zp, 0, 255)."""
    q = torch.mul(x.contiguous(memory_format=torch.channels_last), 1.0 / scale).round_().add_(zero_point)
    return q.clamp_(0, 255).to(torch.uint8)


def max_pool(x: Tensor, kernel: int, stride: int, padding: int, ceil_mode: bool) -> Tensor:
    """Max-pool straight on uint8 codes: exact (max commutes with the monotone quantization), same qparams.
    The stem's 3x3/2 pool runs in the extension's one-pass kernel; aten's max_pool2d fails on uint8
    channels_last (torch 2.14), so any other pool goes through fp32 (exact for uint8 values)."""
    if (kernel, stride, padding, ceil_mode) == (3, 2, 1, False) and ext.available(x.device):
        return torch.ops.resnet_fast.max_pool_3x3s2(x)
    return F.max_pool2d(x.float(), kernel, stride, padding, ceil_mode=ceil_mode).to(torch.uint8)


def avg_pool(x: Tensor, kernel: int, stride: int, padding: int, ceil_mode: bool, count_include_pad: bool) -> Tensor:
    """ResNet-D's shortcut average pool on uint8 codes, same qparams: round_half_even(mean of the codes)
    (the zero point is an integer, so it passes through the mean unchanged)."""
    y = F.avg_pool2d(x.float(), kernel, stride, padding, ceil_mode=ceil_mode, count_include_pad=count_include_pad)
    return y.round_().to(torch.uint8).contiguous(memory_format=torch.channels_last)


def head(x: Tensor, qparams: tuple[float, int], fc_weight: Tensor, fc_bias: Tensor) -> Tensor:
    """Global average pool of the last uint8 activation and the fc, in fp32 (1/49 of the last block's work)."""
    scale, zero_point = qparams
    pooled = x.mean((2, 3), dtype=torch.float32)
    return F.linear((pooled - zero_point) * scale, fc_weight, fc_bias)
