"""The fused forward of a ResNet, described once: which modules it stands in for, and how it runs them.

stem_plan and block_plan read a model's modules into conv + BN (+ ReLU) steps, or return None when a
module the fused forward would not call is not one it recognises exactly: a conv with another padding
mode, an activation that is not exactly nn.ReLU, a module with a hook or a forward set on the instance,
a hook on every module. The caller then runs the user's modules (torchvision's forward). The check runs
on every forward: a model can change between two calls.

run_stem and run_block run the steps with a conv function: ops.conv_bn's fused op for the
module-by-module path (ResNet.forward, a block's forward; a projection block's last step there is one op with
its shortcut, ops.conv_bn.fused_projection_end), oneDNN's prepacked conv for the CPU runner. Both forwards run
the same steps, so they cannot drift apart.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional

from torch import Tensor, nn

from ..ops import pool as pool_ops
from ..ops.conv_bn import fused_conv_bn_act, fused_projection_end, is_batch_norm, is_plain_conv
from ..ops.skip import global_hooks, skippable

_RELU = (nn.ReLU,)
_SEQUENTIAL = (nn.Sequential,)


class ConvBN(NamedTuple):
    conv: nn.Conv2d
    bn: nn.Module
    relu: bool


class BlockPlan(NamedTuple):
    convs: tuple[ConvBN, ...]  # the main branch; the last adds the shortcut before its ReLU
    pools: tuple[nn.Module, ...]  # ResNet-D's shortcut average pool (called through ops.pool)
    shortcut: Optional[ConvBN]  # the projection; None: the identity


# conv_fn(x, conv, bn, residual, relu): relu?(bn(conv(x)) + residual?), ops.conv_bn.fused_conv_bn_act's signature
ConvFn = Callable[[Tensor, nn.Conv2d, nn.Module, Optional[Tensor], bool], Tensor]
# end_fn(x, conv, bn, shortcut_x, shortcut_conv, shortcut_bn): relu(bn(conv(x)) + shortcut_bn(shortcut_conv(
# shortcut_x))), ops.conv_bn.fused_projection_end's signature
EndFn = Callable[[Tensor, nn.Conv2d, nn.Module, Tensor, nn.Conv2d, nn.Module], Tensor]


def _step(conv: nn.Module, bn: nn.Module, relu: bool) -> Optional[ConvBN]:
    return ConvBN(conv, bn, relu) if is_plain_conv(conv) and is_batch_norm(bn) else None


def stem_plan(model: nn.Module) -> Optional[tuple[ConvBN, ...]]:
    """The stem `relu(bn1(conv1(x)))` as steps (a deep stem: conv1 is Sequential(conv, bn, relu, conv,
    bn, relu, conv)), or None where it must run as modules."""
    if global_hooks() or not skippable(model.relu, _RELU):
        return None
    conv1 = model.conv1
    if type(conv1) is nn.Sequential:
        if not skippable(conv1, _SEQUENTIAL) or len(conv1) != 7:
            return None
        c0, b0, r0, c1, b1, r1, c2 = conv1
        if not (skippable(r0, _RELU) and skippable(r1, _RELU)):
            return None
        steps = (_step(c0, b0, True), _step(c1, b1, True), _step(c2, model.bn1, True))
    else:
        steps = (_step(conv1, model.bn1, True),)
    return steps if all(steps) else None


def block_plan(block: nn.Module) -> Optional[BlockPlan]:
    """A BasicBlock's or Bottleneck's forward as steps (block.CONV_BN names its conv, BN pairs), or
    None where it must run as modules."""
    if global_hooks() or not skippable(block.relu, _RELU):
        return None
    modules = block._modules
    convs = tuple(_step(modules.get(c), modules.get(b), True) for c, b in block.CONV_BN)
    if not all(convs):
        return None
    down = block.downsample
    if down is None:
        return BlockPlan(convs, (), None)
    if not (skippable(down, _SEQUENTIAL) and len(down) >= 2):
        return None
    *pools, conv, bn = down
    shortcut = _step(conv, bn, False)
    return BlockPlan(convs, tuple(pools), shortcut) if shortcut else None


def steps(stem: tuple[ConvBN, ...], blocks: list[BlockPlan]) -> list[ConvBN]:
    """Every conv step of a model, in order."""
    return [*stem, *(s for b in blocks for s in (*b.convs, *((b.shortcut,) if b.shortcut else ())))]


def run_stem(stem: tuple[ConvBN, ...], x: Tensor, conv_fn: ConvFn = fused_conv_bn_act) -> Tensor:
    for s in stem:
        x = conv_fn(x, s.conv, s.bn, None, s.relu)
    return x


def run_block(plan: BlockPlan, x: Tensor, conv_fn: ConvFn = fused_conv_bn_act,
              end_fn: Optional[EndFn] = fused_projection_end) -> Tensor:
    """relu(main(x) + shortcut(x)): torchvision's block forward, on the plan's steps. A projection
    shortcut runs with the main branch's last step in end_fn (None: conv_fn for each)."""
    identity = x
    for pool in plan.pools:
        identity = pool_ops.shortcut_pool(pool, identity)
    s = plan.shortcut
    if s is not None and end_fn is None:
        identity = conv_fn(identity, s.conv, s.bn, None, s.relu)
    *inner, last = plan.convs
    for step in inner:
        x = conv_fn(x, step.conv, step.bn, None, step.relu)
    if s is not None and end_fn is not None:
        return end_fn(x, last.conv, last.bn, identity, s.conv, s.bn)
    return conv_fn(x, last.conv, last.bn, identity, last.relu)
