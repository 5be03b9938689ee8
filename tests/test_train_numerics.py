"""One CPU training step of resnet_fast against fp64, held to the 2x rule of eager's error in the same
dtype (fp32, and bf16 under autocast), on each CPU kernel variant this machine runs.

From identical weights, each model takes one SGD step (forward, cross-entropy, backward, step with
momentum), then a second forward. Checked against torchvision in fp64 (NCHW, no autocast): the step-1
logits and loss (the forward), every parameter after the step (the gradients, in the L2 norm: a
pre-ReLU value within rounding of zero flips a mask bit in any low-precision run), and the step-2
logits and loss. The bar is eager torchvision channels_last's own error in the same dtype
(resnet_fast.numerics.within_2x). Each ISA variant runs in a fresh process (the choice is made once
per process: RESNET_FAST_CPU_ISA), which also reports how many kernel calls each variant took.
"""
import os
import subprocess
import sys

import pytest
import torch

from _backends import CPU_ISAS
from resnet_fast.numerics import within_2x

torchvision = pytest.importorskip("torchvision")

BATCH, SIZE, CLASSES, LR = 4, 32, 10, 0.05
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _one_step(model, x, y, dtype, memory_format):
    """[logits 1, loss 1, parameters after the step, logits 2, loss 2], all as fp64 tensors."""
    import torch.nn.functional as F
    model = model.to(memory_format=memory_format)
    x = x.contiguous(memory_format=memory_format)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    amp = dtype == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        logits = model(x)
        loss = F.cross_entropy(logits, y)
    loss.backward()
    opt.step()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        logits2 = model(x)
        loss2 = F.cross_entropy(logits2, y)
    params = torch.cat([p.detach().double().flatten() for p in model.parameters()])
    return [t.detach().double() for t in (logits, loss, params, logits2, loss2)]


def _case(dtype_name: str) -> dict:
    """Runs in a subprocess: the three models' step results and the kernel calls per ISA."""
    import copy
    import resnet_fast
    from resnet_fast.ops import dispatch
    torch.set_num_threads(1)
    dtype = DTYPES[dtype_name]
    torch.manual_seed(0)
    base = torchvision.models.resnet18(num_classes=CLASSES).train()
    with torch.no_grad():  # non-trivial BN affine, as a trained network has
        for m in base.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    x = torch.randn(BATCH, 3, SIZE, SIZE)
    y = torch.randint(0, CLASSES, (BATCH,))
    ref = _one_step(copy.deepcopy(base).double(), x.double(), y, torch.float64, torch.contiguous_format)
    eager = _one_step(copy.deepcopy(base), x, y, dtype, torch.channels_last)
    isa_before = torch.ops.resnet_fast._cpu_isa_calls() if _ext_loaded() else [0, 0]
    before, bn2_before = dispatch.CALLS[("bn_act", "ext")], dispatch.CALLS[("bn2_relu", "ext")]
    ours = _one_step(resnet_fast.from_torchvision(copy.deepcopy(base)), x, y, dtype, torch.contiguous_format)
    isa_calls = [a - b for a, b in zip(torch.ops.resnet_fast._cpu_isa_calls(), isa_before)]
    return {"ref": ref, "eager": eager, "ours": ours, "ext_calls": dispatch.CALLS[("bn_act", "ext")] - before,
            "bn2_calls": dispatch.CALLS[("bn2_relu", "ext")] - bn2_before,
            "isa": torch.ops.resnet_fast._cpu_isa(), "isa_calls": isa_calls}


def _ext_loaded() -> bool:
    from resnet_fast.ops import ext
    return ext.available("cpu")


@pytest.mark.parametrize("isa", CPU_ISAS)
@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_one_sgd_step_within_2x_of_eager(dtype_name, isa, tmp_path):
    if not _ext_loaded():
        pytest.skip("resnet_fast._C is not built")
    env = {**os.environ, "RESNET_FAST_CPU_ISA": isa, "RESNET_FAST_BACKEND": "auto"}
    # Tensors come back through torch.save: as JSON lists, resnet18's parameters took 2.6 GB to parse.
    result = tmp_path / "case.pt"
    code = f"import sys, torch; sys.path.insert(0, {os.path.dirname(__file__)!r}); " \
           f"import test_train_numerics as t; torch.save(t._case({dtype_name!r}), {str(result)!r})"
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    got = torch.load(result, weights_only=True)
    # Proof that the fused kernels ran (the projection blocks' one-op end too), on the forced variant only.
    assert got["ext_calls"] > 0 and got["bn2_calls"] > 0 and got["isa"] == isa
    index = 1 if isa == "avx512" else 0
    assert got["isa_calls"][index] > 0 and got["isa_calls"][1 - index] == 0, got["isa_calls"]
    dtype = DTYPES[dtype_name]
    for i, what in enumerate(["step-1 logits", "step-1 loss", "parameters after the step", "step-2 logits",
                              "step-2 loss"]):
        ours, eager, ref = (got[k][i] for k in ("ours", "eager", "ref"))
        verdict = within_2x(ours, eager, ref, dtype, norm="l2" if what.startswith("param") else "max")
        assert verdict.ok, f"{dtype_name} {isa} {what}: {verdict.why}"


def test_forcing_an_unknown_isa_is_a_clear_error():
    if not _ext_loaded():
        pytest.skip("resnet_fast._C is not built")
    code = ("import torch, resnet_fast.ops.ext; "
            "torch.ops.resnet_fast.add_relu(torch.ones(8), torch.ones(8))")
    run = subprocess.run([sys.executable, "-c", code], env={**os.environ, "RESNET_FAST_CPU_ISA": "sse9"},
                         capture_output=True, text=True, timeout=300)
    assert run.returncode != 0 and "RESNET_FAST_CPU_ISA must be auto, avx2 or avx512, got 'sse9'" in run.stderr
