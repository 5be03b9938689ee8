"""Property-based tests: every op against its torch reference over generated shapes, strides,
dilations, groups, dtypes and layouts (odd sizes and non-contiguous inputs included), under the 2x rule.

Hypothesis draws a few hundred cases in all, derandomized so CI sees the same ones every run; the
Triton kernels run under the interpreter without CUDA, so sizes stay small.
"""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import nn

import resnet_fast
from _backends import DEVICE, FAMILIES, Family, skip_unless_usable
from _numerics import assert_2x, fp32_precision
from resnet_fast.ops import reference
from resnet_fast.ops.conv_bn import conv_bn_act


def cases(n: int):
    return settings(max_examples=n, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])


DTYPES = st.sampled_from([torch.float32, torch.float16])  # bf16: the interpreter's tl.dot is off; GPU tests
LAYOUTS = st.sampled_from(["nchw", "channels_last", "strided"])


def laid_out(t: torch.Tensor, layout: str) -> torch.Tensor:
    """t with the same values in NCHW, channels_last, or a non-contiguous view (every other column)."""
    if layout == "channels_last" and t.dim() == 4:
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "strided":
        wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
        wide[..., ::2] = t
        return wide[..., ::2]
    return t.contiguous()


def randn(*shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, dtype=torch.float64) * scale).to(DEVICE, dtype)


@pytest.fixture(autouse=True)
def ieee_fp32():
    with fp32_precision("ieee", "ieee"):
        yield


@cases(120)
@given(n=st.integers(1, 2), cin=st.integers(1, 40), cout=st.integers(1, 40), h=st.integers(1, 9),
       w=st.integers(1, 9), k=st.sampled_from([1, 3, 5, 7]), stride=st.integers(1, 3), pad=st.integers(0, 3),
       dilation=st.integers(1, 2), residual=st.booleans(), relu=st.booleans(), dtype=DTYPES, layout=LAYOUTS)
def test_triton_conv_bias_act(n, cin, cout, h, w, k, stride, pad, dilation, residual, relu, dtype, layout):
    skip_unless_usable("triton")
    from resnet_fast.ops.triton import conv
    ho = (h + 2 * pad - dilation * (k - 1) - 1) // stride + 1
    wo = (w + 2 * pad - dilation * (k - 1) - 1) // stride + 1
    assume(ho >= 1 and wo >= 1)
    x = laid_out(randn(n, cin, h, w, dtype=dtype), layout)
    weight = laid_out(randn(cout, cin, k, k, dtype=dtype, scale=(cin * k * k) ** -0.5), layout)
    bias = randn(cout)
    r = laid_out(randn(n, cout, ho, wo, dtype=dtype), layout) if residual else None
    out = conv.conv_bias_act(x, weight, bias, r, stride, pad, dilation, relu)
    assert out.is_contiguous(memory_format=torch.channels_last)
    eager = reference.conv_bias_act(x, weight, bias, r, stride, pad, dilation, relu)
    ref = reference.conv_bias_act(x.double(), weight.double(), bias.double(), None if r is None else r.double(),
                                  stride, pad, dilation, relu)
    assert_2x(out, eager, ref)


@cases(80)
@given(backend=st.sampled_from(["torch", "ext", "triton"]), n=st.integers(1, 2),
       groups=st.sampled_from([1, 2, 4]), cin_per_group=st.integers(1, 6), cout_per_group=st.integers(1, 6),
       hw=st.integers(1, 7), k=st.sampled_from([1, 3]), stride=st.integers(1, 2), dilation=st.integers(1, 2),
       residual=st.booleans(), relu=st.booleans(), dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_conv_bn_act_eval(backend, n, groups, cin_per_group, cout_per_group, hw, k, stride, dilation, residual,
                          relu, dtype):
    """The block op in eval, routed: BN folded, grouped convs included (Triton hands them to cuDNN + ext)."""
    skip_unless_usable(backend)
    assume(backend != "triton" or dtype != torch.bfloat16 or DEVICE.type == "cuda")
    cin, cout = groups * cin_per_group, groups * cout_per_group
    conv = nn.Conv2d(cin, cout, k, stride, dilation * (k // 2), dilation, groups, bias=False)
    bn = nn.BatchNorm2d(cout)
    with torch.no_grad():
        for t, lo, hi in ((bn.running_mean, -1, 1), (bn.running_var, 0.5, 2), (bn.weight, 0.5, 1.5),
                          (bn.bias, -1, 1)):
            t.uniform_(lo, hi)
    conv, bn = conv.eval().to(DEVICE), bn.eval().to(DEVICE)
    x = randn(n, cin, hw, hw)
    ho = (hw - 1) // stride + 1
    r = randn(n, cout, ho, ho) if residual else None
    with torch.no_grad():
        ref = F.batch_norm(F.conv2d(x.double(), conv.weight.double(), None, stride, conv.padding, dilation, groups),
                           bn.running_mean.double(), bn.running_var.double(), bn.weight.double(), bn.bias.double(),
                           False, 0.0, bn.eps)
        ref = ref + r.double() if residual else ref
        ref = F.relu(ref) if relu else ref
        low = (conv.to(dtype), bn.to(dtype), x.to(dtype), None if r is None else r.to(dtype))
        eager = low[1](low[0](low[2]))
        eager = F.relu(eager + low[3] if residual else eager) if relu else (eager + low[3] if residual else eager)
        with resnet_fast.use_backend(backend):
            out = conv_bn_act(low[2], low[0], low[1], low[3], relu)
    assert out.dtype == dtype
    assert_2x(out, eager, ref)


@cases(60)
@given(family=st.sampled_from(FAMILIES), n=st.integers(1, 3), c=st.integers(1, 9), h=st.integers(1, 7),
       w=st.integers(1, 7), residual=st.booleans(), relu=st.booleans(), dtype=DTYPES, layout=LAYOUTS)
def test_bn_act_ops(family, n, c, h, w, residual, relu, dtype, layout):
    assume(n * h * w > 1)  # training BN needs more than one value per channel
    ops = Family(family, DEVICE)
    x = laid_out(randn(n, c, h, w, dtype=dtype) * 2 + 1, layout)
    r = laid_out(randn(n, c, h, w, dtype=dtype), layout) if residual else None
    weight, bias = randn(c).abs() + 0.5, randn(c)
    grad = laid_out(randn(n, c, h, w, dtype=dtype), layout)

    def eager(x, weight, bias, r):
        y = F.batch_norm(x, None, None, weight, bias, True, 0.0, 1e-5)
        y = y + r if r is not None else y
        return F.relu(y) if relu else y

    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, weight, bias, r)]
    out = ops.bn_act_fwd(*leaves, 1e-5, relu)[0]
    ours = [out, *torch.autograd.grad(out, [t for t in leaves if t is not None], grad)]
    for name, inputs in (("eager", (x, weight, bias, r)),
                         ("ref", tuple(None if t is None else t.double() for t in (x, weight, bias, r)))):
        leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in inputs]
        y = eager(*leaves)
        grads = torch.autograd.grad(y, [t for t in leaves if t is not None], grad.to(y.dtype))
        if name == "eager":
            theirs = [y, *grads]
        else:
            refs = [y, *grads]
    for what, a, e, rf in zip(("out", "grad_x", "grad_w", "grad_b", "grad_r"), ours, theirs, refs):
        assert_2x(a, e, rf, dtype, what)


@cases(40)
@given(family=st.sampled_from(FAMILIES), shape=st.lists(st.integers(1, 6), min_size=2, max_size=5),
       residual=st.booleans(), relu=st.booleans(), dtype=DTYPES, layout=LAYOUTS)
def test_scale_bias_act_ops(family, shape, residual, relu, dtype, layout):
    ops = Family(family, DEVICE)
    x = laid_out(randn(*shape, dtype=dtype), layout)
    r = laid_out(randn(*shape, dtype=dtype), layout) if residual else None
    scale, bias = randn(shape[1]), randn(shape[1])
    out = ops.scale_bias_act(x, scale, bias, r, relu)
    eager = reference.scale_bias_act(x, scale.to(dtype), bias.to(dtype), r, relu)
    ref = reference.scale_bias_act(x.double(), scale.double(), bias.double(),
                                   None if r is None else r.double(), relu)
    assert_2x(out, eager, ref, dtype)


@cases(40)
@given(family=st.sampled_from(FAMILIES), shape=st.lists(st.integers(1, 6), min_size=2, max_size=5),
       dtype=DTYPES, layout=LAYOUTS)
def test_add_relu_ops(family, shape, dtype, layout):
    ops = Family(family, DEVICE)
    x, r = (laid_out(randn(*shape, dtype=dtype), layout) for _ in range(2))
    out = ops.add_relu(x, r)
    assert_2x(out, reference.add_relu(x, r), reference.add_relu(x.double(), r.double()), dtype)


@cases(40)
@given(n=st.integers(1, 2), c=st.integers(1, 40), h=st.integers(1, 9), w=st.integers(1, 9), dtype=DTYPES,
       layout=LAYOUTS, classes=st.integers(1, 12))
def test_triton_pools(n, c, h, w, dtype, layout, classes):
    skip_unless_usable("triton")
    from resnet_fast.ops.triton import pool
    x = laid_out(randn(n, c, h, w, dtype=dtype), layout)
    torch.testing.assert_close(pool.max_pool_3x3s2(x), reference.max_pool_3x3s2(x), atol=0, rtol=0)
    assert_2x(pool.avg_pool_2x2_ceil(x), reference.avg_pool_2x2_ceil(x), reference.avg_pool_2x2_ceil(x.double()))
    fc_w, fc_b = randn(classes, c, dtype=dtype, scale=c ** -0.5), randn(classes)
    assert_2x(pool.avg_pool_fc(x, fc_w, fc_b), reference.avg_pool_fc(x, fc_w, fc_b),
              reference.avg_pool_fc(x.double(), fc_w.double(), fc_b.double()))
