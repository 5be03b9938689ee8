"""The layout int8 quantization understands, read from a resnet_fast ResNet through its public modules.

`read(model)` returns a Net: every conv with its BN folded in (fold.fold_conv_bn), in execution order,
grouped into the stem and the residual blocks, plus the max-pool, the shortcut pools and the fc. Anything
else (a replaced activation, a custom block or downsample, a conv with a bias-less BN replaced by something
else) is refused with an error naming the module: quantizing it as if it were the standard layout would
silently compute another function.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor, nn

from .. import fold


class ConvSpec(NamedTuple):
    name: str  # the conv's qualified name in the fp32 model (also its output's quantization point)
    weight: Tensor  # BN folded, fp32 (fp64 in the fake-quant reference)
    bias: Tensor
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int
    relu: bool


class PoolSpec(NamedTuple):
    kind: str  # "max" or "avg"
    kernel: int
    stride: int
    padding: int
    ceil_mode: bool
    count_include_pad: bool  # avg only


class BlockSpec(NamedTuple):
    name: str
    convs: tuple[ConvSpec, ...]  # the last adds the shortcut before its ReLU
    shortcut_pool: Optional[PoolSpec]  # ResNet-D's average pool
    shortcut: Optional[ConvSpec]  # None: the identity


class Net(NamedTuple):
    in_channels: int
    stem: tuple[ConvSpec, ...]
    maxpool: PoolSpec
    blocks: tuple[BlockSpec, ...]
    fc_weight: Tensor
    fc_bias: Tensor


class UnsupportedModel(ValueError):
    """The model does not have the layout quantize() understands."""


def _refuse(name: str, module: nn.Module, expected: str) -> UnsupportedModel:
    return UnsupportedModel(f"quantize: {name} is {type(module).__name__}, expected {expected}; "
                            "int8 quantization supports resnet_fast's standard ResNet layout only")


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def _conv(name: str, conv: nn.Module, bn_name: str, bn: nn.Module, relu: bool) -> ConvSpec:
    if type(conv) is not nn.Conv2d or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        raise _refuse(name, conv, "nn.Conv2d with numeric zero padding")
    if type(bn) is not nn.BatchNorm2d or bn.running_mean is None:
        raise _refuse(bn_name, bn, "nn.BatchNorm2d with running statistics")
    with torch.no_grad():
        w, b = fold.fold_conv_bn(conv, bn)
    return ConvSpec(name, w.float(), b.float(), _pair(conv.stride), _pair(conv.padding), _pair(conv.dilation),
                    conv.groups, relu)


def _relu(name: str, module: nn.Module) -> None:
    if type(module) is not nn.ReLU:
        raise _refuse(name, module, "nn.ReLU")


def _pool(name: str, module: nn.Module, kind: type) -> PoolSpec:
    if type(module) is not kind:
        raise _refuse(name, module, kind.__name__)
    k, s, p = (_pair(getattr(module, a)) for a in ("kernel_size", "stride", "padding"))
    if len({*k}) != 1 or len({*s}) != 1 or len({*p}) != 1 or _pair(getattr(module, "dilation", 1)) != (1, 1):
        raise _refuse(name, module, f"a square, undilated {kind.__name__}")
    return PoolSpec("max" if kind is nn.MaxPool2d else "avg", k[0], s[0], p[0], module.ceil_mode,
                    getattr(module, "count_include_pad", False))


def _stem(model: nn.Module) -> tuple[ConvSpec, ...]:
    _relu("relu", model.relu)
    if isinstance(model.conv1, nn.Conv2d):
        return (_conv("conv1", model.conv1, "bn1", model.bn1, True),)
    if type(model.conv1) is not nn.Sequential or len(model.conv1) != 7:
        raise _refuse("conv1", model.conv1, "nn.Conv2d or the ResNet-D deep stem Sequential")
    s = model.conv1
    _relu("conv1.2", s[2])
    _relu("conv1.5", s[5])
    return (_conv("conv1.0", s[0], "conv1.1", s[1], True), _conv("conv1.3", s[3], "conv1.4", s[4], True),
            _conv("conv1.6", s[6], "bn1", model.bn1, True))


def _block(name: str, block: nn.Module) -> BlockSpec:
    from ..models.resnet import BasicBlock, Bottleneck
    if type(block) not in (BasicBlock, Bottleneck):
        raise _refuse(name, block, "BasicBlock or Bottleneck")
    _relu(f"{name}.relu", block.relu)
    n = 3 if type(block) is Bottleneck else 2
    convs = tuple(_conv(f"{name}.conv{i}", getattr(block, f"conv{i}"), f"{name}.bn{i}", getattr(block, f"bn{i}"),
                        True) for i in range(1, n + 1))
    pool = shortcut = None
    down = block.downsample
    if down is not None:
        if type(down) is not nn.Sequential or len(down) not in (2, 3):
            raise _refuse(f"{name}.downsample", down, "Sequential([pool,] conv, bn)")
        if len(down) == 3 and type(down[0]) is not nn.Identity:
            pool = _pool(f"{name}.downsample.0", down[0], nn.AvgPool2d)
        i = len(down) - 2
        shortcut = _conv(f"{name}.downsample.{i}", down[i], f"{name}.downsample.{i + 1}", down[i + 1], False)
    return BlockSpec(name, convs, pool, shortcut)


def read(model: nn.Module) -> Net:
    """The Net of a resnet_fast ResNet in eval mode, or UnsupportedModel naming the first module that differs."""
    from ..models.resnet import ResNet
    if type(model) is not ResNet:
        raise _refuse("the model", model, "resnet_fast.ResNet (built by resnet_fast.resnet18() etc.)")
    if model.training:
        raise ValueError("quantize: the model is in training mode; call model.eval() first "
                         "(BatchNorm is folded with its running statistics)")
    stem = _stem(model)
    maxpool = _pool("maxpool", model.maxpool, nn.MaxPool2d)
    if type(model.avgpool) is not nn.AdaptiveAvgPool2d or _pair(model.avgpool.output_size) != (1, 1):
        raise _refuse("avgpool", model.avgpool, "nn.AdaptiveAvgPool2d((1, 1))")
    if type(model.fc) is not nn.Linear:
        raise _refuse("fc", model.fc, "nn.Linear")
    blocks = []
    for layer in ("layer1", "layer2", "layer3", "layer4"):
        seq = getattr(model, layer)
        if type(seq) is not nn.Sequential:
            raise _refuse(layer, seq, "nn.Sequential of blocks")
        blocks += [_block(f"{layer}.{i}", b) for i, b in enumerate(seq)]
    fc_bias = model.fc.bias if model.fc.bias is not None else torch.zeros(model.fc.out_features)
    return Net(stem[0].weight.shape[1], stem, maxpool, tuple(blocks), model.fc.weight.detach().float(),
               fc_bias.detach().float())

