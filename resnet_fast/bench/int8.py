"""The int8 contenders of `resnet-fast bench --device cpu --dtype int8`, all from the same fp32 base model:

  resnet_fast        resnet_fast.quantize (oneDNN u8s8 convs, fused sum+ReLU; resnet_fast/quant)
  torchvision_int8   torchvision.models.quantization (eager-mode quantization, fused, x86 engine)
  pt2e_int8          torchao's PT2E X86InductorQuantizer + torch.compile with freezing
                     (torch.export strict=True: the quantizer fails on strict=False exports)

Each is calibrated on the same random batches (calibration(), >= 8 images at the benchmark's batch size:
PT2E's exported graph has a static batch size).
"""
from __future__ import annotations

import copy
import importlib.util
from typing import Callable

import torch
from torch import Tensor, nn

import resnet_fast

TORCHVISION_INT8 = "torchvision_int8"
PT2E_INT8 = "pt2e_int8"
CALIBRATION_IMAGES = 8


def pt2e_available() -> bool:
    return importlib.util.find_spec("torchao") is not None


def calibration(batch_size: int, img_size: int, seed: int) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed + 2)
    n = max(1, -(-CALIBRATION_IMAGES // batch_size))
    return [torch.randn(batch_size, 3, img_size, img_size, generator=g) for _ in range(n)]


def resnet_fast_int8(base: nn.Module, calib: list[Tensor]) -> Callable[[Tensor], Tensor]:
    fast = resnet_fast.from_torchvision(copy.deepcopy(base)).eval()
    return resnet_fast.quantize(fast, calib)


def torchvision_int8(base: nn.Module, arch: str, calib: list[Tensor]) -> Callable[[Tensor], Tensor]:
    import torchvision
    from torch.ao import quantization as tq
    model = getattr(torchvision.models.quantization, arch)(weights=None, quantize=False,
                                                           num_classes=base.fc.out_features)
    model.load_state_dict(base.state_dict())
    model.eval()
    model.fuse_model()
    torch.backends.quantized.engine = "x86"
    model.qconfig = tq.get_default_qconfig("x86")
    tq.prepare(model, inplace=True)
    with torch.no_grad():
        for x in calib:
            model(x)
    return tq.convert(model, inplace=True)


def pt2e_int8(base: nn.Module, calib: list[Tensor]) -> tuple[Callable[[Tensor], Tensor], Callable]:
    """The PT2E model and the context its calls need (inductor freezing, which its int8 fusions require)."""
    import torch._inductor.config as inductor_config
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    model = copy.deepcopy(base).eval()
    with torch.no_grad():
        exported = torch.export.export(model, (calib[0],), strict=True).module()
        quantizer = xiq.X86InductorQuantizer().set_global(xiq.get_default_x86_inductor_quantization_config())
        prepared = prepare_pt2e(exported, quantizer)
        for x in calib:
            prepared(x)
        converted = convert_pt2e(prepared)
    torch._dynamo.reset()
    return torch.compile(converted), lambda: inductor_config.patch(freezing=True)


def top1_agreement(outputs: Tensor, reference: Tensor) -> float:
    """Fraction of images whose top-1 class matches the reference's."""
    return (outputs.argmax(1) == reference.argmax(1)).double().mean().item()

