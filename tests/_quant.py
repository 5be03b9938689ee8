"""Shared helpers of the int8 tests: small ResNets with non-trivial BatchNorm and their calibration."""
import torch
from torch import nn

import resnet_fast


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BN non-trivial statistics and affine parameters (a fresh model's BN folds to identity)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_((torch.rand(n, generator=g) - 0.5) * 0.4)
                m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_((torch.rand(n, generator=g) - 0.5) * 0.4)
    return model.eval()


def small_model(arch: str = "resnet18", seed: int = 0, **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    return randomize_bn(getattr(resnet_fast, arch)(num_classes=10, **kwargs), seed)


def batches(n: int = 2, size: int = 32, batch: int = 2, seed: int = 1) -> list:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 3, size, size, generator=g) for _ in range(n)]
