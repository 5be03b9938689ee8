"""Model level: eval() with backend "triton" (CPU tensors under the Triton interpreter,
CUDA tensors on a GPU) matches backend "torch" and torchvision."""
import pytest
import torch
import torchvision

import resnet_fast
from resnet_fast.ops import conv_bn, triton_conv
from test_models import max_rel_err, randomize_bn

pytestmark = pytest.mark.skipif(not resnet_fast.backend.triton_usable(torch.device("cpu"))
                                and not torch.cuda.is_available(), reason="triton not usable here")


def _convs(model):
    return sum(isinstance(m, torch.nn.Conv2d) for m in model.modules())


@pytest.mark.parametrize("arch", ["resnet18", "resnet50", "resnet50d"])
def test_triton_backend_matches_torch_and_torchvision(arch):
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = randomize_bn(getattr(resnet_fast, arch)(num_classes=10)).eval().to(device)
    x = torch.randn(1, 3, 20, 20, device=device)
    # TF32 (allowed for convs by default on CUDA) bounds fp32 agreement at ~1e-3.
    tol = 1e-2 if device == "cuda" and torch.backends.cudnn.allow_tf32 else 1e-4
    with torch.inference_mode():
        with resnet_fast.use_backend("torch"):
            ref = model(x)
        triton_conv.LAUNCHES.clear()
        conv_bn.CALLS.clear()
        with resnet_fast.use_backend("triton"):
            got = model(x)
        if arch in resnet_fast.models.TORCHVISION_ARCHS:
            tv = getattr(torchvision.models, arch)(num_classes=10).to(device).eval()
            tv.load_state_dict(model.state_dict())
            assert max_rel_err(got, tv(x)) < tol
    assert conv_bn.CALLS["triton"] == _convs(model)  # every conv went to the Triton op...
    launched = triton_conv.LAUNCHES
    assert sum(n for k, n in launched.items() if k.startswith("conv_bias_act")) == _convs(model) + 1  # + the fc
    assert launched["max_pool_3x3s2"] == 1 and launched["global_avg_pool"] == 1
    if arch.endswith("d"):
        assert launched["avg_pool_2x2_ceil"] == 3  # layers 2-4 shortcuts
    assert max_rel_err(got, ref) < tol
