"""Triton kernels for add_relu: relu(x + residual) and its backward (grad where out > 0).

x, residual and out are made dense in one kernel format, so the kernels run on
flat memory. Registered as torch.ops.resnet_fast.triton_add_relu{,_out,_,_backward}
with the C++ ops' schemas; the package registers their fake kernels and autograd.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import _op_meta
from ._common import LAUNCHES, check_like, check_runnable

BLOCK = 1024


@triton.jit
def _add_relu_fwd_kernel(x_ptr, r_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    y = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    y += tl.load(r_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    y = tl.where(y < 0, 0.0, y)  # keeps NaN, like torch.relu
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _add_relu_bwd_kernel(g_ptr, out_ptr, grad_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(g_ptr + offs, mask=mask, other=0.0)
    o = tl.load(out_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(grad_ptr + offs, tl.where(o > 0, g, 0.0).to(grad_ptr.dtype.element_ty), mask=mask)


def _launch_fwd(x: Tensor, residual: Tensor, out: Tensor) -> None:
    n = out.numel()
    if n:
        _add_relu_fwd_kernel[(triton.cdiv(n, BLOCK),)](x, residual, out, n, BLOCK=BLOCK)
        LAUNCHES["add_relu_fwd"] += 1


def add_relu_fwd(x: Tensor, residual: Tensor) -> Tensor:
    check_runnable(x, "add_relu")
    check_like(residual, x, "add_relu", "residual")
    fmt = _op_meta.kernel_format(x)
    out = torch.empty_like(x, memory_format=fmt)
    _launch_fwd(x.contiguous(memory_format=fmt), residual.contiguous(memory_format=fmt), out)
    return out


def add_relu_out(x: Tensor, residual: Tensor, out: Tensor) -> None:
    check_runnable(x, "add_relu")
    check_like(residual, x, "add_relu", "residual")
    check_like(out, x, "add_relu", "out")
    fmt = _op_meta.kernel_format(out)
    if out.is_contiguous(memory_format=fmt):
        _launch_fwd(x.contiguous(memory_format=fmt), residual.contiguous(memory_format=fmt), out)
    else:
        out.copy_(add_relu_fwd(x, residual))


def add_relu_bwd(grad_out: Tensor, out: Tensor) -> Tensor:
    check_runnable(out, "add_relu backward")
    check_like(grad_out, out, "add_relu backward", "grad_out")
    fmt = _op_meta.kernel_format(out)
    grad = torch.empty_like(out, memory_format=fmt)
    n = out.numel()
    if n:
        _add_relu_bwd_kernel[(triton.cdiv(n, BLOCK),)](
            grad_out.contiguous(memory_format=fmt), out.contiguous(memory_format=fmt), grad, n, BLOCK=BLOCK)
        LAUNCHES["add_relu_bwd"] += 1
    return grad


@torch.library.custom_op("resnet_fast::triton_add_relu", mutates_args=())
def _add_relu_op(x: Tensor, residual: Tensor) -> Tensor:
    return add_relu_fwd(x, residual)


@torch.library.custom_op("resnet_fast::triton_add_relu_out", mutates_args=("out",))
def _add_relu_out_op(x: Tensor, residual: Tensor, out: Tensor) -> None:
    add_relu_out(x, residual, out)


@torch.library.custom_op("resnet_fast::triton_add_relu_", mutates_args=("x",))
def _add_relu_inplace_op(x: Tensor, residual: Tensor) -> None:
    add_relu_out(x, residual, x)


@torch.library.custom_op("resnet_fast::triton_add_relu_backward", mutates_args=())
def _add_relu_backward_op(grad_out: Tensor, out: Tensor) -> Tensor:
    return add_relu_bwd(grad_out, out)
