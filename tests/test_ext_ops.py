"""The C++/CUDA ops in torch.ops.resnet_fast (csrc/): opcheck, parity with eager
PyTorch and an fp64 reference, gradcheck, layouts, out=/in-place forms, errors.

Each parity test runs under a dispatch spy that proves the C++ op was called.
Without resnet_fast._C these tests skip, unless RESNET_FAST_REQUIRE_EXT=1 (CI
builds the extension and sets it), where they fail.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from resnet_fast.ops import _ext

OK, WHY = _ext.status()
if not OK:
    if os.environ.get("RESNET_FAST_REQUIRE_EXT") == "1":
        raise RuntimeError(f"RESNET_FAST_REQUIRE_EXT=1 but resnet_fast._C is unavailable: {WHY}")
    pytest.skip(f"resnet_fast._C unavailable: {WHY}", allow_module_level=True)

ops = torch.ops.resnet_fast
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
FORMATS = [torch.contiguous_format, torch.channels_last]
# Absolute floors for the 2x rule, by dtype (relative to the reference's magnitude).
FLOOR = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2, torch.float64: 1e-10}


class Spy(TorchDispatchMode):
    """Records every op dispatched inside the block."""

    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))

    def count(self, op: str) -> int:
        return self.names.count(f"resnet_fast.{op}")


def rand(shape, dtype=torch.float32, fmt=torch.contiguous_format, device="cpu", requires_grad=False):
    t = torch.randn(shape, device=device).to(dtype=dtype, memory_format=fmt)
    return t.requires_grad_(requires_grad)


def assert_2x(ours, eager, ref, dtype, what):
    """ours' error vs the fp64 reference <= 2x eager's own error in `dtype` + a floor."""
    ref = ref.double()
    floor = FLOOR[dtype] * max(1.0, ref.abs().max().item())
    err = (ours.double() - ref).abs().max().item()
    eager_err = (eager.double() - ref).abs().max().item()
    assert err <= 2 * eager_err + floor, f"{what}: error {err:.3g} > 2 x eager {eager_err:.3g} + {floor:.3g}"


# ---- reference: eager F.batch_norm (+ add) (+ relu) -----------------------------

def eager_bn_act(x, w, b, r, rm, rv, momentum, eps, relu):
    y = F.batch_norm(x, rm, rv, w, b, True, momentum, eps)
    if r is not None:
        y = y + r
    return F.relu(y) if relu else y


def run_bn_act(x, w, b, r, rm, rv, momentum, eps, relu):
    out, mean, var = ops.bn_act_fwd(x, w, b, r, eps, relu)
    count = x.numel() // x.shape[1]
    with torch.no_grad():
        ops.bn_update_stats_(rm, rv, mean, var, momentum, count)
    return out


def bn_case(dtype, fmt, residual, device="cpu", shape=(4, 6, 5, 7), affine=True):
    x = rand(shape, dtype, fmt, device) * 2 + 0.5
    pdt = torch.float64 if dtype == torch.float64 else torch.float32  # params stay fp32 under AMP
    w = (torch.rand(shape[1], device=device, dtype=pdt) + 0.5) if affine else None
    b = torch.randn(shape[1], device=device, dtype=pdt) if affine else None
    r = rand(shape, dtype, fmt, device) if residual else None
    return x, w, b, r


def grads_of(fn, inputs, grad):
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in inputs]
    out = fn(*leaves)
    wanted = [t for t in leaves if t is not None]
    return out, torch.autograd.grad(out, wanted, grad)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("residual,relu", [(True, True), (False, True), (False, False)])
def test_bn_act_parity(dtype, fmt, residual, relu, device="cpu"):
    torch.manual_seed(0)
    x, w, b, r = bn_case(dtype, fmt, residual, device)
    C = x.shape[1]
    stats = {k: (torch.zeros(C, device=device), torch.ones(C, device=device)) for k in ("ours", "eager", "ref")}
    grad = rand(x.shape, dtype, fmt, device)

    def ours(x, w, b, r):
        return run_bn_act(x, w, b, r, *stats["ours"], 0.1, 1e-5, relu)

    with Spy() as spy:
        out, g = grads_of(ours, (x, w, b, r), grad)
    assert spy.count("bn_act_fwd") == 1 and spy.count("bn_act_bwd") == 1
    assert spy.count("bn_update_stats_") == 1
    assert out.dtype == dtype and out.is_contiguous(memory_format=fmt)

    eager_out, eager_g = grads_of(
        lambda x, w, b, r: eager_bn_act(x, w, b, r, *stats["eager"], 0.1, 1e-5, relu), (x, w, b, r), grad)
    d = [t.double() if t is not None else None for t in (x, w, b, r)]
    ref_out, ref_g = grads_of(
        lambda x, w, b, r: eager_bn_act(x, w, b, r, *(s.double() for s in stats["ref"]), 0.1, 1e-5, relu),
        d, grad.double())
    assert_2x(out, eager_out, ref_out, dtype, "out")
    for name, a, e, ref in zip(("grad_x", "grad_w", "grad_b", "grad_r"), g, eager_g, ref_g):
        assert a.dtype == e.dtype and a.shape == e.shape, name
        assert_2x(a, e, ref, dtype, name)
    # Running stats: fp32 buffers updated from the batch statistics, exactly like torch.
    for i, name in enumerate(("running_mean", "running_var")):
        torch.testing.assert_close(stats["ours"][i], stats["eager"][i], atol=FLOOR[dtype], rtol=FLOOR[dtype],
                                   msg=name)


def test_bn_act_affine_false_and_momentum_none_update():
    torch.manual_seed(1)
    x, _, _, _ = bn_case(torch.float32, torch.contiguous_format, False, affine=False)
    rm, rv = torch.randn(6), torch.rand(6) + 0.5
    erm, erv = rm.clone(), rv.clone()
    for step in range(1, 4):  # momentum=None: cumulative average, factor 1 / num_batches_tracked
        out = run_bn_act(x + step, None, None, None, rm, rv, 1.0 / step, 1e-3, True)
        ref = eager_bn_act(x + step, None, None, None, erm, erv, 1.0 / step, 1e-3, True)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rm, erm, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(rv, erv, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("running_dtype", [torch.float16, torch.float64])
def test_update_stats_other_buffer_dtypes(running_dtype):
    mean, var = torch.randn(5), torch.rand(5)
    rm, rv = torch.zeros(5, dtype=running_dtype), torch.ones(5, dtype=running_dtype)
    ops.bn_update_stats_(rm, rv, mean, var, 0.25, 10)
    torch.testing.assert_close(rm, (0.25 * mean).to(running_dtype))
    torch.testing.assert_close(rv, (0.75 + 0.25 * var * 10 / 9).to(running_dtype))


def test_bn_act_ill_conditioned_variance():
    # Large mean, tiny spread: the shifted one-pass sums must not cancel.
    x = (1000.0 + 1e-2 * torch.randn(8, 3, 16, 16)).float()
    out, mean, var = ops.bn_act_fwd(x, None, None, None, 1e-5, False)
    xd = x.double()
    torch.testing.assert_close(mean.double(), xd.mean((0, 2, 3)), rtol=1e-7, atol=0)
    torch.testing.assert_close(var.double(), xd.var((0, 2, 3), unbiased=False), rtol=1e-3, atol=0)


@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("fmt", FORMATS)
def test_gradcheck_fp64(relu, fmt):
    torch.manual_seed(2)
    x, w, b, r = bn_case(torch.float64, fmt, True, shape=(2, 3, 3, 2))
    inputs = [t.detach().requires_grad_() for t in (x, w, b, r)]
    assert torch.autograd.gradcheck(lambda *a: ops.bn_act_fwd(*a, 1e-5, relu)[0], inputs)
    s, h = torch.rand(3, dtype=torch.float64) + 0.5, torch.randn(3, dtype=torch.float64)
    sba_inputs = [t.detach().requires_grad_() for t in (x, s, h, r)]
    assert torch.autograd.gradcheck(lambda *a: ops.scale_bias_act(*a, relu), sba_inputs)
    assert torch.autograd.gradcheck(lambda a, c: ops.add_relu(a, c), inputs[0:4:3])


# ---- add_relu / scale_bias_act ---------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fmt", FORMATS)
def test_add_relu_parity(dtype, fmt):
    torch.manual_seed(3)
    x, r, grad = (rand((3, 5, 4, 6), dtype, fmt) for _ in range(3))
    with Spy() as spy:
        out, (gx, gr) = grads_of(ops.add_relu, (x, r), grad)
    assert spy.count("add_relu") == 1 and spy.count("add_relu_backward") == 1
    assert out.is_contiguous(memory_format=fmt)
    eager, (ex, er) = grads_of(lambda a, b: F.relu(a + b), (x, r), grad)
    ref, (rx, rr) = grads_of(lambda a, b: F.relu(a + b), (x.double(), r.double()), grad.double())
    assert_2x(out, eager, ref, dtype, "out")
    assert_2x(gx, ex, rx, dtype, "grad_x")
    assert_2x(gr, er, rr, dtype, "grad_residual")


def test_add_relu_out_and_inplace():
    x, r = rand((2, 3, 4, 4)), rand((2, 3, 4, 4))
    expected = F.relu(x + r)
    out = torch.empty_like(x)
    ops.add_relu_out(x, r, out)
    torch.testing.assert_close(out, expected)
    y = x.clone()
    ops.add_relu_(y, r)
    torch.testing.assert_close(y, expected)
    strided = torch.empty(2, 3, 4, 8)[..., ::2]  # not dense: written through a copy
    ops.add_relu_out(x, r, strided)
    torch.testing.assert_close(strided, expected)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fmt", FORMATS)
def test_scale_bias_act_parity(dtype, fmt):
    torch.manual_seed(4)
    x, r = rand((2, 6, 5, 3), dtype, fmt), rand((2, 6, 5, 3), dtype, fmt)
    scale, bias = torch.rand(6) + 0.5, torch.randn(6)
    with Spy() as spy:
        out = ops.scale_bias_act(x, scale, bias, r, True)
    assert spy.count("scale_bias_act") == 1
    assert out.dtype == dtype and out.is_contiguous(memory_format=fmt)
    shape = (1, -1, 1, 1)
    eager = F.relu(x * scale.to(dtype).view(shape) + bias.to(dtype).view(shape) + r)
    ref = F.relu(x.double() * scale.double().view(shape) + bias.double().view(shape) + r.double())
    assert_2x(out, eager, ref, dtype, "out")


def test_scale_bias_act_out_inplace_and_ndim():
    x = rand((2, 4, 3))  # (N, C, L): any rank >= 2, channel dim 1
    scale, bias = torch.rand(4), torch.randn(4)
    expected = x * scale.view(1, -1, 1) + bias.view(1, -1, 1)
    torch.testing.assert_close(ops.scale_bias_act(x, scale, bias, None, False), expected)
    out = torch.empty_like(x)
    ops.scale_bias_act_out(x, scale, bias, None, True, out)
    torch.testing.assert_close(out, expected.relu())
    ops.scale_bias_act_(x, scale, bias, None, True)
    torch.testing.assert_close(x, expected.relu())


def test_mixed_layouts_follow_x():
    x = rand((2, 8, 3, 3), fmt=torch.channels_last)
    r = rand((2, 8, 3, 3))  # NCHW residual is converted to x's layout
    out = ops.add_relu(x, r)
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, F.relu(x + r))


# ---- opcheck: schema, fake tensors (strides included), autograd registration, AOT ----

def _opcheck_samples(fmt, dtype=torch.float32, device="cpu"):
    x, w, b, r = bn_case(dtype, fmt, True, device, shape=(2, 4, 3, 3))
    g = rand(x.shape, dtype, fmt, device)
    out, mean, var = ops.bn_act_fwd(x, w, b, r, 1e-5, True)
    rg = lambda t: t.detach().clone().requires_grad_()  # noqa: E731
    return {
        "add_relu": (rg(x), rg(r)),
        "add_relu_out": (x, r, torch.empty_like(x)),
        "add_relu_": (x.clone(), r),
        "add_relu_backward": (g, out),
        "scale_bias_act": (rg(x), rg(w), rg(b), rg(r), True),
        "scale_bias_act_out": (x, w, b, None, False, torch.empty_like(x)),
        "scale_bias_act_": (x.clone(), w, b, r, True),
        "bn_act_fwd": (rg(x), rg(w), rg(b), rg(r), 1e-5, True),
        "bn_act_bwd": (g, x, out, w, mean, var, 1e-5, True, True),
        "bn_update_stats_": (torch.zeros(4, device=device), torch.ones(4, device=device), mean, var, 0.1, 18),
    }


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", list(_opcheck_samples(torch.contiguous_format)))
def test_opcheck(name, fmt):
    args = _opcheck_samples(fmt)[name]
    torch.library.opcheck(getattr(ops, name), args)


def test_opcheck_half_bn():
    x, w, b, r = bn_case(torch.float16, torch.channels_last, True, shape=(2, 4, 3, 3))
    torch.library.opcheck(ops.bn_act_fwd, (x.requires_grad_(), w, b, r, 1e-5, True))


def test_compiles_with_aot_autograd():
    x, w, b, r = bn_case(torch.float32, torch.channels_last, True, shape=(2, 4, 3, 3))

    def f(x, w, b, r):
        return ops.add_relu(ops.bn_act_fwd(x, w, b, None, 1e-5, True)[0], r)

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x, w, b, r), f(x, w, b, r))


# ---- errors -------------------------------------------------------------------------

def test_clear_errors():
    x = rand((2, 4, 3, 3))
    with pytest.raises(RuntimeError, match="residual must have x's shape"):
        ops.add_relu(x, rand((2, 4, 3, 2)))
    with pytest.raises(RuntimeError, match="must be float32, float16, bfloat16 or float64"):
        ops.add_relu(x.int(), x.int())
    with pytest.raises(RuntimeError, match="scale must be 1-D with one value per channel"):
        ops.scale_bias_act(x, torch.ones(3), torch.ones(4), None, True)
    with pytest.raises(RuntimeError, match="more than 1 value per channel"):
        ops.bn_act_fwd(rand((1, 4, 1, 1)), None, None, None, 1e-5, True)
    with pytest.raises(RuntimeError, match="count must be > 1"):
        ops.bn_update_stats_(torch.zeros(4), torch.ones(4), torch.zeros(4), torch.ones(4), 0.1, 1)


def test_status_describes_build():
    info = _ext.build_info()
    assert "cuda" in info
    text = _ext.status()[1]
    assert text.startswith("built with CUDA kernels") if info["cuda"] != "none" else "only: built without" in text
    assert _ext.available(torch.device("cpu"))


def test_arch_compatibility_rule():
    assert _ext._arch_runs("8.0", (8, 6)) and not _ext._arch_runs("8.0", (9, 0))
    assert _ext._arch_runs("9.0+PTX", (10, 0)) and not _ext._arch_runs("9.0+PTX", (8, 0))
    assert _ext._arch_runs("9.0a", (9, 0)) and not _ext._arch_runs("9.0a", (10, 0))


# ---- setup.py: locating the toolkit ------------------------------------------------------

def load_setup():
    spec = importlib.util.spec_from_file_location("rf_setup", Path(__file__).resolve().parents[1] / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # setup() itself only runs as __main__
    return module


def fake_toolkit(root: Path, release: str) -> Path:
    home = root / f"cuda-{release}"
    (home / "bin").mkdir(parents=True)
    (home / "lib64").mkdir()
    nvcc = home / "bin" / "nvcc"
    nvcc.write_text(f"#!/bin/sh\necho 'Cuda compilation tools, release {release}, V{release}.1'\n")
    nvcc.chmod(0o755)
    return home


def test_setup_follows_nvcc_wrapper_and_checks_versions(tmp_path, monkeypatch):
    setup = load_setup()
    home = fake_toolkit(tmp_path, "12.4")
    wrapper = tmp_path / "bin" / "nvcc"  # like /usr/local/bin/nvcc here: a script, not a symlink
    wrapper.parent.mkdir()
    wrapper.write_text(f'#!/bin/sh\nexec {home}/bin/nvcc "$@"\n')
    wrapper.chmod(0o755)
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.delenv("RESNET_FAST_SKIP_CUDA_BUILD", raising=False)
    monkeypatch.setenv("PATH", f"{wrapper.parent}:{os.environ['PATH']}")
    assert setup.find_cuda_home() == home
    assert setup.nvcc_version(home) == "12.4"

    class FakeTorch:  # torch built with CUDA 13.0 vs a 12.4 toolkit
        __version__ = "2.14.1"

        class version:
            cuda = "13.0"

    with pytest.raises(SystemExit, match="major versions must match"):
        setup.cuda_plan(FakeTorch)
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "nowhere"))
    with pytest.raises(SystemExit, match="is not a CUDA toolkit"):
        setup.find_cuda_home()
    monkeypatch.setenv("RESNET_FAST_SKIP_CUDA_BUILD", "1")
    assert setup.cuda_plan(FakeTorch) == (None, "RESNET_FAST_SKIP_CUDA_BUILD is set")


# ---- CUDA ------------------------------------------------------------------------------

gpu = pytest.mark.gpu


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("residual,relu", [(True, True), (False, True), (False, False)])
def test_cuda_bn_act_parity(dtype, fmt, residual, relu):
    test_bn_act_parity(dtype, fmt, residual, relu, device="cuda")


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,fmt", [
    ((32, 64, 56, 56), torch.channels_last),   # ResNet-sized: many splits, 16-byte packs
    ((16, 256, 14, 14), torch.contiguous_format),
    ((3, 3, 7, 5), torch.channels_last),       # C % 8 != 0: scalar path
    ((2, 5, 3, 3), torch.contiguous_format),   # H*W % 8 != 0: scalar path
])
def test_cuda_bn_act_shapes(dtype, shape, fmt):
    torch.manual_seed(5)
    x, w, b, r = bn_case(dtype, fmt, True, "cuda", shape=shape)
    grad = rand(shape, dtype, fmt, "cuda")
    out, g = grads_of(lambda x, w, b, r: ops.bn_act_fwd(x, w, b, r, 1e-5, True)[0], (x, w, b, r), grad)
    zeros, ones = torch.zeros(shape[1], device="cuda"), torch.ones(shape[1], device="cuda")
    eager, eg = grads_of(lambda x, w, b, r: eager_bn_act(x, w, b, r, zeros, ones, 0.1, 1e-5, True),
                         (x, w, b, r), grad)
    ref, rg = grads_of(lambda x, w, b, r: eager_bn_act(x, w, b, r, zeros.double(), ones.double(), 0.1, 1e-5, True),
                       [t.double() for t in (x, w, b, r)], grad.double())
    assert out.is_contiguous(memory_format=fmt)
    assert_2x(out, eager, ref, dtype, "out")
    for name, a, e, rr in zip(("grad_x", "grad_w", "grad_b", "grad_r"), g, eg, rg):
        assert_2x(a, e, rr, dtype, name)


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fmt", FORMATS)
def test_cuda_elementwise_parity(dtype, fmt):
    torch.manual_seed(6)
    x, r, grad = (rand((4, 16, 9, 9), dtype, fmt, "cuda") for _ in range(3))
    out, (gx, _) = grads_of(ops.add_relu, (x, r), grad)
    eager, (ex, _) = grads_of(lambda a, b: F.relu(a + b), (x, r), grad)
    ref, (rx, _) = grads_of(lambda a, b: F.relu(a + b), (x.double(), r.double()), grad.double())
    assert_2x(out, eager, ref, dtype, "add_relu")
    assert_2x(gx, ex, rx, dtype, "add_relu grad")
    scale, bias = torch.rand(16, device="cuda") + 0.5, torch.randn(16, device="cuda")
    shape = (1, -1, 1, 1)
    out = ops.scale_bias_act(x, scale, bias, r, True)
    eager = F.relu(x * scale.to(dtype).view(shape) + bias.to(dtype).view(shape) + r)
    ref = F.relu(x.double() * scale.double().view(shape) + bias.double().view(shape) + r.double())
    assert_2x(out, eager, ref, dtype, "scale_bias_act")


@gpu
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", list(_opcheck_samples(torch.contiguous_format)))
def test_cuda_opcheck(name, fmt):
    assert _ext.available(torch.device("cuda")), _ext.status()[1]
    torch.library.opcheck(getattr(ops, name), _opcheck_samples(fmt, device="cuda")[name])


@gpu
def test_cuda_runs_on_current_stream_and_device():
    x, r = rand((2, 8, 4, 4), device="cuda"), rand((2, 8, 4, 4), device="cuda")
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        out = ops.add_relu(x, r)
    stream.synchronize()
    torch.testing.assert_close(out, F.relu(x + r))
