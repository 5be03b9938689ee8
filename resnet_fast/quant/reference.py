"""The fake-quant reference of a QuantizedResNet in plain torch (fp64): what the int8 kernels must compute.

Activations are uint8 codes held in fp64; every conv dequantizes its input and weight, convolves in fp64,
adds bias (and the dequantized residual), applies ReLU and requantizes with round-half-even. The codes
agree with oneDNN's exactly wherever no float is rounded; oneDNN requantizes in fp32, so a value within
fp32 rounding of a .5 may round the other way (off by one).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import calibrate
from .structure import ConvSpec, PoolSpec

QParams = tuple[float, int]


def quantize(x: Tensor, qparams: QParams) -> Tensor:
    """The network input's codes as kernels.quantize_input makes them (the zero point added after rounding)."""
    scale, zero_point = qparams
    return (torch.round(x.double() * (1.0 / scale)) + zero_point).clamp(0, 255)


def requantize(y: Tensor, qparams: QParams) -> Tensor:
    """A conv output's codes as oneDNN makes them (the zero point added before rounding: 32.5 + 7 -> 40)."""
    scale, zero_point = qparams
    return torch.round(y / scale + zero_point).clamp(0, 255)


def dequantize(codes: Tensor, qparams: QParams) -> Tensor:
    return (codes.double() - qparams[1]) * qparams[0]


def conv(codes: Tensor, x_qparams: QParams, c: ConvSpec, out_qparams: QParams,
         accum: Optional[Tensor] = None, accum_qparams: QParams = (1.0, 0)) -> Tensor:
    """The uint8 codes (as fp64) of relu?(conv(x) + accum?) for the uint8 codes of x (and accum)."""
    y = calibrate.conv(dequantize(codes, x_qparams), c)
    if accum is not None:
        y = y + dequantize(accum, accum_qparams)
    if c.relu:
        y = y.relu()
    return requantize(y, out_qparams)


def avg_pool(codes: Tensor, p: PoolSpec) -> Tensor:
    return torch.round(calibrate.pool(codes.double(), p))


def forward(qmodel, x: Tensor) -> Tensor:
    """qmodel(x) as fake quantization in fp64."""
    net = qmodel.net()
    qp = {f"stem.{i}": c.out_qparams() for i, c in enumerate(qmodel.stem)}
    for i, b in enumerate(qmodel.blocks):
        qp.update({f"blocks.{i}.convs.{j}": c.out_qparams() for j, c in enumerate(b.convs)})
        if b.shortcut is not None:
            qp[f"blocks.{i}.shortcut"] = b.shortcut.out_qparams()
    x_qp = (qmodel.input_scale.item(), int(qmodel.input_zero_point))
    q = quantize(x, x_qp)
    for c in net.stem:
        q, x_qp = conv(q, x_qp, c, qp[c.name]), qp[c.name]
    q = calibrate.pool(q, net.maxpool)  # exact on codes
    for b in net.blocks:
        identity, id_qp = q, x_qp
        if b.shortcut_pool is not None:
            identity = avg_pool(identity, b.shortcut_pool)
        if b.shortcut is not None:
            identity, id_qp = conv(identity, id_qp, b.shortcut, qp[b.shortcut.name]), qp[b.shortcut.name]
        for c in b.convs[:-1]:
            q, x_qp = conv(q, x_qp, c, qp[c.name]), qp[c.name]
        last = b.convs[-1]
        q, x_qp = conv(q, x_qp, last, qp[last.name], identity, id_qp), qp[last.name]
    return F.linear(dequantize(q, x_qp).mean((2, 3)), net.fc_weight, net.fc_bias)
