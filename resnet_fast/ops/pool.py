"""The pooling steps of a ResNet (stem max-pool, ResNet-D shortcut avg-pool,
global avg-pool + fc): Triton kernels where dispatch routes them there, the
extension's CPU max-pool for fp32 inference, the modules themselves otherwise."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from . import dispatch
from .skip import skippable


def _is(module: nn.Module, cls: type, **attrs) -> bool:
    """module is a `cls` with these attributes that a kernel may run in its place."""
    def same(value, want):
        return value == want or (isinstance(value, tuple) and all(v == want for v in value))
    return skippable(module, (cls,)) and all(same(getattr(module, k), v) for k, v in attrs.items())


def _on_triton(op: str, x: Tensor) -> bool:
    return dispatch.route(op, x.device, x.dtype) == "triton"


def max_pool(pool: nn.Module, x: Tensor) -> Tensor:
    if not _is(pool, nn.MaxPool2d, kernel_size=3, stride=2, padding=1, dilation=1, ceil_mode=False,
               return_indices=False):
        return pool(x)
    impl = dispatch.route("max_pool", x.device, x.dtype, count=False)
    if impl == "ext" and not _ext_max_pool_takes(x):
        impl = "torch"
    dispatch.CALLS[("max_pool", impl)] += 1
    if impl == "triton":
        from .triton import pool as triton_pool
        return triton_pool.max_pool_3x3s2(x)
    if impl == "ext":
        return dispatch.op("ext", "max_pool_3x3s2")(x)
    return pool(x)


def _ext_max_pool_takes(x: Tensor) -> bool:
    # fp32/fp64 channels_last, no backward (the C++ kernel has no autograd formula), and not while a graph
    # is being traced: compilers and exporters (ONNX) know aten's max-pool, not this op.
    return (x.dtype in (torch.float32, torch.float64) and x.dim() == 4 and not torch.compiler.is_compiling()
            and x.is_contiguous(memory_format=torch.channels_last)
            and not (x.requires_grad and torch.is_grad_enabled()))


def shortcut_pool(pool: nn.Module, x: Tensor) -> Tensor:
    if _is(pool, nn.AvgPool2d, kernel_size=2, stride=2, padding=0, ceil_mode=True, count_include_pad=False,
           divisor_override=None) and _on_triton("shortcut_pool", x):
        from .triton import pool as triton_pool
        return triton_pool.avg_pool_2x2_ceil(x)
    return pool(x)


def avgpool_fc(avgpool: nn.Module, fc: nn.Module, x: Tensor) -> Tensor:
    if (skippable(avgpool, (nn.AdaptiveAvgPool2d,)) and avgpool.output_size in ((1, 1), 1)
            and skippable(fc, (nn.Linear,))
            and not torch.is_autocast_enabled(x.device.type) and fc.weight.dtype == x.dtype
            and _on_triton("avgpool_fc", x)):
        from .triton import pool as triton_pool
        bias = fc.bias if fc.bias is not None else torch.zeros(fc.out_features, device=x.device)
        return triton_pool.avg_pool_fc(x, fc.weight, bias)
    return fc(torch.flatten(avgpool(x), 1))
