"""Triton pooling kernels for the ResNet inference path, all NHWC in and out.

  max_pool_3x3s2(x)           the stem's MaxPool2d(3, stride 2, padding 1)
  avg_pool_2x2_ceil(x)        ResNet-D's shortcut AvgPool2d(2, 2, ceil_mode=True,
                              count_include_pad=False)
  avg_pool_fc(x, w, b)        global average pool + Linear: a pooling kernel, then
                              the fc as the conv kernel's GEMM path with a bias
                              epilogue. (Fusing the pool into the GEMM's A loads
                              would re-read x once per class tile: slower.)

Each is a torch.library custom op (resnet_fast::triton_*) with a fake impl and
autograd, so torch.compile(fullgraph=True) and opcheck work. Tile sizes are the
tuner's choice per shape (tuner.py; the torch ops are a candidate too). Launches
are counted in _common.LAUNCHES. Reductions run in fp32; outputs are x's dtype.
"""
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .. import reference
from .._op_meta import acc_dtype
from . import tuner
from ._common import (DTYPE_KEYS, KEY_DTYPES, LAUNCHES, SHORT_NAMES, TORCH_PATH, check_dtype, device_guard,
                      fp32_allows_tf32, require_usable)
from .conv import conv_bias_act_fwd
from .tuner import Candidate

MAX, AVG, GLOBAL = "max_pool_3x3s2", "avg_pool_2x2_ceil", "global_avg_pool"


# --- tuning: shape keys and candidates -----------------------------------------------

class PoolKey(NamedTuple):
    kind: str  # MAX, AVG or GLOBAL
    n: int
    c: int
    h: int
    w: int
    dtype: str  # "float16", "bfloat16", "float32"
    x_cl: bool  # x dense channels_last


def _block_c(c: int) -> int:
    return min(128, max(16, triton.next_power_of_2(c)))


# Window pools: (output pixels, channels (None: the key's, up to 128), warps) per program. At most 16 values
# per thread at 64 channels, 32 at 128: bf16 max-pool tiles of 32 values per thread at 64 channels (4-warp
# 64x64, 8-warp 128x64) spill on sm_90 with triton 3.8 or on sm_80 with 3.6 (benchmarks/static_report.py).
# Global pool: (pixels per step, channels, warps). The interpreter keeps one config each.
_WINDOW = {"gpu": [(32, None, 4), (64, None, 8), (128, 64, 16), (16, None, 4)], "interpreter": [(32, None, 4)]}
_GLOBAL = {"gpu": [(16, None, 4), (32, None, 4), (64, 64, 4), (8, 128, 4)], "interpreter": [(16, None, 4)]}


class _PoolFamily(tuner.Family):
    name = "pool"
    key_type = PoolKey

    @property
    def sources(self):
        return (__file__,)

    def candidates(self, target, key, smem):
        table = _GLOBAL if key.kind == GLOBAL else _WINDOW
        rows = max(1, key.n * key.h * key.w) if key.kind == GLOBAL else max(1, _out_pixels(key))
        kept = []
        for block, block_c, warps in table["interpreter" if target == "interpreter" else "gpu"]:
            block_c = block_c or _block_c(key.c)
            if block_c > _block_c(key.c) or block > max(32, triton.next_power_of_2(rows)):
                continue
            params = {"BLOCK_HW" if key.kind == GLOBAL else "BLOCK_P": block, "BLOCK_C": block_c}
            candidate = Candidate.make("pool", warps, 1, **params)
            if candidate not in kept:
                kept.append(candidate)
        return kept + [tuner.TORCH_CANDIDATE]

    def inputs(self, key, device, generator):
        x = torch.randn(key.n, key.c, key.h, key.w, generator=generator, device=device).to(KEY_DTYPES[key.dtype])
        return (x.contiguous(memory_format=torch.channels_last) if key.x_cl else x), key.kind

    def run(self, candidate, inputs):
        x, kind = inputs
        return global_avg_pool_fwd(x, candidate) if kind == GLOBAL else _pool_fwd(x, kind, candidate)

    def references(self, inputs):
        x, kind = inputs
        return _TORCH[kind](x), _TORCH[kind](x.double())

    def rule_dtype(self, key):
        return KEY_DTYPES[key.dtype]

    def describe(self, key):
        return f"{key.kind} {key.c}ch {key.h}x{key.w} n{key.n} {SHORT_NAMES[key.dtype]}"


FAMILY = tuner.register(_PoolFamily())


def _out_pixels(key: PoolKey) -> int:
    if key.kind == MAX:  # 3x3 / 2, padding 1
        return key.n * ((key.h - 1) // 2 + 1) * ((key.w - 1) // 2 + 1)
    return key.n * ((key.h + 1) // 2) * ((key.w + 1) // 2)  # 2x2 / 2, ceil_mode


def _key(x, kind) -> PoolKey:
    n, c, h, w = x.shape
    return PoolKey(kind, n, c, h, w, DTYPE_KEYS[x.dtype], x.is_contiguous(memory_format=torch.channels_last))


# The torch path of each kind (also the references: in x's dtype and in float64).
_TORCH = {
    MAX: lambda x: reference.max_pool_3x3s2(x).contiguous(memory_format=torch.channels_last),
    AVG: lambda x: reference.avg_pool_2x2_ceil(x).contiguous(memory_format=torch.channels_last),
    GLOBAL: lambda x: x.mean((2, 3), dtype=acc_dtype(x.dtype)).to(x.dtype),  # one rounding, as the kernel
}


@triton.jit
def _window_tile(x_ptr, P, C, HO, WO, stride_xn, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """This program's tile of a windowed pool: BLOCK_P output pixels x BLOCK_C channels."""
    offs_p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    n = (offs_p // (HO * WO)).to(tl.int64)
    ho = (offs_p % (HO * WO)) // WO
    wo = offs_p % WO
    return offs_p, offs_c, offs_p < P, offs_c < C, ho, wo, x_ptr + n * stride_xn


@triton.jit
def _store_tile(out_ptr, acc, offs_p, offs_c, p_ok, c_ok, C):
    # Output is NHWC-dense: pixel-major rows of C channels.
    out_ptrs = out_ptr + offs_p.to(tl.int64)[:, None] * C + offs_c[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=p_ok[:, None] & c_ok[None, :])


@triton.jit
def _max_pool_3x3s2_fwd_kernel(x_ptr, out_ptr, P, C, H, W, HO, WO,
                               stride_xn, stride_xc, stride_xh, stride_xw,
                               BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    offs_p, offs_c, p_ok, c_ok, ho, wo, x_rows = _window_tile(x_ptr, P, C, HO, WO, stride_xn, BLOCK_P, BLOCK_C)
    acc = tl.full((BLOCK_P, BLOCK_C), float("-inf"), dtype=tl.float32)
    for kh in tl.static_range(3):
        for kw in tl.static_range(3):
            hi = ho * 2 - 1 + kh
            wi = wo * 2 - 1 + kw
            ok = p_ok & (hi >= 0) & (hi < H) & (wi >= 0) & (wi < W)
            ptrs = x_rows[:, None] + (hi * stride_xh + wi * stride_xw)[:, None] + offs_c[None, :] * stride_xc
            v = tl.load(ptrs, mask=ok[:, None] & c_ok[None, :], other=float("-inf"))
            acc = tl.maximum(acc, v.to(tl.float32), propagate_nan=tl.PropagateNan.ALL)  # NaN in, NaN out, as torch
    _store_tile(out_ptr, acc, offs_p, offs_c, p_ok, c_ok, C)


@triton.jit
def _avg_pool_2x2_ceil_fwd_kernel(x_ptr, out_ptr, P, C, H, W, HO, WO,
                                  stride_xn, stride_xc, stride_xh, stride_xw,
                                  BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    offs_p, offs_c, p_ok, c_ok, ho, wo, x_rows = _window_tile(x_ptr, P, C, HO, WO, stride_xn, BLOCK_P, BLOCK_C)
    acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
    for kh in tl.static_range(2):
        for kw in tl.static_range(2):
            hi = ho * 2 + kh
            wi = wo * 2 + kw
            ok = p_ok & (hi < H) & (wi < W)
            ptrs = x_rows[:, None] + (hi * stride_xh + wi * stride_xw)[:, None] + offs_c[None, :] * stride_xc
            acc += tl.load(ptrs, mask=ok[:, None] & c_ok[None, :], other=0.0).to(tl.float32)
    # ceil_mode windows hang off the bottom/right edge; count only the real pixels.
    count = (tl.minimum(ho * 2 + 2, H) - ho * 2) * (tl.minimum(wo * 2 + 2, W) - wo * 2)
    acc = acc / count.to(tl.float32)[:, None]
    _store_tile(out_ptr, acc, offs_p, offs_c, p_ok, c_ok, C)


@triton.jit
def _global_avg_pool_fwd_kernel(x_ptr, out_ptr, C, H, W,
                                stride_xn, stride_xc, stride_xh, stride_xw,
                                BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = offs_c < C
    x_img = x_ptr + n * stride_xn
    acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for hw0 in range(0, H * W, BLOCK_HW):
        hw = hw0 + tl.arange(0, BLOCK_HW)
        h = hw // W
        w = hw % W
        ptrs = x_img + (h * stride_xh + w * stride_xw)[:, None] + offs_c[None, :] * stride_xc
        v = tl.load(ptrs, mask=(hw < H * W)[:, None] & c_ok[None, :], other=0.0)
        acc += tl.sum(v.to(tl.float32), axis=0)
    acc = acc / (H * W)
    tl.store(out_ptr + n * C + offs_c, acc.to(out_ptr.dtype.element_ty), mask=c_ok)


# --- launchers ------------------------------------------------------------------

def _check_x(x, name):
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"resnet_fast {name}: x must be a 4-D [N, C, H, W] tensor, got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    check_dtype(x, f"resnet_fast {name}")
    if x.shape[2] < 1 or x.shape[3] < 1:
        raise ValueError(f"resnet_fast {name}: x must have H, W >= 1, got {tuple(x.shape)}")


def _pool_out_shape(x, kind):
    n, c, h, w = x.shape
    if kind == MAX:  # 3x3 / 2, padding 1
        return n, c, (h - 1) // 2 + 1, (w - 1) // 2 + 1
    return n, c, (h + 1) // 2, (w + 1) // 2  # 2x2 / 2, ceil_mode


def _empty_cl(shape, x):
    return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=torch.channels_last)


def _pool_fwd(x, kind, candidate=None):
    """A window pool on the tuner's choice for its shape (or on `candidate`: the tuner's trial runs)."""
    require_usable(x, f"resnet_fast Triton {kind}")
    n, c, ho, wo = _pool_out_shape(x, kind)
    p = n * ho * wo
    if p == 0 or c == 0:
        return _empty_cl((n, c, ho, wo), x)
    choice = candidate or tuner.choose(FAMILY, _key(x, kind), x.device)
    if choice.is_torch:
        TORCH_PATH[kind] += candidate is None
        return _TORCH[kind](x)
    out = _empty_cl((n, c, ho, wo), x)
    kernel = _max_pool_3x3s2_fwd_kernel if kind == MAX else _avg_pool_2x2_ceil_fwd_kernel
    block_p, block_c = choice.kwargs["BLOCK_P"], choice.kwargs["BLOCK_C"]
    with device_guard(x):
        kernel[(triton.cdiv(p, block_p), triton.cdiv(c, block_c))](
            x, out, p, c, x.shape[2], x.shape[3], ho, wo, *x.stride(),
            BLOCK_P=block_p, BLOCK_C=block_c, num_warps=choice.num_warps)
    LAUNCHES[kind] += candidate is None
    return out


def global_avg_pool_fwd(x, candidate=None):
    """[N, C, H, W] -> [N, C] mean over H, W (fp32 sum, x's dtype out)."""
    require_usable(x, "resnet_fast Triton avg_pool_fc")
    n, c, h, w = x.shape
    if n == 0 or c == 0:
        return torch.empty((n, c), dtype=x.dtype, device=x.device)
    choice = candidate or tuner.choose(FAMILY, _key(x, GLOBAL), x.device)
    if choice.is_torch:
        TORCH_PATH[GLOBAL] += candidate is None
        return _TORCH[GLOBAL](x)
    out = torch.empty((n, c), dtype=x.dtype, device=x.device)
    block_c = choice.kwargs["BLOCK_C"]
    with device_guard(x):
        _global_avg_pool_fwd_kernel[(n, triton.cdiv(c, block_c))](
            x, out, c, h, w, *x.stride(), BLOCK_HW=choice.kwargs["BLOCK_HW"], BLOCK_C=block_c,
            num_warps=choice.num_warps)
    LAUNCHES[GLOBAL] += candidate is None
    return out


def _check_fc(x, weight, bias):
    _check_x(x, "avg_pool_fc")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[1] != x.shape[1]:
        raise ValueError(f"resnet_fast avg_pool_fc: weight must be [num_classes, C={x.shape[1]}], got "
                         f"{tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__}")
    if weight.dtype != x.dtype:
        raise ValueError(f"resnet_fast avg_pool_fc: weight dtype {weight.dtype} must match x dtype {x.dtype}")
    if not isinstance(bias, torch.Tensor) or bias.dim() != 1 or bias.shape[0] != weight.shape[0]:
        raise ValueError(f"resnet_fast avg_pool_fc: bias must be 1-D with num_classes={weight.shape[0]} "
                         "elements")
    if not bias.is_floating_point():
        raise ValueError(f"resnet_fast avg_pool_fc: bias must be a floating-point tensor, got {bias.dtype}")
    for label, t in (("weight", weight), ("bias", bias)):
        if t.device != x.device:
            raise ValueError(f"resnet_fast avg_pool_fc: {label} is on {t.device} but x is on {x.device}")


def avg_pool_fc_fwd(x, weight, bias):
    n, c = x.shape[:2]
    classes = weight.shape[0]
    pooled = global_avg_pool_fwd(x)
    out = torch.empty((n, classes), dtype=x.dtype, device=x.device)
    # [N, C] and [classes, C] seen as 1x1 convs: the GEMM path, bias in the epilogue.
    # fp32 uses TF32 iff torch's matmul setting allows it, as F.linear would.
    conv_bias_act_fwd(pooled[:, :, None, None], weight[:, :, None, None], bias.float(), None,
                      (1, 1), (0, 0), (1, 1), False, out=out[:, :, None, None],
                      allow_tf32=fp32_allows_tf32("matmul"))
    return out


# --- torch.library registration ------------------------------------------------------

def _save_x(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _max_pool_backward(ctx, grad):
    (x,) = ctx.saved_tensors
    args = ([3, 3], [2, 2], [1, 1], [1, 1], False)
    # Recompute aten's argmax so ties route the gradient exactly as eager does.
    _, indices = torch.ops.aten.max_pool2d_with_indices(x, *args)
    return torch.ops.aten.max_pool2d_with_indices_backward(grad, x, *args, indices)


def _avg_pool_backward(ctx, grad):
    (x,) = ctx.saved_tensors
    return torch.ops.aten.avg_pool2d_backward(grad, x, [2, 2], [2, 2], [0, 0], True, False, None)


def _register_window_pool(kind, backward):
    """resnet_fast::triton_<kind>(Tensor x) -> Tensor, with its fake kernel and autograd."""
    @torch.library.custom_op(f"resnet_fast::triton_{kind}", mutates_args=(), schema="(Tensor x) -> Tensor")
    def op(x):
        _check_x(x, kind)
        return _pool_fwd(x, kind)

    @op.register_fake
    def _(x):
        _check_x(x, kind)
        return _empty_cl(_pool_out_shape(x, kind), x)

    op.register_autograd(backward, setup_context=_save_x)


_register_window_pool(MAX, _max_pool_backward)
_register_window_pool(AVG, _avg_pool_backward)


@torch.library.custom_op("resnet_fast::triton_avg_pool_fc", mutates_args=(),
                         schema="(Tensor x, Tensor weight, Tensor bias) -> Tensor")
def _avg_pool_fc_op(x, weight, bias):
    _check_fc(x, weight, bias)
    return avg_pool_fc_fwd(x, weight, bias)


@_avg_pool_fc_op.register_fake
def _(x, weight, bias):
    _check_fc(x, weight, bias)
    return x.new_empty((x.shape[0], weight.shape[0]))


def _fc_setup(ctx, inputs, output):
    x, weight, bias = inputs
    ctx.save_for_backward(x, weight)
    ctx.bias_dtype = bias.dtype


def _fc_backward(ctx, grad):
    x, weight = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad
    h, w = x.shape[2], x.shape[3]
    grad_x = grad_w = grad_b = None
    if need_x:
        grad_x = (grad @ weight).div(h * w)[:, :, None, None].expand(x.shape)
    if need_w:
        grad_w = grad.t() @ x.mean(dim=(2, 3), dtype=torch.float32).to(x.dtype)
    if need_b:
        grad_b = grad.sum(0, dtype=torch.float32).to(ctx.bias_dtype)
    return grad_x, grad_w, grad_b


_avg_pool_fc_op.register_autograd(_fc_backward, setup_context=_fc_setup)


# --- public API -------------------------------------------------------------------

def max_pool_3x3s2(x):
    """F.max_pool2d(x, 3, 2, 1) on [N, C, H, W] (any strides; channels_last is fast).
    Returns channels_last, x's dtype."""
    return torch.ops.resnet_fast.triton_max_pool_3x3s2(x)


def avg_pool_2x2_ceil(x):
    """F.avg_pool2d(x, 2, 2, ceil_mode=True, count_include_pad=False), the
    ResNet-D shortcut pool. Returns channels_last, x's dtype."""
    return torch.ops.resnet_fast.triton_avg_pool_2x2_ceil(x)


def avg_pool_fc(x, weight, bias):
    """F.linear(x.mean((2, 3)), weight, bias): [N, C, H, W] -> [N, num_classes].
    weight: [num_classes, C] in x's dtype; bias: [num_classes], any float dtype
    (added in fp32). Returns x's dtype."""
    return torch.ops.resnet_fast.triton_avg_pool_fc(x, weight, bias)
