"""quantize(): calibrate a resnet_fast ResNet and return its int8 QuantizedResNet."""
from __future__ import annotations

import warnings
from typing import Iterable

import torch
from torch import Tensor, nn

from . import calibrate, isa, observers, qmodule, structure


def _batch(item, in_channels: int, index: int) -> Tensor:
    x = item[0] if isinstance(item, (tuple, list)) and item else item
    if not isinstance(x, Tensor):
        raise TypeError(f"calibration batch {index}: expected a tensor or an (input, target) pair, "
                        f"got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"calibration batch {index}: expected a floating-point image tensor, got {x.dtype}")
    if x.dim() != 4 or x.shape[1] != in_channels or x.shape[0] == 0:
        raise ValueError(f"calibration batch {index}: expected shape (N>0, {in_channels}, H, W), got {tuple(x.shape)}")
    return x.detach().to("cpu", torch.float32)


def quantize(model: nn.Module, calibration: Iterable, observer: str = "mse") -> qmodule.QuantizedResNet:
    """An int8 copy of `model` (a resnet_fast ResNet in eval mode) for CPU inference.

    calibration: an iterable of input batches, tensors or (input, target) pairs as a DataLoader yields them;
    it is read once (its batches are kept for the observers' two passes), so a few batches are enough.
    observer: "mse" (default), "percentile" or "minmax" (observers.py; benchmarks/int8_digits.py compares them).

    Weights: per-output-channel symmetric int8 of the BN-folded convs (7-bit on CPUs without VNNI, with a
    warning: see quant/isa.py). Activations: uint8 per tensor (zero point 0 after a ReLU). The fc stays fp32.
    """
    if observer not in observers.METHODS:
        raise ValueError(f"observer must be one of {observers.METHODS}, got {observer!r}")
    net = structure.read(model)
    if isinstance(calibration, Tensor):
        calibration = [calibration]
    batches = [_batch(item, net.in_channels, i) for i, item in enumerate(calibration)]
    if not batches:
        raise ValueError("quantize: calibration yielded no batches; pass an iterable of input tensors "
                         "or (input, target) pairs")
    qmax = isa.weight_qmax()
    if qmax != isa.FULL_WEIGHT_QMAX:
        warnings.warn(f"int8 on a CPU without VNNI ({isa.isa_name()}): weights use 7 bits (|w| <= {qmax}) so "
                      "oneDNN's int16 pair sums cannot saturate; expect about twice the weight rounding error",
                      stacklevel=2)
    qparams = calibrate.observe(net, batches, observer)
    return qmodule.build(net, qparams, qmax)
