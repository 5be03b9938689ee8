"""The eval conv op, conv + bias (+ residual) (+ ReLU), on every backend.

The Triton kernel (resnet_fast.ops.triton.conv) is checked directly in every mode it has
(gemm, implicit, stem) and every epilogue branch against eager PyTorch and a float64 reference under
the 2x rule;
conv_bn_act, the op a ResNet block calls, is checked on each backend with proof of the
implementation that ran. Without CUDA the kernels run under TRITON_INTERPRET=1 (set by conftest)
on CPU tensors, so shapes stay tiny; bf16 numerics are checked on a GPU only (the interpreter's
bf16 tl.dot is broken, so the kernel upcasts there).
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import resnet_fast
from _backends import (BACKENDS, DEVICE, KERNEL_DTYPES, launched, launches, rand_nhwc, require_triton_here,
                       skip_unless_usable)
from _numerics import assert_2x, fp32_precision
from resnet_fast.ops import dispatch, reference
from resnet_fast.ops.conv_bn import conv_bn_act

require_triton_here()
from resnet_fast.ops.triton import conv as triton_conv  # noqa: E402
from resnet_fast.ops.triton.tuner import Candidate  # noqa: E402

ON_CPU = DEVICE.type == "cpu"
DTYPES = KERNEL_DTYPES
CL = torch.channels_last
rand = rand_nhwc


@pytest.fixture(autouse=True)
def ieee_fp32_convs():
    # fp32 cases compare IEEE fp32 kernels with IEEE fp32 eager (cuDNN would
    # pick TF32 for some shapes only); TF32 has its own GPU test.
    with fp32_precision("ieee", "ieee"):
        yield


eager_conv = reference.conv_bias_act  # eager PyTorch in x's dtype: conv, add, ReLU, each rounded


def reference_conv(x, w, b, r, stride, padding, dilation, relu):
    return reference.conv_bias_act(x.double(), w.double(), b.double(), None if r is None else r.double(),
                                   stride, padding, dilation, relu)


# --- conv ---------------------------------------------------------------------------

# name: (N, Cin, Cout, H, W, kernel, stride, padding, dilation, expected kernel variant)
SHAPES = {
    "stem_7x7s2": (1, 3, 20, 9, 9, 7, 2, 3, 1, "stem"),
    "3x3s1": (2, 20, 24, 7, 9, 3, 1, 1, 1, "implicit"),
    "3x3s2": (2, 17, 40, 9, 7, 3, 2, 1, 1, "implicit"),
    "1x1s1": (2, 33, 40, 5, 7, 1, 1, 0, 1, "gemm"),
    "1x1s2": (2, 24, 20, 9, 9, 1, 2, 0, 1, "implicit"),
    "resnetd_stem_3to32_s2": (1, 3, 32, 9, 9, 3, 2, 1, 1, "stem"),
    "resnetd_stem_32to32": (1, 32, 32, 5, 5, 3, 1, 1, 1, "implicit"),
    "resnetd_stem_32to64": (1, 32, 64, 5, 5, 3, 1, 1, 1, "implicit"),
    "3x3_dilation2": (2, 20, 24, 9, 9, 3, 1, 2, 2, "implicit"),
    "3x3_dilation2_cin5": (1, 5, 24, 9, 7, 3, 1, 2, 2, "stem"),
    # the packed stem's other geometries: s2d with 2*2*4 = 16 channels exactly, s2d by 3, channels
    # padded only (2*2*5 > 16), padding wider than the stride
    "stem_5x5s2_cin4": (1, 4, 16, 11, 9, 5, 2, 2, 1, "stem"),
    "stem_3x3s3_cin1": (2, 1, 16, 10, 11, 3, 3, 1, 1, "stem"),
    "stem_3x3s2_cin5": (1, 5, 24, 9, 7, 3, 2, 1, 1, "stem"),
    "stem_7x7s2_pad5": (1, 3, 16, 8, 8, 7, 2, 5, 1, "stem"),
    # Cin, Cout > 64: several K blocks per tap and several N tiles (the CPU config is 32x64x64).
    "3x3s1_wide": (1, 72, 80, 5, 5, 3, 1, 1, 1, "implicit"),
    "1x1s1_wide": (1, 136, 72, 3, 5, 1, 1, 0, 1, "gemm"),
}
# Each shape gets one epilogue; "3x3s1" gets all four below.
EPILOGUES = [(True, True), (False, True), (True, False), (False, False)]


def run_conv_case(shape, dtype, residual, relu, x_cl=True, w_cl=True, rule_dtype=None):
    n, cin, cout, h, w, k, s, p, d, mode = SHAPES[shape]
    x = rand(n, cin, h, w, dtype=dtype, cl=x_cl)
    weight = rand(cout, cin, k, k, dtype=dtype, scale=(cin * k * k) ** -0.5, cl=w_cl)
    bias = rand(cout) if w_cl else rand(2 * cout)[::2]  # a strided bias with the strided weight
    ho = (h + 2 * p - d * (k - 1) - 1) // s + 1
    wo = (w + 2 * p - d * (k - 1) - 1) // s + 1
    r = rand(n, cout, ho, wo, dtype=dtype) if residual else None
    if not x_cl and mode == "gemm":
        mode = "implicit"  # the GEMM path needs dense NHWC rows
    with launched(f"conv_bias_act.{mode}"):
        out = triton_conv.conv_bias_act(x, weight, bias, r, s, p, d, relu)
    assert out.is_contiguous(memory_format=CL)
    args = (x, weight, bias, r, (s, s), (p, p), (d, d), relu)
    assert_2x(out, eager_conv(*args), reference_conv(*args), rule_dtype or dtype)
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_conv_matches_eager(shape, dtype):
    residual, relu = EPILOGUES[list(SHAPES).index(shape) % len(EPILOGUES)]
    run_conv_case(shape, dtype, residual, relu)


@pytest.mark.parametrize("residual,relu", EPILOGUES)
def test_conv_epilogues(residual, relu):
    run_conv_case("3x3s1", torch.float16, residual, relu)


@pytest.mark.parametrize("shape", ["3x3s2", "1x1s1"])
def test_conv_reads_strides_of_nchw_inputs(shape):
    # Plain NCHW x, OIHW weight, strided bias: no copies, the kernel follows the strides.
    run_conv_case(shape, torch.float32, True, True, x_cl=False, w_cl=False)


@pytest.mark.gpu
def test_conv_fp32_uses_tf32_when_cudnn_does():
    with fp32_precision("tf32", "ieee"):
        torch.manual_seed(1)
        # TF32 rounds the operands to fp16's 10-bit mantissa: fp16's floor.
        tf32 = run_conv_case("3x3s1", torch.float32, True, True, rule_dtype=torch.float16)
    torch.manual_seed(1)
    ieee = run_conv_case("3x3s1", torch.float32, True, True)
    assert not torch.equal(tf32, ieee), "TF32 setting had no effect"


@pytest.mark.skipif(not ON_CPU, reason="interpreter-only code path")
def test_conv_bf16_under_interpreter():
    # The interpreter's bf16 tl.dot is broken, so the kernel upcasts there;
    # this checks that path only. Real bf16 numerics are the gpu-marked cases.
    run_conv_case("3x3s1", torch.bfloat16, True, True)


# --- the packed stem -----------------------------------------------------------------------

@pytest.mark.parametrize("cin,k,stride,padding,dilation,factor,kernel", [
    (3, 7, 2, 3, 1, 2, (4, 4)),  # the ResNet stem: a 4x4/1 conv over 12 (+4 zero) channels
    (3, 3, 2, 1, 1, 2, (2, 2)),  # ResNet-D's 3->32 stem
    (4, 5, 2, 2, 1, 2, (3, 3)),  # 2*2*4 = 16 channels exactly
    (1, 3, 3, 1, 1, 3, (2, 2)),
    (5, 3, 2, 1, 1, 1, (3, 3)),  # 2*2*5 > 16: channels padded only
    (3, 3, 1, 1, 1, 1, (3, 3)),
    (3, 3, 2, 2, 2, 1, (3, 3)),  # dilated
])
def test_stem_plan(cin, k, stride, padding, dilation, factor, kernel):
    plan = triton_conv._stem_plan(cin, k, k, (stride, stride), (padding, padding), (dilation, dilation))
    assert (plan.factor, plan.kernel) == (factor, kernel)
    assert plan.stride == ((1, 1) if factor > 1 else (stride, stride))


def test_stem_packing_preserves_the_conv():
    """For every small-Cin geometry: conv(pack(x), pack(w)) == conv(x, w), exactly, in float64
    (the packing kernel runs; the convs are torch's)."""
    import itertools
    geometries = [(*g, 1) for g in itertools.product((1, 3, 5), (3, 7), (1, 2, 3), (1, 4))] + [
        (3, 1, 2, 0, 1), (4, 5, 2, 2, 1), (4, 4, 2, 0, 1), (1, 5, 3, 0, 1), (2, 3, 1, 2, 2), (3, 3, 2, 2, 2)]
    for cin, k, s, p, d in geometries:
        x = rand(2, cin, 9, 10, dtype=torch.float64, cl=cin % 2 == 1)  # NCHW and channels_last inputs
        w = rand(3, cin, k, k, dtype=torch.float64)
        want = F.conv2d(x, w, None, s, p, d)
        plan = triton_conv._stem_plan(cin, k, k, (s, s), (p, p), (d, d))
        packed = triton_conv._pack_stem_input(x, plan, *want.shape[2:])  # torch.empty until the kernel writes
        got = F.conv2d(packed, triton_conv._pack_stem_weight(w, plan), None, plan.stride, 0, plan.dilation)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12, msg=f"cin={cin} k={k} s={s} p={p} d={d}")


def test_stem_weight_is_packed_once_per_weight_version():
    w = rand(8, 3, 7, 7)
    plan = triton_conv._stem_plan(3, 7, 7, (2, 2), (3, 3), (1, 1))
    first = triton_conv._stem_weight(w, plan)
    assert triton_conv._stem_weight(w, plan) is first
    with torch.no_grad():
        w.mul_(2)  # an in-place edit bumps the version: packed again
    again = triton_conv._stem_weight(w, plan)
    assert again is not first and torch.equal(again, triton_conv._pack_stem_weight(w, plan))
    with torch.inference_mode():
        frozen = rand(8, 3, 7, 7)  # no version counter: packed every call, never cached
    assert torch.equal(triton_conv._stem_weight(frozen, plan), triton_conv._pack_stem_weight(frozen, plan))


def test_stem_weight_is_packed_with_the_fold(monkeypatch):
    """conv_bn_eval under inference_mode (folded weights without a version counter): one packing per fold."""
    packs = []
    real = triton_conv._pack_stem_weight
    conv = nn.Conv2d(3, 8, 7, 2, 3, bias=False).eval().to(DEVICE)
    bn = nn.BatchNorm2d(8).eval().to(DEVICE)
    x = rand(1, 3, 9, 9)
    with torch.inference_mode():
        first = triton_conv.conv_bn_eval(x, conv, bn, None, True)  # folds, packs, tunes (the trials pack their own)
        monkeypatch.setattr(triton_conv, "_pack_stem_weight", lambda w, plan: packs.append(1) or real(w, plan))
        for _ in range(3):
            with launched("conv_bias_act.stem"), launched("conv_stem_pack"):
                out = triton_conv.conv_bn_eval(x, conv, bn, None, True)
    assert not packs and torch.equal(out, first)
    with torch.no_grad():
        bn.running_var.mul_(2)  # a new fold, packed again
    with torch.inference_mode():
        again = triton_conv.conv_bn_eval(x, conv, bn, None, True)
    assert len(packs) == 1 and not torch.equal(out, again)
    torch.testing.assert_close(again, F.relu(bn(conv(x))), atol=1e-5, rtol=1e-5)


# --- the epilogue's branches ----------------------------------------------------------------

WIDE_TILE = Candidate.make("conv", 4, 1, BLOCK_M=32, BLOCK_N=128, BLOCK_K=32, GROUP_M=4)


@pytest.fixture
def wide_tile_launches(monkeypatch):
    """The conv kernel, recording each launch's keyword arguments (the constexprs)."""
    kernel = triton_conv._conv_bias_act_fwd_kernel
    calls = []

    class Recorder:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                calls.append(kwargs)
                return kernel[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(triton_conv, "_conv_bias_act_fwd_kernel", Recorder())
    return calls


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("residual_layout", ["channels_last", "nchw", None])
def test_conv_wide_tile_epilogue(wide_tile_launches, k, residual_layout):
    """A 32x128 tile: the epilogue adds a residual one half of the columns at a time. Cout 136: two N
    tiles of 128, the second mostly masked, in both halves."""
    x = rand(2, 24, 5, 6)
    w, b = rand(136, 24, k, k, scale=(24 * k * k) ** -0.5), rand(136)
    r = rand(2, 136, 5, 6, cl=residual_layout == "channels_last") if residual_layout else None
    args = (x, w, b, r, (1, 1), (k // 2, k // 2), (1, 1), True)
    out = triton_conv.conv_bias_act_fwd(*args, candidate=WIDE_TILE)
    (launch,) = wide_tile_launches
    assert (launch["BLOCK_N"], launch["MODE"]) == (128, 0 if k == 1 else 1)
    assert launch["RES_ROWS"] is (residual_layout == "channels_last")
    assert_2x(out, eager_conv(*args), reference_conv(*args), torch.float32)


def test_conv_empty_batch():
    x = rand(0, 8, 5, 5)
    w = rand(16, 8, 3, 3)
    before = launches()
    out = triton_conv.conv_bias_act(x, w, rand(16), None, 2, 1)
    assert out.shape == (0, 16, 3, 3) and out.is_contiguous(memory_format=CL)
    assert launches() == before


def _bad(**change):
    args = dict(x=rand(1, 4, 5, 5), weight=rand(6, 4, 3, 3), bias=rand(6), residual=None,
                stride=1, padding=1, dilation=1)
    args.update(change)
    return args


@pytest.mark.parametrize("args,match", [
    (_bad(x=rand(4, 5, 5)), "x must be a 4-D"),
    (_bad(x=rand(1, 4, 5, 5).to(torch.float64)), "x must be float32, float16 or bfloat16"),
    (_bad(weight=rand(6, 4, 3, 3, dtype=torch.float16)), "weight dtype"),
    (_bad(weight=rand(6, 2, 3, 3)), "groups=1"),
    (_bad(bias=rand(5)), "bias must be a 1-D tensor of Cout=6"),
    (_bad(bias=rand(6, dtype=torch.float16)), "bias .* must be float32"),
    (_bad(residual=rand(1, 6, 4, 4)), "residual must match the output"),
    (_bad(residual=rand(1, 6, 5, 5, dtype=torch.float16)), "residual must match the output"),
    (_bad(stride=0), "stride must be two ints >= 1"),
    (_bad(padding=(1, 1, 1)), "padding must be an int or a pair"),
    (_bad(x=rand(1, 4, 2, 2), padding=0), "too small"),
])
def test_conv_rejects_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        triton_conv.conv_bias_act(**args)


def test_conv_autograd_matches_eager():
    x = rand(2, 6, 5, 5).requires_grad_()
    w = rand(8, 6, 3, 3, scale=0.3).requires_grad_()
    b = rand(8).requires_grad_()
    r = rand(2, 8, 3, 3).requires_grad_()
    with launched("conv_bias_act.stem"):
        out = triton_conv.conv_bias_act(x, w, b, r, 2, 1, relu=True)
    grad = rand(*out.shape)
    ours = torch.autograd.grad(out, (x, w, b, r), grad)
    ref = F.relu(F.conv2d(x, w, b, 2, 1) + r)
    theirs = torch.autograd.grad(ref, (x, w, b, r), grad)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    for a, e in zip(ours, theirs):
        torch.testing.assert_close(a, e, atol=1e-4, rtol=1e-4)


def test_conv_opcheck():
    op = torch.ops.resnet_fast.triton_conv_bias_act.default
    x = rand(1, 5, 5, 4).requires_grad_()
    w = rand(8, 5, 3, 3, scale=0.3).requires_grad_()
    b = rand(8).requires_grad_()
    r = rand(1, 8, 5, 4).requires_grad_()
    before = launches()
    torch.library.opcheck(op, (x, w, b, r, [1, 1], [1, 1], [1, 1], True))
    torch.library.opcheck(op, (x.detach(), w.detach(), b.detach(), None, [2, 2], [0, 0], [1, 1], False))
    assert launches() > before  # opcheck ran the real kernel


def test_conv_fake_output_is_channels_last():
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        out = triton_conv.conv_bias_act(torch.empty(2, 16, 9, 9).to(memory_format=CL),
                                        torch.empty(32, 16, 3, 3), torch.empty(32), None, 2, 1)
    assert out.shape == (2, 32, 5, 5)
    assert out.stride() == torch.empty(2, 32, 5, 5, memory_format=CL).stride()


def _compile_and_check(backend):
    def block(x, w1, b1, w2, b2):
        y = triton_conv.conv_bias_act(x, w1, b1, None, 1, 1, relu=True)
        return triton_conv.conv_bias_act(y, w2, b2, x, 1, 0, relu=True)

    args = (rand(1, 16, 5, 5), rand(24, 16, 3, 3, scale=0.1), rand(24), rand(16, 24, 1, 1, scale=0.2), rand(16))
    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True, backend=backend)
    before = launches()
    out = compiled(*args)
    assert launches() - before == 2
    torch.testing.assert_close(out, block(*args), atol=0, rtol=0)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_conv_torch_compile_fullgraph(backend):
    # The op is opaque to inductor, so this works on CPU (interpreter) too.
    _compile_and_check(backend)


def test_tf32_follows_torch_settings():
    from resnet_fast.ops.triton._common import fp32_allows_tf32
    for conv in ("ieee", "tf32"):
        for matmul in ("ieee", "tf32"):
            with fp32_precision(conv, matmul):
                assert fp32_allows_tf32("conv") is (conv == "tf32")
                assert fp32_allows_tf32("matmul") is (matmul == "tf32")


# --- conv_bn_act: the eval op a block calls, on every backend ---------------------------

def _conv_bn(cin, cout, groups=1, dtype=torch.float32):
    conv = nn.Conv2d(cin, cout, 3, 1, 1, groups=groups, bias=False)
    bn = nn.BatchNorm2d(cout)
    with torch.no_grad():
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    return conv.eval().to(DEVICE, dtype), bn.eval().to(DEVICE, dtype)


def _expected_impl(backend, grouped):
    if grouped and backend in ("triton", "auto"):  # no Triton grouped conv: cuDNN + the ext epilogue
        return "ext" if resnet_fast.ops.ext.available(DEVICE) else ("onednn" if ON_CPU else "torch")
    if backend in ("torch", "auto"):
        return "onednn" if ON_CPU else ("triton" if backend == "auto" else "torch")
    return backend


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("groups", [1, 4])
def test_conv_bn_act_eval_on_each_backend(backend, groups):
    skip_unless_usable(backend)
    torch.manual_seed(groups)
    conv, bn = _conv_bn(8, 16, groups)
    x, r = rand(2, 8, 6, 5), rand(2, 16, 6, 5)
    op = "grouped_conv_bias_act" if groups > 1 else "conv_bias_act"
    impl = _expected_impl(backend, groups > 1)
    before, kernels = dispatch.CALLS[(op, impl)], launches()
    with torch.no_grad(), resnet_fast.use_backend(backend):
        out = conv_bn_act(x, conv, bn, r, relu=True)
    assert dispatch.CALLS[(op, impl)] == before + 1
    assert (launches() > kernels) == (impl == "triton")
    assert out.is_contiguous(memory_format=CL)
    eager = F.relu(bn(conv(x)) + r)
    ref = F.relu(F.batch_norm(F.conv2d(x.double(), conv.weight.double(), None, 1, 1, 1, groups),
                              bn.running_mean.double(), bn.running_var.double(), bn.weight.double(),
                              bn.bias.double(), False, 0.0, bn.eps) + r.double())
    assert_2x(out, eager, ref)


@pytest.mark.parametrize("backend", BACKENDS)
def test_conv_bn_act_eval_is_differentiable(backend):
    """With autograd on (frozen-BN fine-tuning) the fold follows the parameters: Triton's op has a
    backward, every other backend runs the torch composite."""
    skip_unless_usable(backend)
    torch.manual_seed(3)
    conv, bn = _conv_bn(6, 8)
    x = rand(2, 6, 5, 5).requires_grad_()
    kernels = launches()
    with resnet_fast.use_backend(backend):
        out = conv_bn_act(x, conv, bn, relu=True)
    assert (launches() > kernels) == (backend == "triton")
    grad = rand(*out.shape)
    ours = torch.autograd.grad(out, (x, conv.weight, bn.weight), grad)
    eager = F.relu(bn(conv(x)))
    theirs = torch.autograd.grad(eager, (x, conv.weight, bn.weight), grad)
    for a, e in zip(ours, theirs):
        torch.testing.assert_close(a, e, atol=1e-4, rtol=1e-4)


def test_conv_bn_act_triton_refuses_float64():
    conv, bn = _conv_bn(4, 4, dtype=torch.float64)
    with pytest.raises(TypeError, match="backend 'triton' runs conv_bias_act in float16, bfloat16 or float32"):
        with torch.no_grad(), resnet_fast.use_backend("triton"):
            conv_bn_act(rand(1, 4, 3, 3, dtype=torch.float64), conv, bn)
