"""Compile the Triton kernels (BN, add_relu, conv, pools) for real GPU targets without a GPU.

    TRITON_INTERPRET=0 python tests/triton_sm_compile.py 80 90

Runs Triton's full pipeline (TTIR -> PTX -> cubin via the bundled ptxas) for
every dtype/layout/flag variant the launchers use, so a kernel that only works
in the interpreter fails here. Used by tests/test_sm_compile.py in a subprocess
(the test process runs Triton in interpreter mode).
"""
from __future__ import annotations

import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from resnet_fast.ops.triton import add_relu as A
from resnet_fast.ops.triton import bn_act as T
from resnet_fast.ops.triton import conv as C
from resnet_fast.ops.triton import pool as P


def conv_variants(capability: int):
    """The fused conv in each mode (gemm, implicit, flat) with the largest tile config of the
    architecture: bf16, plus fp32 with TF32 dot on the implicit path."""
    kernel = C._conv_bias_act_fwd_kernel
    config = C.CANDIDATES["sm90" if capability >= 90 else "sm80"][0]
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    for dt, precision, modes in (("bf16", "ieee", C._MODES.values()), ("fp32", "tf32", (C._MODES["implicit"],))):
        for mode in modes:
            constexprs = dict(KH=3, KW=3, MODE=mode, HAS_RES=True, RELU=True, DOT_PRECISION=precision,
                              UPCAST_DOT=False, **config.kwargs)
            sig = {n: "*fp32" if n == "b_ptr" else f"*{dt}" if n.endswith("_ptr") else "i32"
                   for n in kernel.arg_names if n not in constexprs}
            yield kernel, sig, constexprs, options
    for kernel in (P._max_pool_3x3s2_fwd_kernel, P._avg_pool_2x2_ceil_fwd_kernel, P._global_avg_pool_fwd_kernel):
        constexprs = {n: 32 for n in kernel.arg_names if n.startswith("BLOCK")}
        sig = {n: "*bf16" if n.endswith("_ptr") else "i32" for n in kernel.arg_names if n not in constexprs}
        yield kernel, sig, constexprs, {}


def variants():
    """(kernel, signature, constexprs) for each specialization the BN/add_relu launchers produce."""
    for dt in ("fp16", "bf16", "fp32"):
        p = f"*{dt}"
        for channels_last in (False, True):
            unit = "sC" if channels_last else "sS"  # the stride Triton specializes to 1
            strides = {"sN": "i32", "sC": "i32", "sS": "i32"}
            tiles = {"BLOCK_S": 32, "BLOCK_C": 64} if channels_last else {"BLOCK_S": 512, "BLOCK_C": 4}
            shape = {"C": "i32", "S": "i32", **strides, "n_sblocks": "i32"}
            for grad in (False, True):
                sig = {"x_ptr": p, "g_ptr": p, "o_ptr": p, "mean_ptr": "*fp32", "part_ptr": "*fp32", "N": "i32", **shape}
                yield T._bn_sums_kernel, sig, {unit: 1, "GRAD": grad, "RELU": True, **tiles}
            sig = {"x_ptr": p, "r_ptr": p, "scale_ptr": "*fp32", "shift_ptr": "*fp32", "out_ptr": p, **shape}
            yield T._scale_bias_act_kernel, sig, {unit: 1, "HAS_RES": True, "RELU": True, **tiles}
            sig = {"g_ptr": p, "o_ptr": p, "x_ptr": p, "mean_ptr": "*fp32", "coef_ptr": "*fp32", "gx_ptr": p,
                   "gr_ptr": p, **shape}
            yield T._bn_bwd_elementwise_kernel, sig, {unit: 1, "RELU": True, "GRAD_RES": True, **tiles}
        sig = {"x_ptr": p, "part_ptr": "*fp32", "w_ptr": "*fp32", "b_ptr": "*fp32", "mean_ptr": "*fp32",
               "var_ptr": "*fp32", "scale_ptr": "*fp32", "shift_ptr": "*fp32", "C": "i32", "sC": "i32",
               "splits": "i32", "count": "i32", "eps": "fp32"}
        yield T._bn_stats_finalize_kernel, sig, {"HAS_W": True, "HAS_B": True, "BLOCK_C": 64}
        sig = {"rm_ptr": p, "rv_ptr": p, "mean_ptr": "*fp32", "var_ptr": "*fp32", "C": "i32", "momentum": "fp32",
               "unbias": "fp32"}
        yield T._bn_update_stats_kernel, sig, {"BLOCK_C": 64}
        yield A._add_relu_fwd_kernel, {"x_ptr": p, "r_ptr": p, "out_ptr": p, "n": "i32"}, {"BLOCK": 1024}
        yield A._add_relu_bwd_kernel, {"g_ptr": p, "out_ptr": p, "grad_ptr": p, "n": "i32"}, {"BLOCK": 1024}
    sig = {"part_ptr": "*fp32", "w_ptr": "*fp32", "var_ptr": "*fp32", "gw_ptr": "*fp32", "gb_ptr": "*fp32",
           "coef_ptr": "*fp32", "C": "i32", "splits": "i32", "count": "i32", "eps": "fp32"}
    yield T._bn_grad_finalize_kernel, sig, {"HAS_W": True, "BLOCK_C": 64}


def compile_all(capability: int) -> int:
    n = 0
    for kernel, sig, constexprs, options in [(*v, {}) for v in variants()] + list(conv_variants(capability)):
        names = kernel.arg_names
        full = {name: sig.get(name, "constexpr") for name in names}
        missing = [name for name in names if name not in sig and name not in constexprs]
        assert not missing, f"{kernel.fn.__name__}: no type for {missing}"
        consts = {(names.index(k),): v for k, v in constexprs.items()}
        triton.compile(ASTSource(fn=kernel, signature=full, constexprs=consts),
                       target=GPUTarget("cuda", capability, 32), options=options)
        n += 1
    return n


if __name__ == "__main__":
    for cap in [int(a) for a in sys.argv[1:]] or [80, 90]:
        print(f"sm_{cap}: compiled {compile_all(cap)} kernel variants")
