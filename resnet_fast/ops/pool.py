"""The pooling steps of a ResNet (stem max-pool, ResNet-D shortcut avg-pool,
global avg-pool + fc) on Triton kernels where the Triton backend is selected;
the modules themselves otherwise."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import backend as _backend


def _triton_selected(x: Tensor) -> bool:
    requested = _backend.get_backend()
    if requested == "triton":
        _backend.require("triton", x.device)
        return x.dtype in (torch.float32, torch.float16, torch.bfloat16)
    return (requested == "auto" and x.device.type == "cuda" and _backend.triton_usable(x.device)
            and x.dtype in (torch.float16, torch.bfloat16, torch.float32))


def _is(module: nn.Module, cls: type, **attrs) -> bool:
    def same(value, want):
        return value == want or (isinstance(value, tuple) and all(v == want for v in value))
    return type(module) is cls and all(same(getattr(module, k), v) for k, v in attrs.items())


def max_pool(pool: nn.Module, x: Tensor) -> Tensor:
    if _is(pool, nn.MaxPool2d, kernel_size=3, stride=2, padding=1, dilation=1, ceil_mode=False,
           return_indices=False) and _triton_selected(x):
        from .triton_pool import max_pool_3x3s2
        return max_pool_3x3s2(x)
    return pool(x)


def shortcut_pool(pool: nn.Module, x: Tensor) -> Tensor:
    if _is(pool, nn.AvgPool2d, kernel_size=2, stride=2, padding=0, ceil_mode=True, count_include_pad=False,
           divisor_override=None) and _triton_selected(x):
        from .triton_pool import avg_pool_2x2_ceil
        return avg_pool_2x2_ceil(x)
    return pool(x)


def avgpool_fc(avgpool: nn.Module, fc: nn.Module, x: Tensor) -> Tensor:
    if (type(avgpool) is nn.AdaptiveAvgPool2d and avgpool.output_size in ((1, 1), 1) and type(fc) is nn.Linear
            and not torch.is_autocast_enabled(x.device.type) and fc.weight.dtype == x.dtype
            and _triton_selected(x)):
        from .triton_pool import avg_pool_fc
        return avg_pool_fc(x, fc.weight, fc.bias if fc.bias is not None else torch.zeros(
            fc.out_features, device=x.device, dtype=torch.float32))
    return fc(torch.flatten(avgpool(x), 1))
