"""Whole models on a CUDA GPU (every test is gpu-marked: skipped without CUDA).

- eval() at 224x224 with backends "auto" and "triton" vs eager PyTorch under the
  2x rule, with proof that the Triton kernels (or cuDNN + the extension's epilogue,
  for grouped convs) ran;
- torch.compile(fullgraph=True) of an eval model under inference_mode;
- CUDA-graph capture and replay of the eval forward;
- one training step under bf16 autocast (fused BN ops) vs torchvision;

The 2x rule: |ours - ref| <= 2 * |eager - ref| + FLOOR * |ref|, where eager is
PyTorch in the same precision (torchvision, or resnet_fast's "torch" backend for
the ResNet-D variants, which torchvision lacks) and ref is the same model in fp32
with TF32 off (fp64 for the fp32 cases, whose eager error is TF32's). |.| is the
max norm for logits; for a training step's tensors it is the L2 norm per tensor,
as bf16 gradients are noisy enough that per-tensor maxima flip the comparison.

Eval cases come in tiers, RESNET_FAST_GPU_TIER=quick|wide|full (default quick).
On a cold machine the Triton conv's compile + tuning dominates (the tests use a
fresh tuning cache, so every candidate of every shape is validated and timed):
roughly 1-2 minutes per new (model family, batch, dtype), estimated from the
kernel variants and configs, not measured. quick (the headline shapes: ResNet-18 batch 1 and
ResNet-50 batch 256 in bf16, which the other tests reuse) aims at ~3 minutes for
this file; wide adds every other model in bf16 and fp16/fp32 on small ones; full
runs every model x dtype x batch 1 and 32.
"""
from __future__ import annotations

import contextlib
import copy
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import resnet_fast
from _numerics import assert_2x, fp32_precision
from resnet_fast.models import ARCHS, RESNET_D_ARCHS, TORCHVISION_ARCHS
from resnet_fast.ops import dispatch, ext

pytestmark = pytest.mark.gpu

BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
DTYPE_NAMES = {BF16: "bf16", FP16: "fp16", FP32: "fp32"}
SIZE = 224

TIERS = ("quick", "wide", "full")
QUICK = [("resnet18", BF16, 1), ("resnet50", BF16, 256)]
WIDE = ([(a, BF16, 1) for a in ARCHS if a != "resnet18"]
        + [("resnet18", BF16, 32), ("resnet50", FP16, 256), ("resnet18", FP16, 1), ("resnet18", FP32, 1),
           ("resnet50", FP32, 1)])
FULL = [(a, d, b) for a in ARCHS for d in (BF16, FP16, FP32) for b in (1, 32)] + [("resnet50", d, 256)
                                                                                    for d in (FP16, FP32)]


def _tier() -> str:
    tier = os.environ.get("RESNET_FAST_GPU_TIER", "quick")
    if tier not in TIERS:
        raise ValueError(f"RESNET_FAST_GPU_TIER must be one of {', '.join(TIERS)}, got {tier!r}")
    return tier


def _eval_cases():
    tiers = {"quick": QUICK, "wide": WIDE, "full": FULL}
    wanted = TIERS[:TIERS.index(_tier()) + 1]
    seen, params = set(), []
    for tier in wanted:
        for arch, dtype, batch in tiers[tier]:
            if (arch, dtype, batch) not in seen:
                seen.add((arch, dtype, batch))
                params.append(pytest.param(arch, dtype, batch, id=f"{tier}-{arch}-{DTYPE_NAMES[dtype]}-b{batch}"))
    return params


# --- helpers ------------------------------------------------------------------

def make_model(arch: str, size: int, device, seed: int = 0) -> nn.Module:
    """fp32 model on `device`: torchvision's (resnet_fast's for ResNet-D), random BN affine with a
    small scale on each residual branch's last BN (as trained ResNets have; without it a random
    deep ResNet is chaotic and bf16 alone moves its logits ~10%), running statistics measured
    on random images at the test resolution. Returned in train mode."""
    torch.manual_seed(seed)
    if arch in TORCHVISION_ARCHS:
        import torchvision
        model = getattr(torchvision.models, arch)()
    else:
        model = getattr(resnet_fast, arch)()
    last = {id(b.bn3 if hasattr(b, "conv3") else b.bn2) for b in model.modules() if hasattr(b, "downsample")}
    g = torch.Generator().manual_seed(seed)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        for bn in bns:
            low, high = (0.0, 0.2) if id(bn) in last else (0.5, 1.5)
            bn.weight.copy_(torch.rand(bn.num_features, generator=g) * (high - low) + low)
            bn.bias.copy_(torch.randn(bn.num_features, generator=g) * 0.1)
            bn.momentum = 1.0  # running stats := the statistics of the one batch below
        model.to(device).train()
        with eager_context(arch):
            model(images(4, size, device, seed=seed + 100))
    for bn in bns:
        bn.momentum = 0.1
    return model


def images(batch: int, size: int, device, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, size, size, generator=g).to(device)


def eager_context(arch: str):
    """Eager PyTorch for `arch`: torchvision itself, or resnet_fast's plain-torch backend (ResNet-D)."""
    return contextlib.nullcontext() if arch in TORCHVISION_ARCHS else resnet_fast.use_backend("torch")


def fast_copy(base: nn.Module, arch: str) -> nn.Module:
    return resnet_fast.from_torchvision(base) if arch in TORCHVISION_ARCHS else copy.deepcopy(base)


def conv_counts(model: nn.Module) -> tuple[int, int]:
    """(groups == 1 convs, grouped convs)."""
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    return sum(c.groups == 1 for c in convs), sum(c.groups != 1 for c in convs)


def launches():
    from resnet_fast.ops.triton._common import LAUNCHES
    return LAUNCHES


def torch_path():
    from resnet_fast.ops.triton._common import TORCH_PATH
    return TORCH_PATH


def reset_counters() -> None:
    dispatch.CALLS.clear()
    launches().clear()
    torch_path().clear()


def assert_fused_eval_ran(model: nn.Module, arch: str, device) -> None:
    """Every conv went through a fused op; each groups=1 conv and pool through a Triton kernel launch or,
    where the tuner found it faster (or no Triton candidate correct), the torch path."""
    plain, grouped = conv_counts(model)
    calls = {key: n for key, n in dispatch.CALLS.items() if key[0].endswith("conv_bias_act")}
    launched, on_torch = launches(), torch_path()
    expected = {("conv_bias_act", "triton"): plain}
    if grouped:  # cuDNN conv + the extension's epilogue, else plain torch
        impl = "ext" if ext.available(torch.device(device)) else "torch"
        expected[("grouped_conv_bias_act", impl)] = grouped
    assert calls == expected, f"{arch}: conv paths {calls}, expected {expected}"
    convs_run = sum(n for k, n in launched.items() if k.startswith("conv_bias_act.")) + on_torch["conv_bias_act"]
    assert convs_run == plain + 1, f"{arch}: {convs_run} conv runs for {plain} convs + fc"
    pools = {k: launched[k] + on_torch[k] for k in ("max_pool_3x3s2", "global_avg_pool", "avg_pool_2x2_ceil")}
    assert pools == {"max_pool_3x3s2": 1, "global_avg_pool": 1,
                     "avg_pool_2x2_ceil": 3 if arch in RESNET_D_ARCHS else 0}, pools


# --- eval parity ----------------------------------------------------------------

def check_eval(arch: str, dtype: torch.dtype, batch: int, backends=("auto", "triton"), device="cuda",
               size: int = SIZE) -> None:
    base = make_model(arch, size, device).eval()
    x = images(batch, size, device)
    ref_dtype = torch.float64 if dtype == FP32 else torch.float32
    with torch.inference_mode(), fp32_precision("ieee", "ieee"), eager_context(arch):
        ref = copy.deepcopy(base).to(device, ref_dtype)(x.to(ref_dtype)).double()
    with torch.inference_mode(), eager_context(arch):
        eager = copy.deepcopy(base).to(device, dtype)(x.to(dtype))
    # Built outside inference_mode, as users do (inference tensors would bypass the fold cache).
    fast = fast_copy(base, arch).to(device, dtype, memory_format=torch.channels_last)
    x = x.to(dtype).contiguous(memory_format=torch.channels_last)
    for backend in backends:
        reset_counters()
        with torch.inference_mode(), resnet_fast.use_backend(backend):
            out = fast(x)
        assert out.dtype == dtype
        assert_fused_eval_ran(fast, arch, device)
        assert_2x(out, eager, ref, dtype, f"{arch} {DTYPE_NAMES[dtype]} batch {batch} backend {backend}")


@pytest.mark.parametrize("arch,dtype,batch", _eval_cases())
def test_eval_matches_eager_2x_rule(arch, dtype, batch):
    check_eval(arch, dtype, batch)


# --- torch.compile and CUDA graphs ------------------------------------------------

def test_compile_fullgraph_eval_matches_eager():
    arch, dtype = "resnet18", BF16
    base = make_model(arch, SIZE, "cuda").eval()
    x = images(1, SIZE, "cuda").to(dtype).contiguous(memory_format=torch.channels_last)
    fast = resnet_fast.from_torchvision(base).to("cuda", dtype, memory_format=torch.channels_last)
    with torch.inference_mode():
        with fp32_precision("ieee", "ieee"):
            ref = copy.deepcopy(base)(x.float()).double()
        eager = copy.deepcopy(base).to("cuda", dtype)(x.contiguous())
        ours = fast(x)
        torch._dynamo.reset()
        compiled = torch.compile(fast, fullgraph=True)  # raises on any graph break
        compiled(x)  # compiles
        reset_counters()
        got = compiled(x)
    convs = sum(n for k, n in launches().items() if k.startswith("conv_bias_act.")) + torch_path()["conv_bias_act"]
    assert convs == conv_counts(fast)[0] + 1, "the compiled graph did not run the Triton conv op"
    assert_2x(ours, eager, ref, dtype, "eager resnet_fast")
    assert_2x(got, eager, ref, dtype, "compiled resnet_fast")


def test_cuda_graph_replay_matches_eager():
    from resnet_fast import fold
    arch, dtype, batch = "resnet18", BF16, 1  # shapes the quick eval tier has compiled
    fast = resnet_fast.from_torchvision(make_model(arch, SIZE, "cuda").eval())
    fast = fast.to("cuda", dtype, memory_format=torch.channels_last)
    inputs = [images(batch, SIZE, "cuda", seed).to(dtype).contiguous(memory_format=torch.channels_last)
              for seed in (1, 2, 3)]
    static_x = inputs[0].clone()
    with torch.inference_mode():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # tunes, compiles and fills the fold cache outside the capture
            for _ in range(3):
                fast(static_x)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        misses = fold.STATS["misses"]
        with torch.cuda.graph(graph):
            static_out = fast(static_x)
        assert fold.STATS["misses"] == misses, "BN folds were rebuilt inside the capture"
        outputs = []
        for x in inputs[1:]:
            static_x.copy_(x)
            graph.replay()
            torch.cuda.synchronize()
            outputs.append(static_out.clone())
            # Same kernels, same tuned configs, no atomics: replay is bitwise eager.
            assert torch.equal(static_out, fast(x)), "CUDA-graph replay differs from eager"
    assert not torch.equal(outputs[0], outputs[1]), "replay ignored the new input"


# --- training step ------------------------------------------------------------------

def _cuda_kernel_names(fn) -> set[str]:
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return {e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA}


def _train_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, amp: bool) -> dict[str, torch.Tensor]:
    """Loss, every parameter gradient, the running statistics, and the loss after one SGD step."""
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    with torch.autocast("cuda", dtype=BF16, enabled=amp):
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    result = {"loss": loss.detach().float()}
    result.update({f"grad {n}": p.grad.detach().float() for n, p in model.named_parameters()})
    opt.step()
    result.update({f"buffer {n}": b.detach().float() for n, b in model.named_buffers() if b.is_floating_point()})
    with torch.no_grad(), torch.autocast("cuda", dtype=BF16, enabled=amp):
        result["loss after step"] = F.cross_entropy(model(x), y).float()
    return result


@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_train_step_bf16_autocast_matches_torchvision(backend):
    arch, batch = "resnet50", 16
    base = make_model(arch, SIZE, "cuda")
    x = images(batch, SIZE, "cuda")
    y = torch.randint(0, 1000, (batch,), generator=torch.Generator().manual_seed(2)).cuda()
    with fp32_precision("ieee", "ieee"):
        ref = _train_step(copy.deepcopy(base), x, y, amp=False)
    eager = _train_step(copy.deepcopy(base), x, y, amp=True)
    fast = resnet_fast.from_torchvision(base).to(memory_format=torch.channels_last)
    ours: dict = {}

    def step():
        ours.update(_train_step(fast, x.contiguous(memory_format=torch.channels_last), y, amp=True))

    reset_counters()
    with resnet_fast.use_backend(backend):
        names = _cuda_kernel_names(step)
    used = {b for (op, b) in dispatch.CALLS if op == "bn_act"}
    expected = backend
    if backend == "auto":
        expected = next(b for b in dispatch.ROUTES["bn_act"]["auto"]["cuda"]
                        if dispatch.usable(b, torch.device("cuda"), BF16))
        assert expected != "torch", "backend auto runs training BN unfused on CUDA"
    assert used == {expected}, f"bn_act ran on {used}, expected {expected}"
    kernel = "channel_sums" if expected == "ext" else "_bn_sums_kernel"
    assert any(kernel in n for n in names), f"no {kernel} CUDA kernel ran in the training step"
    assert set(ours) == set(ref)
    for name in ref:
        assert_2x(ours[name], eager[name], ref[name], BF16, f"{backend}: {name}", norm="l2")
