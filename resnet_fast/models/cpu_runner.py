"""A ResNet's eval forward on CPU when all its convs run on oneDNN: one loop over prepacked convs.

Module by module, each conv pays for Python module calls, dispatch and checks, which show at batch 1
and dominate on small inputs. Here the model is read once into a plan
(its convs and their arguments, block by block); each forward checks in one pass over the modules that
the plan still describes the model (same submodules, all in eval, no hooks) and runs the convs back to
back. Weights still come from the fold cache (ops.onednn), which keys every source tensor's version,
so no stale weight can be used.

Because nothing outside can see the activations (no hook, no autograd, no compiler), a block's last
conv writes its result into the residual it adds (inductor's trick: no new buffer, one stream less).
"""
from __future__ import annotations

import weakref
from typing import NamedTuple, Optional

import torch
from torch import Tensor, nn
from torch.nn.modules import module as _module

from ..ops import dispatch, onednn
from ..ops import pool as pool_ops
from ..ops.conv_bn import has_running_stats, is_plain_conv


class _Conv(NamedTuple):
    conv: nn.Conv2d
    bn: nn.Module
    relu: bool


class _Block(NamedTuple):
    pools: tuple[nn.Module, ...]  # ResNet-D's shortcut avg-pool
    shortcut: Optional[_Conv]  # None: the identity
    convs: tuple[_Conv, ...]  # the last adds the shortcut


class _Plan(NamedTuple):
    modules: tuple[tuple[nn.Module, dict], ...]  # every module with its children when planned
    stem: tuple[_Conv, ...]
    blocks: tuple[_Block, ...]
    grouped: int  # how many of the convs are grouped (counted apart in dispatch.CALLS)


_PLANS: "weakref.WeakKeyDictionary[nn.Module, Optional[_Plan]]" = weakref.WeakKeyDictionary()


def forward(model: nn.Module, x: Tensor) -> Optional[Tensor]:
    """model(x) through the plan, or None when the plan does not apply (the caller runs module by module)."""
    if (x.device.type != "cpu" or x.dtype not in (torch.float32, torch.bfloat16) or torch.is_grad_enabled()
            or torch.is_autocast_enabled("cpu") or torch.compiler.is_compiling()):
        return None
    plan = _PLANS.get(model)
    if plan is None or not _describes(plan):
        plan = _PLANS[model] = _plan(model)
        if plan is None or not _describes(plan):
            return None
    grouped = ("grouped_conv_bias_act",) if plan.grouped else ()
    for op in ("conv_bias_act", *grouped):
        if dispatch.route(op, x.device, x.dtype, count=False) != "onednn":
            return None
    return _run(plan, model, x)


def _describes(plan: _Plan) -> bool:
    """The model still has the planned submodules, all in eval, with no hook anywhere."""
    if _module._global_forward_hooks or _module._global_forward_pre_hooks:
        return False
    return all(m._modules == children and not (m.training or m._forward_hooks or m._forward_pre_hooks)
               for m, children in plan.modules)


def _run(plan: _Plan, model: nn.Module, x: Tensor) -> Tensor:
    dtype = x.dtype
    # bf16 on a CPU without bf16 kernels: the convs run in fp32 throughout, the head in bf16 again.
    x = x.to(onednn.compute_dtype(dtype)).contiguous(memory_format=torch.channels_last)
    for c in plan.stem:
        x = onednn.conv(x, c.conv, c.bn, None, c.relu)
    x = pool_ops.max_pool(model.maxpool, x)
    for block in plan.blocks:
        identity = x
        for pool in block.pools:
            identity = pool_ops.shortcut_pool(pool, identity)
        if block.shortcut is not None:
            identity = onednn.conv(identity, block.shortcut.conv, block.shortcut.bn, None, False)
        *inner, last = block.convs
        for c in inner:
            x = onednn.conv(x, c.conv, c.bn, None, c.relu)
        # identity is an activation of this forward (never the caller's input): it may be overwritten.
        x = onednn.conv(x, last.conv, last.bn, identity, last.relu, overwrite_residual=True)
    n = len(plan.stem) + sum(len(b.convs) + (b.shortcut is not None) for b in plan.blocks)
    dispatch.CALLS[("conv_bias_act", "onednn")] += n - plan.grouped
    dispatch.CALLS[("grouped_conv_bias_act", "onednn")] += plan.grouped
    return pool_ops.avgpool_fc(model.avgpool, model.fc, x.to(dtype))


def _plan(model: nn.Module) -> Optional[_Plan]:
    """The plan of a torchvision-shaped ResNet whose convs are all conv + BN in eval, else None."""
    from .resnet import BasicBlock, Bottleneck
    stem = [model.conv1, model.bn1] if isinstance(model.conv1, nn.Conv2d) else None
    if isinstance(model.conv1, nn.Sequential) and len(model.conv1) == 7:
        c0, b0, _, c1, b1, _, c2 = model.conv1
        stem = [c0, b0, c1, b1, c2, model.bn1]
    if stem is None:
        return None
    convs = [_Conv(c, b, True) for c, b in zip(stem[::2], stem[1::2])]
    blocks = []
    for layer in (model.layer1, model.layer2, model.layer3, model.layer4):
        for block in layer:
            if type(block) not in (BasicBlock, Bottleneck):
                return None  # a subclass may run another forward
            names = ("conv1", "bn1", "conv2", "bn2") + (("conv3", "bn3") if type(block) is Bottleneck else ())
            pairs = [getattr(block, n) for n in names]
            inner = tuple(_Conv(c, b, True) for c, b in zip(pairs[::2], pairs[1::2]))
            pools, shortcut = (), None
            down = block.downsample
            if down is not None:
                if not (isinstance(down, nn.Sequential) and len(down) >= 2 and isinstance(down[-2], nn.Conv2d)):
                    return None
                *pools, conv, bn = down
                shortcut = _Conv(conv, bn, False)
            blocks.append(_Block(tuple(pools), shortcut, inner))
            convs += [*inner, *([shortcut] if shortcut else [])]
    if not all(is_plain_conv(c.conv) and has_running_stats(c.bn) for c in convs):
        return None
    modules = tuple((m, dict(m._modules)) for m in model.modules())
    return _Plan(modules, tuple(convs[:len(stem) // 2]), tuple(blocks), sum(c.conv.groups != 1 for c in convs))
