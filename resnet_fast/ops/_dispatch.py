"""Which backend runs a fused training/epilogue op (bn_act, add_relu, scale_bias_act).

An explicit backend (resnet_fast.use_backend / RESNET_FAST_BACKEND) must be able
to run, or resnet_fast.backend.require raises. "auto" takes the first usable
entry of AUTO_PREFERENCE for the tensor's device type.
"""
from __future__ import annotations

from collections import Counter

import torch

from .. import backend as _backend

# "auto", per device type and op: first usable wins.
#   cpu:  measured with benchmarks/bench_ops.py on a 2-core VM. The quiet-machine run at a
#         clean commit, benchmarks/results/ops_cpu_2026-11-27_at_3c6ddfe.json (2 threads):
#         scale_bias_act: ext beats eager 8/8 (1.5-2x); bn_act forward: ext beats eager 6/8
#         (fp32 2-2.8x, bf16 about even); bn_act forward+backward (what training runs):
#         ext wins 4/8 (fp32 NCHW up to 1.6x), eager ahead on most bf16 shapes: mixed, ext
#         kept as the fp32 winner; add_relu: eager ahead 8/8, so it stays on torch. (The
#         earlier ops_cpu_2026-11-27{,_1thread,_add_relu_2thread_rerun}.json ran under heavy
#         load on the uncommitted extension; their "commit" field predates it.) The Triton
#         interpreter is never a choice.
#   cuda: NOT MEASURED YET (no GPU in the session that wrote this). The extension
#         is the default; a GPU session runs `python benchmarks/bench_ops.py
#         --device cuda` and reorders these rows to what it measures.
AUTO_PREFERENCE: dict[str, dict[str, tuple[str, ...]]] = {
    "cpu": {
        "bn_act": ("ext", "torch"),
        "add_relu": ("torch",),
        "scale_bias_act": ("ext", "torch"),
    },
    "cuda": {
        "bn_act": ("ext", "triton", "torch"),
        "add_relu": ("ext", "triton", "torch"),
        "scale_bias_act": ("ext", "triton", "torch"),
    },
}

TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# (op, backend) -> calls: lets tests and benchmarks see which implementation ran.
CALLS: Counter = Counter()


def usable(name: str, device: torch.device, dtype: torch.dtype) -> bool:
    if name == "torch":
        return True
    if name == "ext":
        return _backend.ext_usable(device)
    return name == "triton" and dtype in TRITON_DTYPES and _backend.triton_usable(device)


def choose(op: str, device: torch.device, dtype: torch.dtype) -> str:
    """The backend that runs `op` on tensors of this device and dtype (counted in CALLS)."""
    name = _backend.get_backend()
    if name == "auto":
        prefs = AUTO_PREFERENCE.get(device.type, {}).get(op, ())
        name = next((b for b in prefs if usable(b, device, dtype)), "torch")
    else:
        _backend.require(name, device)
        if name == "triton" and dtype not in TRITON_DTYPES:
            raise TypeError(f"resnet_fast backend 'triton' runs {op} in float16, bfloat16 or float32, got {dtype}")
    CALLS[(op, name)] += 1
    return name


def op(backend: str, name: str):
    """torch.ops.resnet_fast.<name> (ext) or .triton_<name> (triton)."""
    if backend == "triton":
        from . import triton_bn_act  # noqa: F401  registers the Triton op family
        return getattr(torch.ops.resnet_fast, "triton_" + name)
    return getattr(torch.ops.resnet_fast, name)
