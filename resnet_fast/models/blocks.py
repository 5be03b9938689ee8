"""torchvision's BasicBlock and Bottleneck, whose forward runs the fused steps of models/fused.py.

A block runs fused only when models/fused.block_plan recognises every module it would not call;
otherwise, and under TorchScript, torch.fx and torch.jit.trace, it runs torchvision's forward,
op for op.
"""
# No `from __future__ import annotations` here: TorchScript reads the annotations of _recorded as objects.
from typing import Callable, Optional

import torch
from torch import Tensor, fx, nn

from .. import fold
from . import fused


class FreshCaches(nn.Module):
    """Drops the module's cached folds and prepacked weights (fold.invalidate_caches) on every train(),
    eval() and `.to()` / `.half()` / `.cuda()` (all go through _apply), the moments users expect a
    fresh model: a write through `.data` since is seen then. A parent module's train() and to() call
    these on its children, so a resnet_fast model inside another model is covered too."""

    def train(self, mode: bool = True):
        result = super().train(mode)
        fold.invalidate_caches(self)
        return result

    def _apply(self, *args, **kwargs):
        result = super()._apply(*args, **kwargs)
        fold.invalidate_caches(self)
        return result


def conv3x3(in_planes: int, out_planes: int, stride: int = 1, groups: int = 1, dilation: int = 1) -> nn.Conv2d:
    """3x3 convolution with padding"""
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=dilation,
                     groups=groups, bias=False, dilation=dilation)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """1x1 convolution"""
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


@torch.jit.ignore  # TorchScript takes torchvision's forward through torch.jit.is_scripting()
def _recorded(x: Tensor) -> bool:
    """Whether torch.fx symbolic tracing or torch.jit.trace is recording this forward."""
    return isinstance(x, fx.Proxy) or torch.jit.is_tracing()


class _Block(FreshCaches):
    CONV_BN: tuple = ()  # the main branch's (conv, BN) attribute names, in order

    def forward(self, x: Tensor) -> Tensor:
        if torch.jit.is_scripting() or _recorded(x):
            return self._torchvision_forward(x)
        plan = fused.block_plan(self)
        if plan is None:  # a module the fused steps do not recognise: the user's modules run
            return self._torchvision_forward(x)
        return fused.run_block(plan, x)

    def _add_identity_relu(self, out: Tensor, x: Tensor) -> Tensor:
        # The tail of torchvision's block forwards (for torch.fx and TorchScript).
        identity = x
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class BasicBlock(_Block):
    expansion: int = 1
    CONV_BN = (("conv1", "bn1"), ("conv2", "bn2"))

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: Optional[nn.Module] = None,
        groups: int = 1,
        base_width: int = 64,
        dilation: int = 1,
        norm_layer: Optional[Callable[..., nn.Module]] = None,
    ) -> None:
        super().__init__()
        if norm_layer is None:
            norm_layer = nn.BatchNorm2d
        if groups != 1 or base_width != 64:
            raise ValueError("BasicBlock only supports groups=1 and base_width=64")
        if dilation > 1:
            raise NotImplementedError("Dilation > 1 not supported in BasicBlock")
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = norm_layer(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = norm_layer(planes)
        self.downsample = downsample
        self.stride = stride

    def _torchvision_forward(self, x: Tensor) -> Tensor:
        # torchvision's BasicBlock.forward, op for op: the same graph and node names.
        out = self.relu(self.bn1(self.conv1(x)))
        return self._add_identity_relu(self.bn2(self.conv2(out)), x)


class Bottleneck(_Block):
    # The stride for downsampling is at the 3x3 convolution (ResNet V1.5), as in torchvision.
    expansion: int = 4
    CONV_BN = (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3"))

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: Optional[nn.Module] = None,
        groups: int = 1,
        base_width: int = 64,
        dilation: int = 1,
        norm_layer: Optional[Callable[..., nn.Module]] = None,
    ) -> None:
        super().__init__()
        if norm_layer is None:
            norm_layer = nn.BatchNorm2d
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = conv1x1(inplanes, width)
        self.bn1 = norm_layer(width)
        self.conv2 = conv3x3(width, width, stride, groups, dilation)
        self.bn2 = norm_layer(width)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.bn3 = norm_layer(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def _torchvision_forward(self, x: Tensor) -> Tensor:
        # torchvision's Bottleneck.forward, op for op: the same graph and node names.
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self._add_identity_relu(self.bn3(self.conv3(out)), x)
