"""The training bn_act op's eager autograd: one lean torch.autograd.Function around the fused ops.

torch.library.register_autograd (ops/_op_meta.py) makes bn_act_fwd differentiable for every caller,
torch.compile included, but its generic wrapper costs ~150 us of Python per forward and ~60 us per
backward on CPU (torch.profiler, resnet18 training step: ~4% of the step at batch 8, 112 px). In eager
mode this Function calls the same two ops below the autograd dispatch keys, where the registered
wrapper would only redispatch (~20 us a call): the same kernels, outputs and gradients. Its backward
cost ~110 us of Python a call besides the op (resnet50 training step, timed per statement); the op
lookups are cached and the no-op dtype casts skipped. Traced code (torch.compile, export) keeps the
registered op.
On CPU with the extension, BN+ReLU runs bn_relu_bits_fwd instead: it saves the ReLU's mask as bits
rather than reading the output back (the backward's two passes then read 1/32 of an fp32 tensor for
it instead of the whole output twice), and its autograd is C++ (csrc/ops.cpp): no Python per call.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import dispatch
from ._op_meta import kernel_format

_BITS_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class _BnAct(torch.autograd.Function):
    @staticmethod
    def forward(ctx, impl: str, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                residual: Optional[Tensor], eps: float, relu: bool):
        with torch._C._AutoDispatchBelowAutograd():
            out, mean, var = dispatch.eager_op(impl, "bn_act_fwd")(x, weight, bias, residual, eps, relu)
        ctx.impl, ctx.eps, ctx.relu = impl, eps, relu
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.save_for_backward(x, out, weight, mean, var)
        ctx.mark_non_differentiable(mean, var)
        return out, mean, var

    @staticmethod
    def backward(ctx, grad_out: Tensor, _grad_mean, _grad_var):
        # Under create_graph=True the grads are not differentiable again: once_differentiable makes a second
        # backward through them raise. An ordinary backward (grad mode off) skips its ~35 us a call.
        if torch.is_grad_enabled():
            return _backward_once_differentiable(ctx, grad_out)
        return _backward(ctx, grad_out)


def relu_bits_usable(impl: str, x: Tensor, relu: bool) -> bool:
    """Whether this ReLU's mask can be saved as bits: the extension's CPU kernels, whose bits ops take
    runs (channels_last rows, NCHW planes) of a multiple of 8 elements."""
    if not (relu and impl == "ext" and x.device.type == "cpu" and x.dtype in _BITS_DTYPES):
        return False
    run = x.shape[1] if kernel_format(x) == torch.channels_last else math.prod(x.shape[2:])
    return run % 8 == 0


def _backward(ctx, grad_out: Tensor):
    x, out, weight, mean, var = ctx.saved_tensors
    _, need_x, need_w, need_b, need_r = ctx.needs_input_grad[:5]
    with torch._C._AutoDispatchBelowAutograd():
        grad_x, grad_w, grad_b, grad_r = dispatch.eager_op(ctx.impl, "bn_act_bwd")(
            grad_out, x, out, weight, mean, var, ctx.eps, ctx.relu, need_r)
    return (None, grad_x if need_x else None, _as(grad_w, weight.dtype) if need_w else None,
            _as(grad_b, ctx.bias_dtype) if need_b else None, grad_r if need_r else None, None, None)


_backward_once_differentiable = once_differentiable(_backward)


def _as(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t if t.dtype == dtype else t.to(dtype)  # Tensor.to costs ~15 us even when it returns t


def bn_act_fwd(impl: str, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
               residual: Optional[Tensor], eps: float, relu: bool) -> tuple[Tensor, Tensor, Tensor]:
    """dispatch.op(impl, "bn_act_fwd")(...), differentiable, with the lean eager autograd when it applies."""
    if torch.compiler.is_compiling():
        return dispatch.op(impl, "bn_act_fwd")(x, weight, bias, residual, eps, relu)
    if relu_bits_usable(impl, x, relu):  # its autograd is C++ (csrc/ops.cpp)
        out, mean, var, _ = dispatch.eager_op(impl, "bn_relu_bits_fwd")(x, weight, bias, residual, eps)
        return out, mean, var
    return _BnAct.apply(impl, x, weight, bias, residual, eps, relu)
