"""Triton kernels for the fused BatchNorm ops: the "triton" backend of bn_act and scale_bias_act.

Same math as the C++/CUDA extension (csrc/). Forward: one pass of per-channel
shifted sums (K = the channel's first value keeps the one-pass variance well
conditioned), a per-channel finalize, one normalize pass fused with residual
add and ReLU. Backward: one pass of sum(dz) and sum(dz * (x - mean)) with the
ReLU mask recomputed from out > 0, a finalize, one elementwise pass writing
grad_x and grad_residual.

x is seen as [N, C, S] with strides (sN, sC, sS): NCHW (C*S, S, 1) or
channels_last (S*C, 1, C). Tiles are [BLOCK_S, BLOCK_C]; Triton specializes the
stride that equals 1, so accesses are contiguous along S (NCHW) or C (NHWC).

Registered as torch.ops.resnet_fast.triton_<op>, with the C++ ops' schemas; the
package registers their fake kernels and autograd. fp16, bf16 and fp32; fp32 math.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import _op_meta
from ._common import LAUNCHES, check_like, check_runnable

# ---- kernels ------------------------------------------------------------------------

@triton.jit
def _bn_sums_kernel(x_ptr, g_ptr, o_ptr, mean_ptr, part_ptr, N, C, S, sN, sC, sS, n_sblocks,
                    GRAD: tl.constexpr, RELU: tl.constexpr,
                    BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    # Partial per-channel sums over this program's share of (n, s-block) tiles:
    #   stats (GRAD=False): sum(x - K), sum((x - K)^2)
    #   grad  (GRAD=True):  sum(dz), sum(dz * (x - mean)), dz = grad_out masked by out > 0
    split = tl.program_id(1)
    splits = tl.num_programs(1)
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    if GRAD:
        ctr = tl.load(mean_ptr + c, mask=cmask, other=0.0)
    else:
        ctr = tl.load(x_ptr + c * sC, mask=cmask, other=0.0).to(tl.float32)
    acc1 = tl.zeros([BLOCK_S, BLOCK_C], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_S, BLOCK_C], dtype=tl.float32)
    for u in range(split, N * n_sblocks, splits):
        n = u // n_sblocks
        s = (u % n_sblocks) * BLOCK_S + tl.arange(0, BLOCK_S)
        mask = (s < S)[:, None] & cmask[None, :]
        offs = n.to(tl.int64) * sN + s[:, None] * sS + c[None, :] * sC
        xc = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32) - ctr[None, :]
        xc = tl.where(mask, xc, 0.0)
        if GRAD:
            dz = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            if RELU:
                o = tl.load(o_ptr + offs, mask=mask, other=0.0).to(tl.float32)
                dz = tl.where(o > 0, dz, 0.0)
            acc1 += dz
            acc2 += dz * xc
        else:
            acc1 += xc
            acc2 += xc * xc
    tl.store(part_ptr + (split * C + c) * 2, tl.sum(acc1, axis=0), mask=cmask)
    tl.store(part_ptr + (split * C + c) * 2 + 1, tl.sum(acc2, axis=0), mask=cmask)


@triton.jit
def _sum_splits(part_ptr, c, cmask, C, splits):
    s1 = tl.zeros(c.shape, dtype=tl.float64)
    s2 = tl.zeros(c.shape, dtype=tl.float64)
    for sp in range(0, splits):
        s1 += tl.load(part_ptr + (sp * C + c) * 2, mask=cmask, other=0.0).to(tl.float64)
        s2 += tl.load(part_ptr + (sp * C + c) * 2 + 1, mask=cmask, other=0.0).to(tl.float64)
    return s1, s2


@triton.jit
def _bn_stats_finalize_kernel(x_ptr, part_ptr, w_ptr, b_ptr, mean_ptr, var_ptr, scale_ptr, shift_ptr,
                              C, sC, splits, count, eps,
                              HAS_W: tl.constexpr, HAS_B: tl.constexpr, BLOCK_C: tl.constexpr):
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    s1, s2 = _sum_splits(part_ptr, c, cmask, C, splits)
    d = s1 / count
    mean = tl.load(x_ptr + c * sC, mask=cmask, other=0.0).to(tl.float64) + d
    var = tl.maximum(s2 / count - d * d, 0.0).to(tl.float32)
    scale = 1.0 / tl.sqrt(var + eps)
    if HAS_W:
        scale = scale * tl.load(w_ptr + c, mask=cmask, other=1.0).to(tl.float32)
    shift = -mean.to(tl.float32) * scale
    if HAS_B:
        shift += tl.load(b_ptr + c, mask=cmask, other=0.0).to(tl.float32)
    tl.store(mean_ptr + c, mean.to(tl.float32), mask=cmask)
    tl.store(var_ptr + c, var, mask=cmask)
    tl.store(scale_ptr + c, scale, mask=cmask)
    tl.store(shift_ptr + c, shift, mask=cmask)


@triton.jit
def _bn_grad_finalize_kernel(part_ptr, w_ptr, var_ptr, gw_ptr, gb_ptr, coef_ptr, C, splits, count, eps,
                             HAS_W: tl.constexpr, BLOCK_C: tl.constexpr):
    # grad_x = a * dz + b * (x - mean) + d; coef = [a; b; d]
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    s1, s2 = _sum_splits(part_ptr, c, cmask, C, splits)
    sum_dz = s1.to(tl.float32)
    sum_dz_xmu = s2.to(tl.float32)
    invstd = 1.0 / tl.sqrt(tl.load(var_ptr + c, mask=cmask, other=1.0) + eps)
    a = invstd
    if HAS_W:
        a = a * tl.load(w_ptr + c, mask=cmask, other=1.0).to(tl.float32)
    tl.store(gw_ptr + c, sum_dz_xmu * invstd, mask=cmask)
    tl.store(gb_ptr + c, sum_dz, mask=cmask)
    tl.store(coef_ptr + c, a, mask=cmask)
    tl.store(coef_ptr + C + c, -a * invstd * invstd * (sum_dz_xmu / count), mask=cmask)
    tl.store(coef_ptr + 2 * C + c, -a * (sum_dz / count), mask=cmask)


@triton.jit
def _tile(pid_ns, pid_c, C, S, sN, sC, sS, n_sblocks, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    n = pid_ns // n_sblocks
    s = (pid_ns % n_sblocks) * BLOCK_S + tl.arange(0, BLOCK_S)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (s < S)[:, None] & (c < C)[None, :]
    offs = n.to(tl.int64) * sN + s[:, None] * sS + c[None, :] * sC
    return c, mask, offs


@triton.jit
def _scale_bias_act_kernel(x_ptr, r_ptr, scale_ptr, shift_ptr, out_ptr, C, S, sN, sC, sS, n_sblocks,
                           HAS_RES: tl.constexpr, RELU: tl.constexpr,
                           BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    # out = act(x * scale[c] + shift[c] (+ residual)): scale_bias_act and bn_act's normalize pass.
    c, mask, offs = _tile(tl.program_id(0), tl.program_id(1), C, S, sN, sC, sS, n_sblocks, BLOCK_S, BLOCK_C)
    cmask = c < C
    scale = tl.load(scale_ptr + c, mask=cmask, other=0.0)
    shift = tl.load(shift_ptr + c, mask=cmask, other=0.0)
    y = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32) * scale[None, :] + shift[None, :]
    if HAS_RES:
        y += tl.load(r_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if RELU:
        y = tl.where(y < 0, 0.0, y)  # keeps NaN, like torch.relu
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bn_bwd_elementwise_kernel(g_ptr, o_ptr, x_ptr, mean_ptr, coef_ptr, gx_ptr, gr_ptr,
                               C, S, sN, sC, sS, n_sblocks,
                               RELU: tl.constexpr, GRAD_RES: tl.constexpr,
                               BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    c, mask, offs = _tile(tl.program_id(0), tl.program_id(1), C, S, sN, sC, sS, n_sblocks, BLOCK_S, BLOCK_C)
    cmask = c < C
    a = tl.load(coef_ptr + c, mask=cmask, other=0.0)[None, :]
    b = tl.load(coef_ptr + C + c, mask=cmask, other=0.0)[None, :]
    d = tl.load(coef_ptr + 2 * C + c, mask=cmask, other=0.0)[None, :]
    mean = tl.load(mean_ptr + c, mask=cmask, other=0.0)[None, :]
    dz = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if RELU:
        o = tl.load(o_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        dz = tl.where(o > 0, dz, 0.0)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(gx_ptr + offs, (a * dz + b * (x - mean) + d).to(gx_ptr.dtype.element_ty), mask=mask)
    if GRAD_RES:
        tl.store(gr_ptr + offs, dz.to(gr_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bn_update_stats_kernel(rm_ptr, rv_ptr, mean_ptr, var_ptr, C, momentum, unbias, BLOCK_C: tl.constexpr):
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    rm = tl.load(rm_ptr + c, mask=cmask, other=0.0).to(tl.float32)
    rv = tl.load(rv_ptr + c, mask=cmask, other=0.0).to(tl.float32)
    mean = tl.load(mean_ptr + c, mask=cmask, other=0.0)
    var = tl.load(var_ptr + c, mask=cmask, other=0.0)
    rm = (1.0 - momentum) * rm + momentum * mean
    rv = (1.0 - momentum) * rv + momentum * (var * unbias)
    tl.store(rm_ptr + c, rm.to(rm_ptr.dtype.element_ty), mask=cmask)
    tl.store(rv_ptr + c, rv.to(rv_ptr.dtype.element_ty), mask=cmask)


# ---- launchers ------------------------------------------------------------------

def _check_per_channel(p: Tensor, x: Tensor, what: str, name: str) -> None:
    if not isinstance(p, Tensor) or p.dim() != 1 or p.shape[0] != x.shape[1] or p.device != x.device:
        got = (tuple(p.shape), p.device) if isinstance(p, Tensor) else type(p).__name__
        raise ValueError(f"{what}: {name} must be 1-D with {x.shape[1]} values on {x.device}, got {got}")


def _view(x: Tensor) -> tuple[int, int, int, tuple[int, int, int]]:
    """(N, C, S, (sN, sC, sS)) of x, which is dense in its kernel format."""
    N, C = x.shape[0], x.shape[1]
    S = x.numel() // (N * C) if N * C else 0
    if _op_meta.kernel_format(x) == torch.channels_last:
        return N, C, S, (S * C, 1, C)
    return N, C, S, (C * S, S, 1)


def _p2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def _blocks(x: Tensor, C: int, S: int) -> tuple[int, int]:
    # ~2K-element tiles, long along the contiguous dim.
    if _op_meta.kernel_format(x) == torch.channels_last:
        block_c = min(_p2(C), 64)
        return max(1, min(_p2(S), 2048 // block_c)), block_c
    block_s = min(_p2(S), 512)
    return block_s, max(1, min(_p2(C), 2048 // block_s))


_SM_COUNT: dict = {}


def _splits(device: torch.device, c_blocks: int, units: int) -> int:
    # Enough programs to fill the GPU; two under the interpreter to exercise the merge.
    if device.type == "cuda":
        if device not in _SM_COUNT:
            _SM_COUNT[device] = torch.cuda.get_device_properties(device).multi_processor_count
        target = 4 * _SM_COUNT[device]
    else:
        target = 2 * c_blocks
    return max(1, min(triton.cdiv(target, c_blocks), units, 1024))


def _channel_sums(x, grad_out, out, mean, relu: bool, grad: bool) -> tuple[Tensor, int]:
    N, C, S, (sN, sC, sS) = _view(x)
    block_s, block_c = _blocks(x, C, S)
    n_sblocks = triton.cdiv(S, block_s)
    c_blocks = triton.cdiv(C, block_c)
    splits = _splits(x.device, c_blocks, N * n_sblocks)
    partial = torch.empty((splits, C, 2), device=x.device, dtype=torch.float32)
    dummy = partial
    _bn_sums_kernel[(c_blocks, splits)](
        x, grad_out if grad else dummy, out if grad and relu else dummy, mean if grad else dummy, partial,
        N, C, S, sN, sC, sS, n_sblocks, GRAD=grad, RELU=relu, BLOCK_S=block_s, BLOCK_C=block_c)
    LAUNCHES["bn_sums"] += 1
    return partial, splits


def _scale_bias_act_into(x: Tensor, scale: Tensor, shift: Tensor, residual: Optional[Tensor], relu: bool,
                         out: Tensor) -> None:
    # x, residual and out share one kernel format; scale/shift are fp32.
    N, C, S, (sN, sC, sS) = _view(out)
    if out.numel() == 0:
        return
    block_s, block_c = _blocks(out, C, S)
    n_sblocks = triton.cdiv(S, block_s)
    _scale_bias_act_kernel[(N * n_sblocks, triton.cdiv(C, block_c))](
        x, residual if residual is not None else x, scale, shift, out, C, S, sN, sC, sS, n_sblocks,
        HAS_RES=residual is not None, RELU=relu, BLOCK_S=block_s, BLOCK_C=block_c)
    LAUNCHES["scale_bias_act"] += 1


def _check_scale_bias(what, x, scale, bias, residual):
    check_runnable(x, what)
    if x.dim() < 2:
        raise ValueError(f"{what}: x must be (N, C, ...) with at least 2 dims, got shape {tuple(x.shape)}")
    _check_per_channel(scale, x, what, "scale")
    _check_per_channel(bias, x, what, "bias")
    if residual is not None:
        check_like(residual, x, what, "residual")


def _scale_bias_act_to(x, scale, bias, residual, relu, out):
    fmt = _op_meta.kernel_format(out)
    dense = out.is_contiguous(memory_format=fmt)
    dst = out if dense else torch.empty_like(out, memory_format=torch.contiguous_format)
    fmt = _op_meta.kernel_format(dst)
    r = residual.contiguous(memory_format=fmt) if residual is not None else None
    _scale_bias_act_into(x.contiguous(memory_format=fmt), scale.float().contiguous(), bias.float().contiguous(),
                         r, relu, dst)
    if not dense:
        out.copy_(dst)


def scale_bias_act(x: Tensor, scale: Tensor, bias: Tensor, residual: Optional[Tensor], relu: bool) -> Tensor:
    _check_scale_bias("scale_bias_act", x, scale, bias, residual)
    out = _op_meta.empty_like_kernel(x)
    _scale_bias_act_to(x, scale, bias, residual, relu, out)
    return out


def scale_bias_act_out(x, scale, bias, residual, relu, out) -> None:
    _check_scale_bias("scale_bias_act", x, scale, bias, residual)
    check_like(out, x, "scale_bias_act", "out")
    _scale_bias_act_to(x, scale, bias, residual, relu, out)


def bn_act_fwd(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], residual: Optional[Tensor],
               eps: float, relu: bool) -> tuple[Tensor, Tensor, Tensor]:
    what = "bn_act"
    check_runnable(x, what)
    if x.dim() < 2 or x.numel() <= x.shape[1]:
        raise ValueError(f"{what}: batch norm in training needs x of shape (N, C, ...) with more than 1 value "
                         f"per channel, got shape {tuple(x.shape)}")
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None:
            _check_per_channel(p, x, what, name)
    if residual is not None:
        check_like(residual, x, what, "residual")
    fmt = _op_meta.kernel_format(x)
    x = x.contiguous(memory_format=fmt)
    residual = residual.contiguous(memory_format=fmt) if residual is not None else None
    N, C, S, (sN, sC, sS) = _view(x)
    partial, splits = _channel_sums(x, None, None, None, relu=False, grad=False)
    mean = torch.empty(C, device=x.device, dtype=torch.float32)
    var = torch.empty_like(mean)
    scale, shift = torch.empty((2, C), device=x.device, dtype=torch.float32).unbind(0)
    block = min(_p2(C), 1024)
    _bn_stats_finalize_kernel[(triton.cdiv(C, block),)](
        x, partial, weight if weight is not None else mean, bias if bias is not None else mean,
        mean, var, scale, shift, C, sC, splits, N * S, eps,
        HAS_W=weight is not None, HAS_B=bias is not None, BLOCK_C=block)
    LAUNCHES["bn_stats_finalize"] += 1
    out = torch.empty_like(x, memory_format=fmt)
    _scale_bias_act_into(x, scale, shift, residual, relu, out)
    return out, mean, var


def bn_act_bwd(grad_out: Tensor, x: Tensor, out: Tensor, weight: Optional[Tensor], mean: Tensor, var: Tensor,
               eps: float, relu: bool, residual_grad: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    what = "bn_act backward"
    check_runnable(x, what)
    check_like(grad_out, x, what, "grad_out")
    check_like(out, x, what, "out")
    fmt = _op_meta.kernel_format(x)
    x, grad_out, out = (t.contiguous(memory_format=fmt) for t in (x, grad_out, out))
    mean, var = mean.float().contiguous(), var.float().contiguous()
    N, C, S, (sN, sC, sS) = _view(x)
    partial, splits = _channel_sums(x, grad_out, out, mean, relu=relu, grad=True)
    grad_w = torch.empty(C, device=x.device, dtype=torch.float32)
    grad_b = torch.empty_like(grad_w)
    coef = torch.empty((3, C), device=x.device, dtype=torch.float32)
    block = min(_p2(C), 1024)
    _bn_grad_finalize_kernel[(triton.cdiv(C, block),)](
        partial, weight if weight is not None else var, var, grad_w, grad_b, coef, C, splits, N * S, eps,
        HAS_W=weight is not None, BLOCK_C=block)
    LAUNCHES["bn_grad_finalize"] += 1
    grad_x = torch.empty_like(x, memory_format=fmt)
    grad_r = torch.empty_like(x, memory_format=fmt) if residual_grad else x.new_empty((0,))
    block_s, block_c = _blocks(x, C, S)
    n_sblocks = triton.cdiv(S, block_s)
    _bn_bwd_elementwise_kernel[(N * n_sblocks, triton.cdiv(C, block_c))](
        grad_out, out, x, mean, coef, grad_x, grad_r if residual_grad else grad_x, C, S, sN, sC, sS, n_sblocks,
        RELU=relu, GRAD_RES=residual_grad, BLOCK_S=block_s, BLOCK_C=block_c)
    LAUNCHES["bn_bwd_elementwise"] += 1
    return grad_x, grad_w, grad_b, grad_r


def bn_update_stats_(running_mean: Tensor, running_var: Tensor, mean: Tensor, var: Tensor,
                     momentum: float, count: int) -> None:
    what = "bn_update_stats_"
    check_runnable(running_mean, what)
    if count <= 1:
        raise ValueError(f"{what}: count must be > 1 for the unbiased variance, got {count}")
    for name, t in (("running_var", running_var), ("mean", mean), ("var", var)):
        if t.shape != running_mean.shape or t.device != running_mean.device:
            raise ValueError(f"{what}: {name} must match running_mean's shape and device")
    if not (running_mean.is_contiguous() and running_var.is_contiguous()):
        raise ValueError(f"{what}: running_mean and running_var must be contiguous")
    C = running_mean.numel()
    block = min(_p2(C), 1024)
    _bn_update_stats_kernel[(triton.cdiv(C, block),)](
        running_mean, running_var, mean.float().contiguous(), var.float().contiguous(), C,
        momentum, count / (count - 1), BLOCK_C=block)
    LAUNCHES["bn_update_stats"] += 1


# ---- torch.library registration --------------------------------------------------

_lib = "resnet_fast::triton_"


@torch.library.custom_op(_lib + "scale_bias_act", mutates_args=())
def _scale_bias_act_op(x: Tensor, scale: Tensor, bias: Tensor, residual: Optional[Tensor], relu: bool) -> Tensor:
    return scale_bias_act(x, scale, bias, residual, relu)


@torch.library.custom_op(_lib + "scale_bias_act_out", mutates_args=("out",))
def _scale_bias_act_out_op(x: Tensor, scale: Tensor, bias: Tensor, residual: Optional[Tensor], relu: bool,
                           out: Tensor) -> None:
    scale_bias_act_out(x, scale, bias, residual, relu, out)


@torch.library.custom_op(_lib + "scale_bias_act_", mutates_args=("x",))
def _scale_bias_act_inplace_op(x: Tensor, scale: Tensor, bias: Tensor, residual: Optional[Tensor],
                               relu: bool) -> None:
    scale_bias_act_out(x, scale, bias, residual, relu, x)


@torch.library.custom_op(_lib + "bn_act_fwd", mutates_args=())
def _bn_act_fwd_op(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], residual: Optional[Tensor],
                   eps: float, relu: bool) -> tuple[Tensor, Tensor, Tensor]:
    return bn_act_fwd(x, weight, bias, residual, eps, relu)


@torch.library.custom_op(_lib + "bn_act_bwd", mutates_args=())
def _bn_act_bwd_op(grad_out: Tensor, x: Tensor, out: Tensor, weight: Optional[Tensor], mean: Tensor, var: Tensor,
                   eps: float, relu: bool, residual_grad: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return bn_act_bwd(grad_out, x, out, weight, mean, var, eps, relu, residual_grad)


@torch.library.custom_op(_lib + "bn_update_stats_", mutates_args=("running_mean", "running_var"))
def _bn_update_stats_op(running_mean: Tensor, running_var: Tensor, mean: Tensor, var: Tensor,
                        momentum: float, count: int) -> None:
    bn_update_stats_(running_mean, running_var, mean, var, momentum, count)

