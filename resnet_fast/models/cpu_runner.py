"""A ResNet's eval forward on CPU when all its convs run on oneDNN: one loop over prepacked convs.

Module by module, each conv pays for Python module calls, dispatch and checks, which show at batch 1
and dominate on small inputs. Here the model's stem and blocks are read into the fused steps of
models/fused.py, the same steps the module-by-module forward runs, and run back to back. They are read
on every forward (nothing is kept, so nothing goes stale and no model is held): the runner stays out
unless every module it would not call is recognised (exact classes, no hook, no forward of its own,
every BN on running statistics). Weights come from the fold cache (ops.onednn), which checks every
source tensor, so no stale weight is used.

Because nothing outside can see the activations (no hook, no autograd, no compiler), a block's last
conv writes its result into the residual it adds (inductor's trick: no new buffer, one stream less).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from ..ops import dispatch, onednn
from ..ops import pool as pool_ops
from ..ops.conv_bn import has_running_stats
from ..ops.skip import skippable
from . import fused
from .blocks import BasicBlock, Bottleneck

_LAYER = (nn.Sequential,)
_BLOCKS = (BasicBlock, Bottleneck)


def forward(model: nn.Module, x: Tensor) -> Optional[Tensor]:
    """model(x) through oneDNN, or None when the runner does not apply (the caller runs module by module)."""
    if (x.device.type != "cpu" or x.dtype not in (torch.float32, torch.bfloat16) or torch.is_grad_enabled()
            or torch.is_autocast_enabled("cpu") or torch.compiler.is_compiling()):
        return None
    stem = fused.stem_plan(model)
    if stem is None:
        return None
    blocks = []
    for layer in (model.layer1, model.layer2, model.layer3, model.layer4):
        if not skippable(layer, _LAYER):
            return None
        for block in layer:
            plan = fused.block_plan(block) if skippable(block, _BLOCKS) else None
            if plan is None:
                return None
            blocks.append(plan)
    steps = fused.steps(stem, blocks)
    if not all(has_running_stats(s.bn) for s in steps):
        return None
    grouped = sum(s.conv.groups != 1 for s in steps)
    for op in ("conv_bias_act", *(("grouped_conv_bias_act",) if grouped else ())):
        if dispatch.route(op, x.device, x.dtype, count=False) != "onednn":
            return None
    out = _run(model, stem, blocks, x)
    dispatch.CALLS[("conv_bias_act", "onednn")] += len(steps) - grouped
    dispatch.CALLS[("grouped_conv_bias_act", "onednn")] += grouped
    return out


def _conv(x: Tensor, conv: nn.Conv2d, bn: nn.Module, residual: Optional[Tensor], relu: bool) -> Tensor:
    # A residual here is always an activation of this forward (never the caller's input): overwritable.
    return onednn.conv(x, conv, bn, residual, relu, overwrite_residual=residual is not None)


def _run(model: nn.Module, stem: tuple, blocks: list, x: Tensor) -> Tensor:
    dtype = x.dtype
    # bf16 on a CPU without bf16 kernels: the convs run in fp32 throughout, the head in bf16 again.
    x = x.to(onednn.compute_dtype(dtype)).contiguous(memory_format=torch.channels_last)
    x = fused.run_stem(stem, x, _conv)
    x = pool_ops.max_pool(model.maxpool, x)
    for plan in blocks:
        x = fused.run_block(plan, x, _conv, end_fn=None)
    return pool_ops.avgpool_fc(model.avgpool, model.fc, x.to(dtype))
