"""torchvision's ResNet family, with the same names, signatures and state_dict
keys, whose blocks run through resnet_fast's fused ops.

Parameters are laid out exactly as in torchvision.models.resnet: a checkpoint
saved from one loads into the other with strict=True. Only the forward
differs: each conv+BN(+add)(+ReLU) is one fused step (models/fused.py), which
folds BN into the conv in eval() and uses the fused BN(+add)+ReLU training ops
in train(). A stem or block with a module the fused steps do not recognise
(another activation, a conv padding mode, a hook, an instance forward) runs
torchvision's forward, module by module.

The ResNet-D variants (resnet18d..resnet152d, "Bag of Tricks", He et al. 2019)
use timm's layout: a deep stem `conv1 = Sequential(conv, bn, relu, conv, bn,
relu, conv)` followed by `bn1`, and `downsample = Sequential(pool, conv, bn)`.

Tools that record a graph to run later without Python (torch.fx symbolic
tracing, as in feature extraction and FX quantization; torch.jit.script and
torch.jit.trace) get torchvision's forward, module by module: torchvision's
graph, ops and node names, holding the real parameters and BN modules, so it
follows load_state_dict (no folded copy left stale) and needs no resnet_fast
op to load. torch.compile and torch.export trace the fused path, which folds
BN from the parameters on every call (ops/conv_bn.py).
"""
from typing import Any, Callable, Optional, Union

import torch
from torch import Tensor, nn

from .. import fold
from ..ops import pool as pool_ops
from . import cpu_runner, fused
from .blocks import BasicBlock, Bottleneck, FreshCaches, _recorded, conv1x1
from .checks import check_input
from .weights import check_state_dict, load_weights


class ResNet(FreshCaches):
    """torchvision.models.ResNet, plus:

    in_channels: input image channels (3 for RGB).
    deep_stem:   ResNet-C/D stem, three 3x3 conv-BN-ReLU (in->stem_width->stem_width->64, the first stride 2).
    stem_width:  width of the deep stem's first two convs.
    avg_down:    ResNet-D shortcut, 2x2 average pool then a stride-1 1x1 conv.
    """

    def __init__(
        self,
        block: type[Union[BasicBlock, Bottleneck]],
        layers: list[int],
        num_classes: int = 1000,
        zero_init_residual: bool = False,
        groups: int = 1,
        width_per_group: int = 64,
        replace_stride_with_dilation: Optional[list[bool]] = None,
        norm_layer: Optional[Callable[..., nn.Module]] = None,
        in_channels: int = 3,
        deep_stem: bool = False,
        stem_width: int = 32,
        avg_down: bool = False,
    ) -> None:
        super().__init__()
        if norm_layer is None:
            norm_layer = nn.BatchNorm2d
        self._norm_layer = norm_layer
        if not isinstance(in_channels, int) or in_channels < 1:
            raise ValueError(f"in_channels must be a positive int, got {in_channels!r}")

        self.inplanes = 64
        self.dilation = 1
        self.avg_down = avg_down
        if replace_stride_with_dilation is None:
            # each element in the tuple indicates if we should replace
            # the 2x2 stride with a dilated convolution instead
            replace_stride_with_dilation = [False, False, False]
        if len(replace_stride_with_dilation) != 3:
            raise ValueError(
                "replace_stride_with_dilation should be None "
                f"or a 3-element tuple, got {replace_stride_with_dilation}"
            )
        self.groups = groups
        self.base_width = width_per_group
        if deep_stem:
            self.conv1 = nn.Sequential(
                nn.Conv2d(in_channels, stem_width, 3, stride=2, padding=1, bias=False),
                norm_layer(stem_width),
                nn.ReLU(inplace=True),
                nn.Conv2d(stem_width, stem_width, 3, stride=1, padding=1, bias=False),
                norm_layer(stem_width),
                nn.ReLU(inplace=True),
                nn.Conv2d(stem_width, self.inplanes, 3, stride=1, padding=1, bias=False),
            )
        else:
            self.conv1 = nn.Conv2d(in_channels, self.inplanes, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = norm_layer(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2, dilate=replace_stride_with_dilation[0])
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2, dilate=replace_stride_with_dilation[1])
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2, dilate=replace_stride_with_dilation[2])
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

        # Zero-initialize the last BN in each residual branch,
        # so that the residual branch starts with zeros, and each residual block behaves like an identity.
        # This improves the model by 0.2~0.3% according to https://arxiv.org/abs/1706.02677
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, Bottleneck) and m.bn3.weight is not None:
                    nn.init.constant_(m.bn3.weight, 0)  # type: ignore[arg-type]
                elif isinstance(m, BasicBlock) and m.bn2.weight is not None:
                    nn.init.constant_(m.bn2.weight, 0)  # type: ignore[arg-type]

    def _make_layer(
        self,
        block: type[Union[BasicBlock, Bottleneck]],
        planes: int,
        blocks: int,
        stride: int = 1,
        dilate: bool = False,
    ) -> nn.Sequential:
        norm_layer = self._norm_layer
        downsample = None
        previous_dilation = self.dilation
        if dilate:
            self.dilation *= stride
            stride = 1
        if stride != 1 or self.inplanes != planes * block.expansion:
            if self.avg_down:
                pool = (nn.AvgPool2d(2, stride, ceil_mode=True, count_include_pad=False)
                        if stride != 1 else nn.Identity())
                downsample = nn.Sequential(
                    pool,
                    conv1x1(self.inplanes, planes * block.expansion),
                    norm_layer(planes * block.expansion),
                )
            else:
                downsample = nn.Sequential(
                    conv1x1(self.inplanes, planes * block.expansion, stride),
                    norm_layer(planes * block.expansion),
                )

        layers = []
        layers.append(
            block(
                self.inplanes, planes, stride, downsample, self.groups, self.base_width, previous_dilation, norm_layer
            )
        )
        self.inplanes = planes * block.expansion
        for _ in range(1, blocks):
            layers.append(
                block(
                    self.inplanes,
                    planes,
                    groups=self.groups,
                    base_width=self.base_width,
                    dilation=self.dilation,
                    norm_layer=norm_layer,
                )
            )

        return nn.Sequential(*layers)

    def _forward_impl(self, x: Tensor) -> Tensor:
        if torch.jit.is_scripting() or _recorded(x):
            return self._torchvision_forward(x)
        empty = check_input(self, x)
        if empty is not None:
            return empty
        out = cpu_runner.forward(self, x)
        if out is not None:
            return out
        stem = fused.stem_plan(self)
        x = self.relu(self.bn1(self.conv1(x))) if stem is None else fused.run_stem(stem, x)
        x = pool_ops.max_pool(self.maxpool, x)

        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.layer4(x)

        return pool_ops.avgpool_fc(self.avgpool, self.fc, x)

    def _torchvision_forward(self, x: Tensor) -> Tensor:
        # torchvision's ResNet._forward_impl, statement for statement (a deep stem is the Sequential conv1).
        x = self.conv1(x)
        x = self.bn1(x)
        x = self.relu(x)
        x = self.maxpool(x)

        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.layer4(x)

        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        x = self.fc(x)

        return x

    def forward(self, x: Tensor) -> Tensor:
        return self._forward_impl(x)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        if strict:
            check_state_dict(self, state_dict)  # one clear error listing every mismatch
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        fold.invalidate_caches(self)
        return result


def _resnet(
    arch: str,
    block: type[Union[BasicBlock, Bottleneck]],
    layers: list[int],
    weights: Any,
    progress: bool,
    **kwargs: Any,
) -> ResNet:
    model_kwargs = dict(kwargs)
    state_dict = None
    if weights is not None:
        state_dict = load_weights(arch, weights, progress, model_kwargs)
    model = ResNet(block, layers, **model_kwargs)
    if state_dict is not None:
        model.load_state_dict(state_dict)
    return model


def resnet18(*, weights: Any = None, progress: bool = True, **kwargs: Any) -> ResNet:
    """ResNet-18 (torchvision.models.resnet18)."""
    return _resnet("resnet18", BasicBlock, [2, 2, 2, 2], weights, progress, **kwargs)


def resnet34(*, weights: Any = None, progress: bool = True, **kwargs: Any) -> ResNet:
    """ResNet-34 (torchvision.models.resnet34)."""
    return _resnet("resnet34", BasicBlock, [3, 4, 6, 3], weights, progress, **kwargs)


def resnet50(*, weights: Any = None, progress: bool = True, **kwargs: Any) -> ResNet:
    """ResNet-50 v1.5 (torchvision.models.resnet50)."""
    return _resnet("resnet50", Bottleneck, [3, 4, 6, 3], weights, progress, **kwargs)


def resnet101(*, weights: Any = None, progress: bool = True, **kwargs: Any) -> ResNet:
    """ResNet-101 v1.5 (torchvision.models.resnet101)."""
    return _resnet("resnet101", Bottleneck, [3, 4, 23, 3], weights, progress, **kwargs)


def resnet152(*, weights: Any = None, progress: bool = True, **kwargs: Any) -> ResNet:
    """ResNet-152 v1.5 (torchvision.models.resnet152)."""
    return _resnet("resnet152", Bottleneck, [3, 8, 36, 3], weights, progress, **kwargs)


def _fixed(kwargs: dict, name: str, value: Any) -> None:
    # torchvision's _ovewrite_named_param: these builders fix the value.
    if name in kwargs and kwargs[name] != value:
        raise ValueError(f"The parameter '{name}' expected value {value} but got {kwargs[name]} instead.")
    kwargs[name] = value


def resnext50_32x4d(*, weights: Any = None, progress: bool = True, **kwargs: Any) -> ResNet:
    """ResNeXt-50 32x4d (torchvision.models.resnext50_32x4d)."""
    _fixed(kwargs, "groups", 32)
    _fixed(kwargs, "width_per_group", 4)
    return _resnet("resnext50_32x4d", Bottleneck, [3, 4, 6, 3], weights, progress, **kwargs)


def resnext101_32x8d(*, weights: Any = None, progress: bool = True, **kwargs: Any) -> ResNet:
    """ResNeXt-101 32x8d (torchvision.models.resnext101_32x8d)."""
    _fixed(kwargs, "groups", 32)
    _fixed(kwargs, "width_per_group", 8)
    return _resnet("resnext101_32x8d", Bottleneck, [3, 4, 23, 3], weights, progress, **kwargs)


def resnext101_64x4d(*, weights: Any = None, progress: bool = True, **kwargs: Any) -> ResNet:
    """ResNeXt-101 64x4d (torchvision.models.resnext101_64x4d)."""
    _fixed(kwargs, "groups", 64)
    _fixed(kwargs, "width_per_group", 4)
    return _resnet("resnext101_64x4d", Bottleneck, [3, 4, 23, 3], weights, progress, **kwargs)


def wide_resnet50_2(*, weights: Any = None, progress: bool = True, **kwargs: Any) -> ResNet:
    """Wide ResNet-50-2 (torchvision.models.wide_resnet50_2)."""
    _fixed(kwargs, "width_per_group", 64 * 2)
    return _resnet("wide_resnet50_2", Bottleneck, [3, 4, 6, 3], weights, progress, **kwargs)


def wide_resnet101_2(*, weights: Any = None, progress: bool = True, **kwargs: Any) -> ResNet:
    """Wide ResNet-101-2 (torchvision.models.wide_resnet101_2)."""
    _fixed(kwargs, "width_per_group", 64 * 2)
    return _resnet("wide_resnet101_2", Bottleneck, [3, 4, 23, 3], weights, progress, **kwargs)


def _resnet_d(arch: str, block, layers, weights, progress, kwargs) -> ResNet:
    _fixed(kwargs, "deep_stem", True)
    _fixed(kwargs, "avg_down", True)
    return _resnet(arch, block, layers, weights, progress, **kwargs)


def resnet18d(*, weights: Any = None, progress: bool = True, **kwargs: Any) -> ResNet:
    """ResNet-18-D: deep 3x3 stem and average-pool shortcut (Bag of Tricks)."""
    return _resnet_d("resnet18d", BasicBlock, [2, 2, 2, 2], weights, progress, kwargs)


def resnet34d(*, weights: Any = None, progress: bool = True, **kwargs: Any) -> ResNet:
    """ResNet-34-D: deep 3x3 stem and average-pool shortcut (Bag of Tricks)."""
    return _resnet_d("resnet34d", BasicBlock, [3, 4, 6, 3], weights, progress, kwargs)


def resnet50d(*, weights: Any = None, progress: bool = True, **kwargs: Any) -> ResNet:
    """ResNet-50-D: deep 3x3 stem and average-pool shortcut (Bag of Tricks)."""
    return _resnet_d("resnet50d", Bottleneck, [3, 4, 6, 3], weights, progress, kwargs)


def resnet101d(*, weights: Any = None, progress: bool = True, **kwargs: Any) -> ResNet:
    """ResNet-101-D: deep 3x3 stem and average-pool shortcut (Bag of Tricks)."""
    return _resnet_d("resnet101d", Bottleneck, [3, 4, 23, 3], weights, progress, kwargs)


def resnet152d(*, weights: Any = None, progress: bool = True, **kwargs: Any) -> ResNet:
    """ResNet-152-D: deep 3x3 stem and average-pool shortcut (Bag of Tricks)."""
    return _resnet_d("resnet152d", Bottleneck, [3, 8, 36, 3], weights, progress, kwargs)


TORCHVISION_ARCHS = (
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
    "resnext50_32x4d", "resnext101_32x8d", "resnext101_64x4d",
    "wide_resnet50_2", "wide_resnet101_2",
)
RESNET_D_ARCHS = ("resnet18d", "resnet34d", "resnet50d", "resnet101d", "resnet152d")
ARCHS = TORCHVISION_ARCHS + RESNET_D_ARCHS
