"""Shared helpers of the int8 tests: small ResNets with non-trivial BatchNorm and their calibration."""
import torch
from torch import nn

import resnet_fast
from _models import randomize_bn


def small_model(arch: str = "resnet18", seed: int = 0, **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    return randomize_bn(getattr(resnet_fast, arch)(num_classes=10, **kwargs), seed).eval()


def batches(n: int = 2, size: int = 32, batch: int = 2, seed: int = 1) -> list:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 3, size, size, generator=g) for _ in range(n)]
