"""from_torchvision: a resnet_fast model equal to a torchvision ResNet."""
from __future__ import annotations

import copy

from torch import nn

from .resnet import BasicBlock, Bottleneck, ResNet


def _block_type(layer: nn.Sequential) -> type:
    first = layer[0]
    if hasattr(first, "conv3"):
        return Bottleneck
    if hasattr(first, "conv2"):
        return BasicBlock
    raise TypeError(f"unrecognised ResNet block {type(first).__name__}")


def _dilations(model: nn.Module) -> list[bool]:
    # torchvision multiplies the dilation by 2 for each stage whose stride it replaces.
    d = [layer[-1].conv2.dilation[0] for layer in (model.layer1, model.layer2, model.layer3, model.layer4)]
    return [d[i + 1] > d[i] for i in range(3)]


def from_torchvision(model: nn.Module) -> ResNet:
    """A resnet_fast ResNet computing the same function as a torchvision ResNet.

    Works for every torchvision ResNet/ResNeXt/Wide-ResNet, fine-tuned ones with
    another num_classes or a replaced conv1 (other in_channels) or fc included.
    The weights are COPIED: the new model shares no storage with `model`, so
    training one does not change the other. Device, dtype and train()/eval()
    mode are carried over.
    """
    for name in ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4", "fc"):
        if not hasattr(model, name):
            raise TypeError(f"from_torchvision expects a torchvision ResNet; {type(model).__name__} has no {name!r}")
    block = _block_type(model.layer1)
    conv1 = model.conv1
    deep_stem = isinstance(conv1, nn.Sequential)
    first_conv = conv1[0] if deep_stem else conv1
    downsample = model.layer2[0].downsample
    kwargs = dict(
        layers=[len(layer) for layer in (model.layer1, model.layer2, model.layer3, model.layer4)],
        num_classes=model.fc.out_features if isinstance(model.fc, nn.Linear) else 1000,
        groups=getattr(model, "groups", 1),
        width_per_group=getattr(model, "base_width", 64),
        replace_stride_with_dilation=_dilations(model) if block is Bottleneck else None,
        norm_layer=type(model.bn1),
        in_channels=first_conv.in_channels,
        deep_stem=deep_stem,
        stem_width=first_conv.out_channels if deep_stem else 32,
        avg_down=downsample is not None and len(downsample) == 3,
    )
    fast = ResNet(block, **kwargs)
    if not isinstance(model.fc, nn.Linear):
        fast.fc = copy.deepcopy(model.fc)
    param = next(model.parameters())
    fast.to(device=param.device, dtype=param.dtype)
    fast.load_state_dict(model.state_dict())
    return fast.train(model.training)
