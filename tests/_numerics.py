"""What every numerics test shares: the 2x rule (resnet_fast.numerics), a dispatch spy, the TF32 switch."""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from resnet_fast.numerics import FLOOR, within_2x  # noqa: F401  (FLOOR: re-exported)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def assert_2x(ours: torch.Tensor, eager: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype = None,
              what: str = "output", norm: str = "max") -> None:
    """resnet_fast.numerics.within_2x as an assertion (the rule the tuner judges kernels by).

    dtype defaults to eager's: the precision whose own error sets the bar."""
    verdict = within_2x(ours.cpu(), eager.cpu(), ref.cpu(), dtype or eager.dtype, norm)
    assert verdict.ok, f"{what}: {verdict.why}"


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
