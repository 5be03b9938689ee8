"""Fake kernels and autograd formulas shared by both op families.

The C++ ops (torch.ops.resnet_fast.<name>, csrc/) and the Triton ops
(torch.ops.resnet_fast.triton_<name>) have the same schemas and semantics, so
one set of fake kernels and backward formulas serves both: `register(prefix)`.

Output strides follow csrc/ops_impl.h's kernel_format: channels_last when x is
channels_last-dense and not also NCHW-contiguous, else NCHW-contiguous.
"""
from __future__ import annotations

import torch
from torch.library import register_autograd, register_fake

# Ops that only mutate their (a!) arguments and return nothing.
MUTATING = ("add_relu_out", "add_relu_", "scale_bias_act_out", "scale_bias_act_", "bn_update_stats_")


def kernel_format(x: torch.Tensor) -> torch.memory_format:
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def empty_like_kernel(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x, memory_format=kernel_format(x))


def _per_channel(x: torch.Tensor) -> torch.Tensor:
    return x.new_empty((x.shape[1],), dtype=acc_dtype(x.dtype))


def register(prefix: str) -> None:
    """Fake kernels and autograd for the ops named resnet_fast::<prefix><op>."""
    ops = torch.ops.resnet_fast

    def name(op: str) -> str:
        return f"resnet_fast::{prefix}{op}"

    def mask(grad, out):
        return getattr(ops, prefix + "add_relu_backward")(grad, out)

    register_fake(name("add_relu"), lambda x, residual: empty_like_kernel(x))
    register_fake(name("add_relu_backward"), lambda grad_out, out: empty_like_kernel(out))
    register_fake(name("scale_bias_act"), lambda x, scale, bias, residual, relu: empty_like_kernel(x))
    register_fake(name("bn_act_fwd"), lambda x, weight, bias, residual, eps, relu: (
        empty_like_kernel(x), _per_channel(x), _per_channel(x)))

    def bn_act_bwd_fake(grad_out, x, out, weight, mean, var, eps, relu, residual_grad):
        grad_r = empty_like_kernel(x) if residual_grad else x.new_empty((0,))
        return empty_like_kernel(x), _per_channel(x), _per_channel(x), grad_r

    register_fake(name("bn_act_bwd"), bn_act_bwd_fake)
    for op in MUTATING:
        register_fake(name(op), lambda *args: None)

    # add_relu: both inputs get grad * (out > 0).
    def add_relu_setup(ctx, inputs, output):
        ctx.save_for_backward(output)

    def add_relu_backward(ctx, grad):
        (out,) = ctx.saved_tensors
        g = mask(grad, out)
        return g, g

    register_autograd(name("add_relu"), add_relu_backward, setup_context=add_relu_setup)

    # scale_bias_act is an inference op; a plain-torch backward keeps it
    # differentiable (e.g. frozen-BN fine-tuning) without more kernels.
    def sba_setup(ctx, inputs, output):
        x, scale, bias, residual, relu = inputs
        ctx.relu, ctx.bias_dtype = relu, bias.dtype
        ctx.save_for_backward(x, scale, output if relu else None)

    def sba_backward(ctx, grad):
        x, scale, out = ctx.saved_tensors
        dz = mask(grad, out) if ctx.relu else grad
        acc = acc_dtype(x.dtype)
        dzf = dz.to(acc)
        dims = [d for d in range(x.dim()) if d != 1]
        shape = [1, -1] + [1] * (x.dim() - 2)
        need_x, need_scale, need_bias, need_res = ctx.needs_input_grad[:4]
        grad_x = (dzf * scale.to(acc).view(shape)).to(x.dtype) if need_x else None
        grad_scale = (dzf * x.to(acc)).sum(dims).to(scale.dtype) if need_scale else None
        grad_bias = dzf.sum(dims).to(ctx.bias_dtype) if need_bias else None
        return grad_x, grad_scale, grad_bias, dz if need_res else None, None

    register_autograd(name("scale_bias_act"), sba_backward, setup_context=sba_setup)

    # bn_act_fwd: mean/var outputs are statistics, not differentiable.
    def bn_setup(ctx, inputs, output):
        x, weight, bias, residual, eps, relu = inputs
        out, mean, var = output
        ctx.eps, ctx.relu = eps, relu
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.save_for_backward(x, out, weight, mean, var)
        ctx.mark_non_differentiable(mean, var)

    def bn_backward(ctx, grad_out, _grad_mean, _grad_var):
        x, out, weight, mean, var = ctx.saved_tensors
        need_x, need_w, need_b, need_r = ctx.needs_input_grad[:4]
        grad_x, grad_w, grad_b, grad_r = getattr(ops, prefix + "bn_act_bwd")(
            grad_out, x, out, weight, mean, var, ctx.eps, ctx.relu, need_r)
        return (grad_x if need_x else None,
                grad_w.to(weight.dtype) if need_w else None,
                grad_b.to(ctx.bias_dtype) if need_b else None,
                grad_r if need_r else None, None, None)

    register_autograd(name("bn_act_fwd"), bn_backward, setup_context=bn_setup)


def register_relu_bits() -> None:
    """Fake kernels of the C++ CPU ops bn_relu_bits_fwd/bwd and bn2_relu_bits_fwd/bwd. Their autograd is
    C++ (csrc/ops.cpp), for eager mode: ops/bn_act_train.py and ops/bn_act.py call them only outside traced code."""
    def fwd_fake(x, weight, bias, residual, eps):
        bits = x.new_empty(((x.numel() + 7) // 8,), dtype=torch.uint8)
        return empty_like_kernel(x), _per_channel(x), _per_channel(x), bits

    def bwd_fake(grad_out, x, relu_bits, weight, mean, var, eps, residual_grad):
        grad_r = empty_like_kernel(x) if residual_grad else x.new_empty((0,))
        return empty_like_kernel(x), _per_channel(x), _per_channel(x), grad_r

    def bn2_fwd_fake(x, weight, bias, eps, shortcut, shortcut_weight, shortcut_bias, shortcut_eps):
        out, mean, var, bits = fwd_fake(x, weight, bias, None, eps)
        return out, mean, var, _per_channel(x), _per_channel(x), bits

    def bn2_bwd_fake(grad_out, relu_bits, x, weight, mean, var, eps, shortcut, shortcut_weight, shortcut_mean,
                     shortcut_var, shortcut_eps):
        return (empty_like_kernel(x), _per_channel(x), _per_channel(x), empty_like_kernel(x), _per_channel(x),
                _per_channel(x))

    register_fake("resnet_fast::bn_relu_bits_fwd", fwd_fake)
    register_fake("resnet_fast::bn_relu_bits_bwd", bwd_fake)
    register_fake("resnet_fast::bn2_relu_bits_fwd", bn2_fwd_fake)
    register_fake("resnet_fast::bn2_relu_bits_bwd", bn2_bwd_fake)
