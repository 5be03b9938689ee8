"""timm's ResNets load into resnet_fast's same-named builders with strict=True and compute the same
function (skipped where timm is not installed). Weights are timm's random init with randomized
BatchNorm: no hub download, the same state_dict layout as its pretrained checkpoints."""
import pytest
import torch

import resnet_fast
from _models import randomize_bn
from _numerics import max_rel_err

timm = pytest.importorskip("timm")

ARCHS = ["resnet18", "resnet34", "resnet50", "resnet101", "resnet18d", "resnet34d", "resnet50d", "resnet101d",
         "resnext50_32x4d", "wide_resnet50_2"]


@pytest.mark.parametrize("arch", ARCHS)
def test_timm_checkpoint_loads_strict_and_matches(arch):
    torch.manual_seed(0)
    theirs = randomize_bn(timm.create_model(arch, pretrained=False, num_classes=10)).eval()
    ours = getattr(resnet_fast, arch)(num_classes=10)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    ours.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        assert max_rel_err(ours(x), theirs(x)) < 1e-5
