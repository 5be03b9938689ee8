"""Models with non-trivial weights for the model-level tests, and their resnet_fast twins."""
import torch
import torchvision
from torch import nn

import resnet_fast


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN statistics and affine parameters (not the init defaults)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.2)
    return model


def pair(arch: str, **kwargs):
    """(torchvision model, resnet_fast twin), both eval, same randomized weights."""
    torch.manual_seed(0)
    tv = randomize_bn(getattr(torchvision.models, arch)(**kwargs)).eval()
    fast = resnet_fast.from_torchvision(tv).eval()
    return tv, fast


def eval_out(model, x):
    with torch.inference_mode():
        return model(x)
