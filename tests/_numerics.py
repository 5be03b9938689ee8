"""What every numerics test shares: the 2x rule, its floors, a dispatch spy, the TF32 switch.

The 2x rule (flash-attention's): our error against a float64 reference is at most twice eager
PyTorch's own error in the same precision, plus a small floor relative to the reference's size.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode

DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# The floor: two roundings of a half type; for fp32 room for another summation order over a few
# hundred terms. Absolute for values of order one (a result that cancels to ~0 keeps the rounding
# noise of its inputs), relative beyond; relative to the whole tensor in the L2 norm.
FLOOR = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2 ** -9, torch.bfloat16: 2 ** -6}


def error(ours: torch.Tensor, ref: torch.Tensor, norm: str = "max") -> float:
    d = ours.detach().double().cpu() - ref.detach().double().cpu()
    return (d.abs().max() if norm == "max" else d.norm()).item() if d.numel() else 0.0


def assert_2x(ours: torch.Tensor, eager: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype = None,
              what: str = "output", norm: str = "max") -> None:
    """|ours - ref| <= 2 |eager - ref| + FLOOR[dtype] * scale, in the max norm with scale = max(1, |ref|),
    or in the L2 norm with scale = |ref| (for whole noisy tensors, e.g. a training step's gradients).

    dtype defaults to eager's: the precision whose own error sets the bar."""
    dtype = dtype or eager.dtype
    assert ours.shape == ref.shape, f"{what}: shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(ours).all(), f"{what}: non-finite values"
    size = error(ref, torch.zeros_like(ref), norm)
    scale = size if norm == "l2" else max(1.0, size)
    err, eager_err = error(ours, ref, norm), error(eager, ref, norm)
    bound = 2 * eager_err + FLOOR[dtype] * scale
    assert err <= bound, (f"{what}: error {err:.3g} > 2 x eager's {eager_err:.3g} + floor "
                          f"{FLOOR[dtype] * scale:.3g} ({dtype}, |ref| {size:.3g})")


def max_rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|: the error of logits, which are never all near zero."""
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


class Spy(TorchDispatchMode):
    """Records every op dispatched inside the block (proof that a registered op ran)."""

    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))

    def count(self, op: str) -> int:
        return self.names.count(f"resnet_fast.{op}")


@contextlib.contextmanager
def fp32_precision(conv: str = "ieee", matmul: str = "ieee") -> Iterator[None]:
    """Set torch's fp32 conv and matmul precision ("ieee" or "tf32") for the block: the new
    fp32_precision API where torch has it (mixing it with the legacy flags makes torch raise)."""
    conv_node = getattr(torch.backends.cudnn, "conv", None)
    matmul_node = torch.backends.cuda.matmul
    if conv_node is not None and hasattr(conv_node, "fp32_precision"):
        saved = conv_node.fp32_precision, matmul_node.fp32_precision
        conv_node.fp32_precision, matmul_node.fp32_precision = conv, matmul
        try:
            yield
        finally:
            conv_node.fp32_precision, matmul_node.fp32_precision = saved
    else:
        saved = torch.backends.cudnn.allow_tf32, matmul_node.allow_tf32
        torch.backends.cudnn.allow_tf32, matmul_node.allow_tf32 = conv == "tf32", matmul == "tf32"
        try:
            yield
        finally:
            torch.backends.cudnn.allow_tf32, matmul_node.allow_tf32 = saved


def rand(shape, dtype=torch.float32, fmt=torch.contiguous_format, device="cpu") -> torch.Tensor:
    return torch.randn(shape, device=device).to(dtype=dtype, memory_format=fmt)


def step(fn, x, r, grad):
    """fn(x, r) forward + backward on fresh leaves; returns (out, grad of x, grad of r or None)."""
    x = x.detach().clone().requires_grad_()
    r = r.detach().clone().requires_grad_() if r is not None else None
    out = fn(x, r)
    out.backward(grad)
    return out.detach(), x.grad, None if r is None else r.grad


def grads_of(fn, inputs, grad):
    """fn(*inputs) on fresh leaves, and the gradients of its output w.r.t. every non-None input."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in inputs]
    out = fn(*leaves)
    return out, torch.autograd.grad(out, [t for t in leaves if t is not None], grad)
