from .convert import from_torchvision
from .resnet import (ARCHS, RESNET_D_ARCHS, TORCHVISION_ARCHS, BasicBlock, Bottleneck, ResNet, resnet18,
                     resnet18d, resnet34, resnet34d, resnet50, resnet50d, resnet101, resnet101d, resnet152,
                     resnet152d, resnext50_32x4d, resnext101_32x8d, resnext101_64x4d, wide_resnet50_2,
                     wide_resnet101_2)

__all__ = ["ARCHS", "RESNET_D_ARCHS", "TORCHVISION_ARCHS", "BasicBlock", "Bottleneck", "ResNet", "from_torchvision",
           *ARCHS]
