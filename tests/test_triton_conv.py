"""Triton fused conv + pooling kernels vs eager PyTorch and an fp64 reference.

Without CUDA the kernels run under TRITON_INTERPRET=1 (set by conftest) on CPU
tensors, so shapes stay tiny. With CUDA the same parity tests run on the GPU,
bf16 included. Every test that runs a kernel checks triton_conv.LAUNCHES to
prove the Triton kernel (and the expected variant of it) actually ran.
"""
import contextlib

import pytest
import torch
import torch.nn.functional as F
import triton

from resnet_fast.ops import triton_conv, triton_pool

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ON_CPU = DEVICE == "cpu"
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16"),
          pytest.param(torch.bfloat16, id="bf16", marks=pytest.mark.gpu)]
CL = torch.channels_last


@contextlib.contextmanager
def conv_fp32_precision(setting):
    """Set cuDNN's fp32 conv precision ("ieee" or "tf32") for the block."""
    conv = getattr(torch.backends.cudnn, "conv", None)
    if conv is not None and hasattr(conv, "fp32_precision"):
        old, conv.fp32_precision = conv.fp32_precision, setting
        try:
            yield
        finally:
            conv.fp32_precision = old
    else:
        old, torch.backends.cudnn.allow_tf32 = torch.backends.cudnn.allow_tf32, setting == "tf32"
        try:
            yield
        finally:
            torch.backends.cudnn.allow_tf32 = old


@pytest.fixture(autouse=True)
def ieee_fp32_convs():
    # fp32 cases compare IEEE fp32 kernels with IEEE fp32 eager (cuDNN would
    # pick TF32 for some shapes only); TF32 has its own GPU test.
    with conv_fp32_precision("ieee"):
        yield


@contextlib.contextmanager
def launched(key, times=1):
    """Assert the block launched Triton kernel `key` exactly `times` times."""
    before = triton_conv.LAUNCHES[key]
    yield
    assert triton_conv.LAUNCHES[key] - before == times, f"expected {times} launch(es) of {key}"


def rand(*shape, dtype=torch.float32, scale=1.0, cl=True):
    t = (torch.randn(*shape, dtype=torch.float64) * scale).to(device=DEVICE, dtype=dtype)
    return t.contiguous(memory_format=CL) if cl and t.dim() == 4 else t


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


def assert_close_to_reference(out, eager, ref, eps=None):
    """Our error vs the fp64 reference <= 2x eager PyTorch's own error in this
    precision, plus one ulp (eps: of another format) at the output's magnitude."""
    assert out.shape == ref.shape and out.dtype == eager.dtype
    floor = (eps or torch.finfo(out.dtype).eps) * max(1.0, ref.abs().max().item())
    ours, theirs = max_err(out, ref), max_err(eager, ref)
    assert ours <= 2 * theirs + floor, f"error {ours:.3g} vs eager {theirs:.3g} (floor {floor:.3g})"


# --- conv ---------------------------------------------------------------------------

def eager_conv(x, w, b, r, stride, padding, dilation, relu):
    """Eager PyTorch in x's dtype (conv, then add and ReLU, each rounded)."""
    try:
        y = F.conv2d(x, w, b.to(x.dtype), stride, padding, dilation)
    except (RuntimeError, NotImplementedError):
        # Older CPU builds lack half convs: compute in fp32 and round once,
        # which is what a GPU half conv with fp32 accumulation does.
        y = F.conv2d(x.float(), w.float(), b, stride, padding, dilation).to(x.dtype)
    if r is not None:
        y = y + r
    return F.relu(y) if relu else y


def reference_conv(x, w, b, r, stride, padding, dilation, relu):
    y = F.conv2d(x.double(), w.double(), b.double(), stride, padding, dilation)
    if r is not None:
        y = y + r.double()
    return F.relu(y) if relu else y


# name: (N, Cin, Cout, H, W, kernel, stride, padding, dilation, expected kernel variant)
SHAPES = {
    "stem_7x7s2": (1, 3, 20, 9, 9, 7, 2, 3, 1, "flat"),
    "3x3s1": (2, 20, 24, 7, 9, 3, 1, 1, 1, "implicit"),
    "3x3s2": (2, 17, 40, 9, 7, 3, 2, 1, 1, "implicit"),
    "1x1s1": (2, 33, 40, 5, 7, 1, 1, 0, 1, "gemm"),
    "1x1s2": (2, 24, 20, 9, 9, 1, 2, 0, 1, "implicit"),
    "resnetd_stem_3to32_s2": (1, 3, 32, 9, 9, 3, 2, 1, 1, "flat"),
    "resnetd_stem_32to32": (1, 32, 32, 5, 5, 3, 1, 1, 1, "implicit"),
    "resnetd_stem_32to64": (1, 32, 64, 5, 5, 3, 1, 1, 1, "implicit"),
    "3x3_dilation2": (2, 20, 24, 9, 9, 3, 1, 2, 2, "implicit"),
    "3x3_dilation2_cin5": (1, 5, 24, 9, 7, 3, 1, 2, 2, "flat"),
    # Cin, Cout > 64: several K blocks per tap and several N tiles (the CPU config is 32x64x64).
    "3x3s1_wide": (1, 72, 80, 5, 5, 3, 1, 1, 1, "implicit"),
    "1x1s1_wide": (1, 136, 72, 3, 5, 1, 1, 0, 1, "gemm"),
}
# Each shape gets one epilogue; "3x3s1" gets all four below.
EPILOGUES = [(True, True), (False, True), (True, False), (False, False)]


def run_conv_case(shape, dtype, residual, relu, x_cl=True, w_cl=True, eps=None):
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
    assert_close_to_reference(out, eager_conv(*args), reference_conv(*args), eps)
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
    with conv_fp32_precision("tf32"):
        torch.manual_seed(1)
        tf32 = run_conv_case("3x3s1", torch.float32, True, True, eps=2.0 ** -10)
    torch.manual_seed(1)
    ieee = run_conv_case("3x3s1", torch.float32, True, True)
    assert not torch.equal(tf32, ieee), "TF32 setting had no effect"


@pytest.mark.skipif(not ON_CPU, reason="interpreter-only code path")
def test_conv_bf16_under_interpreter():
    # The interpreter's bf16 tl.dot is broken, so the kernel upcasts there;
    # this checks that path only. Real bf16 numerics are the gpu-marked cases.
    run_conv_case("3x3s1", torch.bfloat16, True, True)


def test_conv_empty_batch():
    x = rand(0, 8, 5, 5)
    w = rand(16, 8, 3, 3)
    before = sum(triton_conv.LAUNCHES.values())
    out = triton_conv.conv_bias_act(x, w, rand(16), None, 2, 1)
    assert out.shape == (0, 16, 3, 3) and out.is_contiguous(memory_format=CL)
    assert sum(triton_conv.LAUNCHES.values()) == before


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
    with launched("conv_bias_act.flat"):
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
    before = triton_conv.LAUNCHES["conv_bias_act.flat"]
    torch.library.opcheck(op, (x, w, b, r, [1, 1], [1, 1], [1, 1], True))
    torch.library.opcheck(op, (x.detach(), w.detach(), b.detach(), None, [2, 2], [0, 0], [1, 1], False))
    assert triton_conv.LAUNCHES["conv_bias_act.flat"] > before  # opcheck ran the real kernel


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
    before = sum(triton_conv.LAUNCHES.values())
    out = compiled(*args)
    assert sum(triton_conv.LAUNCHES.values()) - before == 2
    torch.testing.assert_close(out, block(*args), atol=0, rtol=0)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_conv_torch_compile_fullgraph(backend):
    # The op is opaque to inductor, so this works on CPU (interpreter) too.
    _compile_and_check(backend)


def test_tf32_follows_torch_settings():
    for setting in ("ieee", "tf32"):
        with conv_fp32_precision(setting):
            assert triton_conv._fp32_allows_tf32("conv") is (setting == "tf32")
    matmul = torch.backends.cuda.matmul
    attr = "fp32_precision" if hasattr(matmul, "fp32_precision") else "allow_tf32"
    old = getattr(matmul, attr)
    try:
        for tf32 in (False, True):
            setattr(matmul, attr, ("tf32" if tf32 else "ieee") if attr == "fp32_precision" else tf32)
            assert triton_conv._fp32_allows_tf32("matmul") is tf32
    finally:
        setattr(matmul, attr, old)


def test_prune_keeps_hopper_configs_off_ampere(monkeypatch):
    args = dict(M=256 * 56 * 56, C_IN=256, C_OUT=512, KH=1, KW=1, MODE=0,
                x_ptr=rand(1, 1, 1, 1, dtype=torch.float16))
    configs = triton_conv._GPU_CONFIGS
    monkeypatch.setattr(triton_conv, "_device_limits", lambda device: ((9, 0), 227 * 1024))
    hopper = triton_conv._prune_configs(configs, args)
    monkeypatch.setattr(triton_conv, "_device_limits", lambda device: ((8, 6), 99 * 1024))
    ampere = triton_conv._prune_configs(configs, args)
    assert any(c is h for c in hopper for h in triton_conv._HOPPER_CONFIGS)
    assert ampere and not any(c is h for c in ampere for h in triton_conv._HOPPER_CONFIGS)
    for c in ampere:  # everything kept fits sm86's shared memory
        assert c.num_stages * (c.kwargs["BLOCK_M"] + c.kwargs["BLOCK_N"]) * c.kwargs["BLOCK_K"] * 2 <= 99 * 1024
    # A 64-channel layer gets no 128/256-wide Cout tiles.
    narrow = triton_conv._prune_configs(configs, dict(args, C_OUT=64))
    assert narrow and all(c.kwargs["BLOCK_N"] <= 64 for c in narrow)


def test_autotune_key_has_no_pointers():
    kernel = triton_conv._conv_bias_act_fwd_kernel
    assert not any(k.endswith("_ptr") for k in kernel.keys)
    assert "M_BUCKET" in kernel.keys and "M" not in kernel.keys


@pytest.mark.skipif(not ON_CPU, reason="on CUDA the real autotuner is tested below")
def test_autotuner_prunes_and_caches_per_shape_bucket(monkeypatch):
    """Drive triton's multi-config autotuner (the GPU path) around the same
    kernel with a fake timer, since the interpreter cannot time kernels."""
    benched = []

    def fake_do_bench(fn, quantiles=None, **kwargs):
        fn()
        benched.append(1)
        return [float(len(benched))] * 3 if quantiles else float(len(benched))

    configs = [triton_conv._config(32, 32, 16, 4, 4, 1), triton_conv._config(16, 32, 16, 4, 4, 1),
               triton_conv._config(256, 256, 64, 8, 8, 3)]  # too big for this problem: pruned
    tuner = triton.autotune(configs=configs, key=triton_conv._conv_bias_act_fwd_kernel.keys,
                            prune_configs_by={"early_config_prune": triton_conv._prune_configs},
                            do_bench=fake_do_bench)(triton_conv._conv_bias_act_fwd_kernel.fn)
    monkeypatch.setattr(triton_conv, "_conv_bias_act_fwd_kernel", tuner)
    monkeypatch.setattr(triton_conv, "_device_limits", lambda device: ((9, 0), 227 * 1024))
    w, b = rand(24, 20, 3, 3, scale=0.1), rand(24)

    def conv(x, weight):
        out = triton_conv.conv_bias_act(x, weight, b, None, 1, 1, relu=True)
        torch.testing.assert_close(out, F.relu(F.conv2d(x, weight, b, 1, 1)), atol=1e-4, rtol=1e-4)

    conv(rand(2, 20, 7, 9), w)  # M = 126
    assert len(tuner.cache) == 1 and len(benched) == 2
    # New tensors (new data pointers), another batch/size in the same M bucket: no re-tune.
    conv(rand(2, 20, 7, 9), w.clone())
    conv(rand(1, 20, 9, 13), w)  # M = 117
    assert len(tuner.cache) == 1 and len(benched) == 2


@pytest.mark.gpu
def test_autotune_runs_once_per_shape_bucket():
    kernel = triton_conv._conv_bias_act_fwd_kernel
    w, b = rand(64, 32, 3, 3, dtype=torch.float16, scale=0.1), rand(64)
    triton_conv.conv_bias_act(rand(4, 32, 14, 14, dtype=torch.float16), w, b, None, 1, 1)
    tuned = dict(kernel.cache)
    # New tensors (new data pointers), a batch in the same M bucket, a new weight copy:
    triton_conv.conv_bias_act(rand(3, 32, 14, 14, dtype=torch.float16), w.clone(), b.clone(), None, 1, 1)
    assert kernel.cache == tuned


# --- pooling -----------------------------------------------------------------------

POOL_SHAPES = [(2, 20, 9, 7), (1, 40, 1, 1), (1, 3, 2, 3), (2, 33, 8, 8)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", POOL_SHAPES)
def test_max_pool_3x3s2(shape, dtype):
    x = rand(*shape, dtype=dtype)
    with launched("max_pool_3x3s2"):
        out = triton_pool.max_pool_3x3s2(x)
    assert out.is_contiguous(memory_format=CL)
    torch.testing.assert_close(out, F.max_pool2d(x, 3, 2, 1), atol=0, rtol=0)  # a max is exact


def test_max_pool_propagates_nan():
    x = rand(1, 4, 5, 5)
    x[0, 1, 2, 2] = float("nan")
    torch.testing.assert_close(triton_pool.max_pool_3x3s2(x), F.max_pool2d(x, 3, 2, 1), equal_nan=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", POOL_SHAPES)
def test_avg_pool_2x2_ceil(shape, dtype):
    x = rand(*shape, dtype=dtype)
    with launched("avg_pool_2x2_ceil"):
        out = triton_pool.avg_pool_2x2_ceil(x)
    assert out.is_contiguous(memory_format=CL)
    kw = dict(kernel_size=2, stride=2, ceil_mode=True, count_include_pad=False)
    assert_close_to_reference(out, F.avg_pool2d(x, **kw), F.avg_pool2d(x.double(), **kw))


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
    ref = F.linear(x.double().mean((2, 3)), w.double(), b.double())
    assert_close_to_reference(out, eager, ref)


def test_resnetd_shortcut_pool_then_1x1():
    # avg_pool_2x2_ceil feeds the 1x1 conv's GEMM path directly (dense NHWC).
    x = rand(2, 24, 9, 7, dtype=torch.float16)
    w = rand(40, 24, 1, 1, dtype=torch.float16, scale=24 ** -0.5)
    b = rand(40)
    with launched("avg_pool_2x2_ceil"), launched("conv_bias_act.gemm"):
        out = triton_conv.conv_bias_act(triton_pool.avg_pool_2x2_ceil(x), w, b)
    pool = dict(kernel_size=2, stride=2, ceil_mode=True, count_include_pad=False)
    eager = eager_conv(F.avg_pool2d(x, **pool), w, b, None, 1, 0, 1, False)
    ref = reference_conv(F.avg_pool2d(x.double(), **pool), w, b, None, 1, 0, 1, False)
    assert_close_to_reference(out, eager, ref)


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
    keys = ("max_pool_3x3s2", "avg_pool_2x2_ceil", "global_avg_pool")
    before = [triton_conv.LAUNCHES[k] for k in keys]
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
    assert all(triton_conv.LAUNCHES[k] > n for k, n in zip(keys, before))


def test_pools_torch_compile_fullgraph():
    def head(x, w, b):
        return triton_pool.avg_pool_fc(triton_pool.max_pool_3x3s2(x), w, b)

    args = (rand(2, 8, 7, 7), rand(5, 8), rand(5))
    torch._dynamo.reset()
    compiled = torch.compile(head, fullgraph=True, backend="aot_eager" if ON_CPU else "inductor")
    with launched("max_pool_3x3s2"), launched("global_avg_pool"):
        out = compiled(*args)
    torch.testing.assert_close(out, head(*args), atol=0, rtol=0)
