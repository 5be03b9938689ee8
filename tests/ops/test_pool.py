"""The pooling ops of a ResNet (stem max-pool, ResNet-D shortcut avg-pool, global avg-pool + fc):
the Triton kernels against eager PyTorch and a float64 reference, and the routing of the model's
pooling steps on every backend. Kernels run under TRITON_INTERPRET=1 without CUDA."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import resnet_fast
from _backends import (BACKENDS, DEVICE, KERNEL_DTYPES, launched, launches, rand_nhwc, require_triton_here,
                       skip_unless_usable)
from _numerics import assert_2x
from resnet_fast.ops import dispatch, pool, reference

require_triton_here()
from resnet_fast.ops.triton import conv as triton_conv  # noqa: E402
from resnet_fast.ops.triton import pool as triton_pool  # noqa: E402

DTYPES = KERNEL_DTYPES
CL = torch.channels_last
rand = rand_nhwc


POOL_SHAPES = [(2, 20, 9, 7), (1, 40, 1, 1), (1, 3, 2, 3), (2, 33, 8, 8)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", POOL_SHAPES)
@pytest.mark.parametrize("name", ["max_pool_3x3s2", "avg_pool_2x2_ceil"])
def test_window_pools(name, shape, dtype):
    x = rand(*shape, dtype=dtype)
    with launched(name):
        out = getattr(triton_pool, name)(x)
    assert out.is_contiguous(memory_format=CL)
    eager, ref = getattr(reference, name)(x), getattr(reference, name)(x.double())
    if name.startswith("max"):
        torch.testing.assert_close(out, eager, atol=0, rtol=0)  # a max is exact
    else:
        assert_2x(out, eager, ref)


def test_max_pool_propagates_nan():
    x = rand(1, 4, 5, 5)
    x[0, 1, 2, 2] = float("nan")
    torch.testing.assert_close(triton_pool.max_pool_3x3s2(x), F.max_pool2d(x, 3, 2, 1), equal_nan=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", POOL_SHAPES)
def test_avg_pool_fc(shape, dtype):
    x = rand(*shape, dtype=dtype)
    classes = 11
    w = rand(classes, shape[1], dtype=dtype, scale=shape[1] ** -0.5)
    b = rand(classes, dtype=dtype)
    with launched("global_avg_pool"), launched("conv_bias_act.gemm"):
        out = triton_pool.avg_pool_fc(x, w, b)
    eager = F.linear(F.adaptive_avg_pool2d(x, 1).flatten(1), w, b)
    assert_2x(out, eager, reference.avg_pool_fc(x.double(), w.double(), b.double()))


def test_resnetd_shortcut_pool_then_1x1():
    # avg_pool_2x2_ceil feeds the 1x1 conv's GEMM path directly (dense NHWC).
    x = rand(2, 24, 9, 7, dtype=torch.float16)
    w = rand(40, 24, 1, 1, dtype=torch.float16, scale=24 ** -0.5)
    b = rand(40)
    with launched("avg_pool_2x2_ceil"), launched("conv_bias_act.gemm"):
        out = triton_conv.conv_bias_act(triton_pool.avg_pool_2x2_ceil(x), w, b)
    eager = reference.conv_bias_act(reference.avg_pool_2x2_ceil(x), w, b)
    ref = reference.conv_bias_act(reference.avg_pool_2x2_ceil(x.double()), w.double(), b.double())
    assert_2x(out, eager, ref)


@pytest.mark.parametrize("call,match", [
    (lambda: triton_pool.max_pool_3x3s2(rand(4, 5, 5)), "x must be a 4-D"),
    (lambda: triton_pool.avg_pool_2x2_ceil(rand(1, 4, 5, 5).long()), "x must be float32"),
    (lambda: triton_pool.avg_pool_fc(rand(1, 4, 5, 5), rand(3, 5), rand(3)), r"weight must be \[num_classes"),
    (lambda: triton_pool.avg_pool_fc(rand(1, 4, 5, 5), rand(3, 4), rand(2)), "bias must be 1-D"),
])
def test_pool_rejects_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_pool_opcheck_and_autograd():
    x = rand(1, 5, 5, 4).requires_grad_()
    w = rand(3, 5).requires_grad_()
    b = rand(3).requires_grad_()
    ops = torch.ops.resnet_fast
    before = launches()
    torch.library.opcheck(ops.triton_max_pool_3x3s2.default, (x,))
    torch.library.opcheck(ops.triton_avg_pool_2x2_ceil.default, (x,))
    torch.library.opcheck(ops.triton_avg_pool_fc.default, (x, w, b))
    pool = dict(kernel_size=2, stride=2, ceil_mode=True, count_include_pad=False)
    pairs = [
        (triton_pool.max_pool_3x3s2(x), F.max_pool2d(x, 3, 2, 1)),
        (triton_pool.avg_pool_2x2_ceil(x), F.avg_pool2d(x, **pool)),
        (triton_pool.avg_pool_fc(x, w, b), F.linear(x.mean((2, 3)), w, b)),
    ]
    for ours, eager in pairs:
        grad = torch.randn_like(eager)
        inputs = (x, w, b) if ours.dim() == 2 else (x,)
        for a, e in zip(torch.autograd.grad(ours, inputs, grad), torch.autograd.grad(eager, inputs, grad)):
            torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-5)
    assert launches() > before


def test_pools_torch_compile_fullgraph():
    def head(x, w, b):
        return triton_pool.avg_pool_fc(triton_pool.max_pool_3x3s2(x), w, b)

    args = (rand(2, 8, 7, 7), rand(5, 8), rand(5))
    torch._dynamo.reset()
    compiled = torch.compile(head, fullgraph=True, backend="aot_eager" if DEVICE.type == "cpu" else "inductor")
    with launched("max_pool_3x3s2"), launched("global_avg_pool"):
        out = compiled(*args)
    torch.testing.assert_close(out, head(*args), atol=0, rtol=0)


# --- the model's pooling steps, routed ------------------------------------------------

POOLS = {
    "max_pool": (pool.max_pool, nn.MaxPool2d(3, 2, 1)),
    "shortcut_pool": (pool.shortcut_pool, nn.AvgPool2d(2, 2, ceil_mode=True, count_include_pad=False)),
}


@pytest.mark.parametrize("backend", BACKENDS)
def test_model_pooling_steps_route_by_backend(backend):
    skip_unless_usable(backend)
    x = rand(2, 8, 7, 7)
    fc = nn.Linear(8, 5).to(DEVICE)
    impl = "triton" if backend == "triton" else "torch"
    expected = dict.fromkeys((*POOLS, "avgpool_fc"), impl)
    if backend == "auto" and DEVICE.type == "cpu" and dispatch.ext_usable(DEVICE):
        expected["max_pool"] = "ext"  # the extension's fp32 channels_last kernel (tests/ops/test_ext_max_pool.py)
    before, kernels = dict(dispatch.CALLS), launches()
    with torch.no_grad(), resnet_fast.use_backend(backend):
        for name, (run, module) in POOLS.items():
            torch.testing.assert_close(run(module, x), module(x), atol=1e-6, rtol=1e-6)
        got = pool.avgpool_fc(nn.AdaptiveAvgPool2d(1), fc, x)
        torch.testing.assert_close(got, fc(x.mean((2, 3))), atol=1e-5, rtol=1e-5)
    for op, impl_ in expected.items():
        assert dispatch.CALLS[(op, impl_)] == before.get((op, impl_), 0) + 1, op
    assert (launches() > kernels) == (impl == "triton")


def test_other_pool_configurations_run_the_module():
    x = rand(1, 4, 6, 6)
    kernels = launches()
    with torch.no_grad(), resnet_fast.use_backend("triton"):
        torch.testing.assert_close(pool.max_pool(nn.MaxPool2d(2), x), F.max_pool2d(x, 2))
        torch.testing.assert_close(pool.shortcut_pool(nn.AvgPool2d(2), x), F.avg_pool2d(x, 2))
    assert launches() == kernels
