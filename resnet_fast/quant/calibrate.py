"""Calibration: the fp32 forward of a Net with an observer on every quantized activation.

The quantized activations are the network input and every conv's output (after its ReLU; for a
block's last conv, after the residual add and ReLU). Max-pool and the ResNet-D shortcut pool keep
their input's quantization, the avg-pool + fc head runs in fp32 (see qmodule).
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor

from .observers import HistogramObserver
from .structure import ConvSpec, Net, PoolSpec

INPUT = "input"


def conv(x: Tensor, c: ConvSpec) -> Tensor:
    return F.conv2d(x, c.weight.to(x.dtype), c.bias.to(x.dtype), c.stride, c.padding, c.dilation, c.groups)


def pool(x: Tensor, p: PoolSpec) -> Tensor:
    if p.kind == "max":
        return F.max_pool2d(x, p.kernel, p.stride, p.padding, ceil_mode=p.ceil_mode)
    return F.avg_pool2d(x, p.kernel, p.stride, p.padding, ceil_mode=p.ceil_mode,
                        count_include_pad=p.count_include_pad)


def float_forward(net: Net, x: Tensor, act: Callable[[str, Tensor], Tensor]) -> Tensor:
    """net(x) in x's dtype; act(name, activation) sees (and may replace) each quantized activation."""
    x = act(INPUT, x)
    for c in net.stem:
        x = act(c.name, conv(x, c).relu())
    x = pool(x, net.maxpool)
    for b in net.blocks:
        identity = x if b.shortcut_pool is None else pool(x, b.shortcut_pool)
        if b.shortcut is not None:
            identity = act(b.shortcut.name, conv(identity, b.shortcut))
        for c in b.convs[:-1]:
            x = act(c.name, conv(x, c).relu())
        last = b.convs[-1]
        x = act(last.name, (conv(x, last) + identity).relu())
    return F.linear(x.mean((2, 3)), net.fc_weight.to(x.dtype), net.fc_bias.to(x.dtype))


def observe(net: Net, batches: Iterable[Tensor], method: str) -> dict[str, tuple[float, int]]:
    """{activation name: (scale, zero_point)} from two passes over the batches (range, then histogram)."""
    observers: dict[str, HistogramObserver] = {}

    def record_range(name: str, t: Tensor) -> Tensor:
        observers.setdefault(name, HistogramObserver(method)).observe_range(t)
        return t

    def record_histogram(name: str, t: Tensor) -> Tensor:
        observers[name].observe_histogram(t)
        return t

    with torch.no_grad():
        for record in (record_range, record_histogram):
            for x in batches:
                float_forward(net, x, record)
    return {name: o.qparams() for name, o in observers.items()}
