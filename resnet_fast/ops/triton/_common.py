"""What every Triton op shares: its dtypes, its input checks, the TF32 rule, the launch counters, the MMA step."""
from __future__ import annotations

import contextlib
from collections import Counter

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import dispatch

DTYPES = dispatch.IMPLS["triton"][1]  # float16, bfloat16, float32
# Tuning keys name dtypes by string (they are stored as JSON); people read the short names.
KEY_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
DTYPE_KEYS = {dtype: name for name, dtype in KEY_DTYPES.items()}
SHORT_NAMES = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}

# Launches by kernel name ("conv_bias_act.gemm", "bn_sums", ...): tests read it to prove a kernel ran.
# Only calls whose output reaches the caller count (the tuner's trial runs do not).
LAUNCHES: Counter = Counter()
# Calls the tuner sent down the torch path instead (cuDNN/oneDNN + fused epilogue), by op family.
TORCH_PATH: Counter = Counter()


def require_usable(x: Tensor, what: str) -> None:
    """A clear error instead of a Triton trace for tensors these kernels cannot take."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{what}: expected a tensor, got {type(x).__name__}")
    if not dispatch.triton_usable(x.device):
        raise RuntimeError(f"{what}: Triton kernels need CUDA tensors, or CPU tensors with TRITON_INTERPRET=1 "
                           f"set before triton is imported; got a {x.device.type} tensor "
                           f"({dispatch.triton_status()[1]})")


def check_dtype(x: Tensor, what: str) -> None:
    if x.dtype not in DTYPES:
        raise ValueError(f"{what}: x must be float32, float16 or bfloat16, got {x.dtype}")


def check_runnable(x: Tensor, what: str) -> None:
    require_usable(x, what)
    check_dtype(x, what)


def check_like(t: Tensor, x: Tensor, what: str, name: str) -> None:
    if not isinstance(t, Tensor) or t.shape != x.shape or t.dtype != x.dtype or t.device != x.device:
        got = (tuple(t.shape), t.dtype, t.device) if isinstance(t, Tensor) else type(t).__name__
        raise ValueError(f"{what}: {name} must match x (shape {tuple(x.shape)}, {x.dtype}, {x.device}), got {got}")


def device_guard(x: Tensor):
    """Launch on x's GPU (Triton launches on the current device)."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def fp32_allows_tf32(op: str = "conv") -> bool:
    """Whether torch would use TF32 right now for an fp32 `op`: "conv" (cuDNN) or "matmul" (cuBLAS)."""
    if op == "conv":
        chain = (getattr(torch.backends.cudnn, "conv", None), torch.backends.cudnn, torch.backends)
    else:
        chain = (torch.backends.cuda.matmul, torch.backends)
    if not hasattr(chain[0], "fp32_precision"):  # torch < 2.9: only the legacy flags
        legacy = torch.backends.cudnn if op == "conv" else torch.backends.cuda.matmul
        return bool(legacy.allow_tf32)
    # "none" inherits from the parent setting. (Reading the legacy flags raises
    # once the new API has been used, so they are not consulted here.)
    for node in chain:
        setting = getattr(node, "fp32_precision", "none")
        if setting != "none":
            return setting == "tf32"
    return False


@triton.jit
def _mma(a, b, acc, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    if UPCAST_DOT:
        # Only under TRITON_INTERPRET: the interpreter's tl.dot returns garbage
        # for bf16 operands, so it multiplies their exact fp32 values instead.
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=DOT_PRECISION)
