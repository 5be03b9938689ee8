"""Input validation for ResNet.forward: a clear error instead of a kernel trace."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn


def _first_conv(model: nn.Module) -> nn.Conv2d:
    conv1 = model.conv1
    return conv1[0] if isinstance(conv1, nn.Sequential) else conv1


def check_input(model: nn.Module, x: Tensor) -> Optional[Tensor]:
    """Validate x for model; return the (empty) output directly for batch 0 in eval."""
    if not isinstance(x, Tensor):
        raise TypeError(f"ResNet expected a torch.Tensor input, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"ResNet expected a 4D input (N, C, H, W), got a {x.dim()}D tensor of shape {tuple(x.shape)}")
    conv = _first_conv(model)
    if x.shape[1] != conv.in_channels:
        raise ValueError(
            f"ResNet expected {conv.in_channels} input channels (N, {conv.in_channels}, H, W), "
            f"got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"ResNet expected a floating-point input (float32, float16 or bfloat16), got {x.dtype}")
    weight = conv.weight
    if x.device != weight.device:
        raise ValueError(f"input is on {x.device} but the model's parameters are on {weight.device}")
    if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
        raise TypeError(
            f"input dtype {x.dtype} does not match the model's parameters ({weight.dtype}); "
            f"convert one of them (e.g. model.to({x.dtype})) or run under torch.autocast")
    if x.shape[0] == 0 and not model.training:
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        return x.new_empty((0, model.fc.out_features), dtype=dtype) if isinstance(model.fc, nn.Linear) else None
    return None
