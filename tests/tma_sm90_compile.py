"""Compile the TMA conv candidates for sm_90 exactly as a launch would specialize them, without a GPU.

    TRITON_INTERPRET=0 python tests/tma_sm90_compile.py

For one ResNet-50 shape per TMA kernel (bf16, the tuner's candidate list for sm90), builds the launch
with conv.kernel_call on real CPU tensors, specializes its arguments with Triton's own binder (divisibility
hints, constexprs, tensor-descriptor types), compiles to sm_90 cubin and prints, per candidate, whether
the PTX moves tiles with TMA (cp.async.bulk.tensor) and multiplies with wgmma. Used by
tests/test_sm_compile.py in a subprocess (the test process runs Triton in interpreter mode).
"""
from __future__ import annotations

import json
import sys

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import create_function_from_signature

from resnet_fast.ops.triton import conv, conv_tma, tuner

CL = torch.channels_last


def compile_launch(kernel, args, kwargs, capability: int):
    """triton.compile of `kernel` specialized for (args, kwargs) the way JITFunction.run does."""
    target = GPUTarget("cuda", capability, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    return triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target, options=options.__dict__)


def resnet50_case(k: int, residual: bool):
    """A layer1 conv of ResNet-50 at batch 8 (64 -> 256 1x1 + residual, or 64 -> 64 3x3)."""
    n, cin, h, w = 8, 64, 56, 56
    cout = 256 if k == 1 else 64
    x = torch.randn(n, cin, h, w).to(torch.bfloat16).contiguous(memory_format=CL)
    weight = torch.randn(cout, cin, k, k).to(torch.bfloat16).contiguous(memory_format=CL)
    bias = torch.randn(cout)
    r = torch.randn(n, cout, h, w).to(torch.bfloat16).contiguous(memory_format=CL) if residual else None
    out = torch.empty(n, cout, h, w, dtype=torch.bfloat16, memory_format=CL)
    stride, padding, dilation = [1, 1], [k // 2] * 2, [1, 1]
    key = conv.shape_key(x, weight, r, out, stride, padding, dilation, True, "tf32")
    return key, (x, weight, bias, r, out, stride, padding, dilation, True, "tf32")


def main() -> int:
    results = []
    for k, residual, kernel_name in ((1, True, conv_tma.GEMM), (3, False, conv_tma.IMPLICIT)):
        key, tensors = resnet50_case(k, residual)
        tma = [c for c in tuner.candidates("sm90", key) if c.kernel == kernel_name]
        assert tma, f"no {kernel_name} candidate for {key}"
        candidate = tma[0]
        kernel, _, args, kwargs = conv.kernel_call(candidate, key, *tensors)
        compiled = compile_launch(kernel, args, kwargs, 90)
        ptx = compiled.asm["ptx"]
        results.append({"kernel": kernel_name, "candidate": str(candidate), "tma": "cp.async.bulk.tensor" in ptx,
                        "wgmma": "wgmma.mma_async" in ptx})
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
