"""resnet_fast.ops.bn_act (bn_act, scale_bias_act, add_relu) on every backend.

bn_act must equal relu(bn(x) + residual) with nn.BatchNorm2d's semantics:
outputs, every gradient, running stats and num_batches_tracked, in training and
eval, momentum=None, track_running_stats=False, affine=False. The Triton
kernels run under the interpreter here (fp32 and fp16; bf16 is checked on GPU
only) and are compiled for sm_80/sm_90 in a subprocess. Tests prove which
implementation ran (_dispatch.CALLS, the Triton LAUNCHES counters, a dispatch spy).
"""
from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import resnet_fast
from resnet_fast import backend as _backend
from resnet_fast.ops import _dispatch, _ext
from resnet_fast.ops.bn_act import add_relu, bn_act, scale_bias_act

ROOT = Path(__file__).resolve().parents[1]
EXT = _ext.available(torch.device("cpu"))
REQUIRE_EXT = os.environ.get("RESNET_FAST_REQUIRE_EXT") == "1"
BACKENDS = ["torch", "ext", "triton"]


def skip_unless_usable(backend, device=torch.device("cpu")):
    if backend == "ext" and not EXT:
        assert not REQUIRE_EXT, _ext.status()[1]
        pytest.skip(f"resnet_fast._C unavailable: {_ext.status()[1]}")
    if backend == "triton" and not _backend.triton_usable(device):
        pytest.skip(_backend.triton_status()[1])


class Spy(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def triton_launches():
    from resnet_fast.ops import triton_add_relu
    return sum(triton_add_relu.LAUNCHES.values())


def make_bn(C, **kw):
    bn = nn.BatchNorm2d(C, **kw)
    if bn.affine:
        with torch.no_grad():
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    return bn


def step(fn, x, r, grad):
    """Forward + backward; returns (out, grads of x, r and the module's params)."""
    x = x.detach().clone().requires_grad_()
    r = r.detach().clone().requires_grad_() if r is not None else None
    out = fn(x, r)
    out.backward(grad)
    return out.detach(), x.grad, None if r is None else r.grad


def compare_modules(ours, ref, atol):
    for (name, a), (_, b) in zip(ours.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=atol, rtol=atol, msg=f"grad of {name}")
    for (name, a), (_, b) in zip(ours.named_buffers(), ref.named_buffers()):
        torch.testing.assert_close(a, b, atol=atol, rtol=atol, msg=name)


MODES = {  # name: (module kwargs, training)
    "train": ({}, True),
    "train_momentum_none": ({"momentum": None}, True),
    "train_no_running_stats": ({"track_running_stats": False}, True),
    "train_affine_false": ({"affine": False}, True),
    "eval": ({}, False),
    "eval_no_running_stats": ({"track_running_stats": False}, False),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", list(MODES))
def test_bn_act_matches_batchnorm(backend, mode):
    skip_unless_usable(backend)
    torch.manual_seed(0)
    kwargs, training = MODES[mode]
    ours = make_bn(3, **kwargs).train(training)
    if not training and ours.running_mean is not None:
        with torch.no_grad():
            ours.running_mean.uniform_(-1, 1)
            ours.running_var.uniform_(0.5, 2)
    ref = copy.deepcopy(ours)
    fmt = torch.channels_last if mode.startswith("eval") else torch.contiguous_format
    before = (_dispatch.CALLS[("bn_act", backend)], triton_launches())
    for i in range(3):  # several steps: running averages, num_batches_tracked, momentum=None
        x = (torch.randn(2, 3, 4, 4) * 2 + i).to(memory_format=fmt)
        r = torch.randn(2, 3, 4, 4).to(memory_format=fmt) if i != 1 else None
        grad = torch.randn(2, 3, 4, 4)
        with resnet_fast.use_backend(backend):
            out, gx, gr = step(lambda x, r: bn_act(x, ours, r, relu=i != 2), x, r, grad)
        eout, egx, egr = step(lambda x, r: F.relu(ref(x) + (0 if r is None else r)) if i != 2 else
                              ref(x) + (0 if r is None else r), x, r, grad)
        torch.testing.assert_close(out, eout, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(gx, egx, atol=1e-5, rtol=1e-5)
        if r is not None:
            torch.testing.assert_close(gr, egr, atol=1e-5, rtol=1e-5)
        assert out.is_contiguous(memory_format=fmt)
    compare_modules(ours, ref, atol=1e-5)
    assert _dispatch.CALLS[("bn_act", backend)] == before[0] + 3
    if backend == "triton":
        assert triton_launches() > before[1]


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_triton_low_precision_2x_rule(dtype, fmt):
    """Triton (interpreter) vs eager in the same dtype, both against fp64."""
    skip_unless_usable("triton")
    torch.manual_seed(1)
    x = (torch.randn(2, 4, 3, 5) * 3 + 1).to(dtype=dtype, memory_format=fmt)
    r = torch.randn(2, 4, 3, 5).to(dtype=dtype, memory_format=fmt)
    grad = torch.randn(2, 4, 3, 5).to(dtype=dtype, memory_format=fmt)
    bns = {k: make_bn(4) for k in ("triton", "eager", "ref")}
    bns["eager"].load_state_dict(bns["triton"].state_dict())
    bns["ref"].load_state_dict(bns["triton"].state_dict())
    bns["ref"].double()
    before = triton_launches()
    with resnet_fast.use_backend("triton"):
        out, gx, gr = step(lambda x, r: bn_act(x, bns["triton"], r), x, r, grad)
    assert triton_launches() > before
    eout, egx, egr = step(lambda x, r: F.relu(bns["eager"](x) + r), x, r, grad)
    rout, rgx, rgr = step(lambda x, r: F.relu(bns["ref"](x) + r), x.double(), r.double(), grad.double())
    floor = {torch.float16: 2e-3, torch.float32: 1e-5}[dtype]
    pairs = [("out", out, eout, rout), ("grad_x", gx, egx, rgx), ("grad_r", gr, egr, rgr),
             ("grad_w", bns["triton"].weight.grad, bns["eager"].weight.grad, bns["ref"].weight.grad),
             ("grad_b", bns["triton"].bias.grad, bns["eager"].bias.grad, bns["ref"].bias.grad)]
    for name, ours, eager, ref in pairs:
        assert ours.dtype == eager.dtype, name
        scale = max(1.0, ref.abs().max().item())
        err = (ours.double() - ref).abs().max().item()
        eager_err = (eager.double() - ref).abs().max().item()
        assert err <= 2 * eager_err + floor * scale, f"{name}: {err:.3g} vs eager {eager_err:.3g}"
    torch.testing.assert_close(bns["triton"].running_var, bns["eager"].running_var, atol=1e-3, rtol=1e-3)


def test_ext_backend_calls_the_cpp_op():
    skip_unless_usable("ext")
    bn = make_bn(4)
    x = torch.randn(2, 4, 3, 3, requires_grad=True)
    with resnet_fast.use_backend("ext"), Spy() as spy:
        bn_act(x, bn, torch.randn(2, 4, 3, 3)).sum().backward()
    assert {"resnet_fast.bn_act_fwd", "resnet_fast.bn_update_stats_", "resnet_fast.bn_act_bwd"} <= set(spy.names)


def test_auto_follows_the_preference_table():
    x = torch.randn(2, 4, 3, 3)
    expected = next(b for b in _dispatch.AUTO_PREFERENCE["cpu"]["bn_act"]
                    if _dispatch.usable(b, x.device, x.dtype))
    before = _dispatch.CALLS[("bn_act", expected)]
    with resnet_fast.use_backend("auto"):
        bn_act(x, make_bn(4))
    assert _dispatch.CALLS[("bn_act", expected)] == before + 1
    assert "triton" not in _dispatch.AUTO_PREFERENCE["cpu"]["bn_act"]  # the interpreter is never "fastest"


def test_autocast_like_batchnorm():
    skip_unless_usable("ext")
    torch.manual_seed(2)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    ours, ref = make_bn(4), make_bn(4)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(2, 3, 6, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with resnet_fast.use_backend("ext"):
            out = bn_act(conv(x), ours)
        eout = F.relu(ref(conv(x)))
    assert out.dtype == eout.dtype == torch.bfloat16
    assert ours.running_mean.dtype == torch.float32
    torch.testing.assert_close(out.float(), eout.float(), atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(ours.running_mean, ref.running_mean, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(ours.running_var, ref.running_var, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("backend", ["ext", "triton"])
def test_residual_dtype_promotes_like_eager(backend):
    skip_unless_usable(backend)
    x, r = torch.randn(2, 4, 3, 3).half(), torch.randn(2, 4, 3, 3)
    bn, ref = make_bn(4), make_bn(4)
    ref.load_state_dict(bn.state_dict())
    with resnet_fast.use_backend(backend):
        out = bn_act(x, bn, r)
    eout = F.relu(ref(x) + r)
    assert out.dtype == eout.dtype == torch.float32
    torch.testing.assert_close(out, eout, atol=2e-3, rtol=2e-3)


def test_compiles_with_aot_autograd():
    skip_unless_usable("ext")
    ours, ref = make_bn(4), make_bn(4)
    ref.load_state_dict(ours.state_dict())
    x, r = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)

    def block(x, r):
        return bn_act(x, ours, r)

    with resnet_fast.use_backend("ext"):
        out = torch.compile(block, backend="aot_eager")(x, r)
    torch.testing.assert_close(out, F.relu(ref(x) + r), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.running_var, ref.running_var)
    assert ours.num_batches_tracked.item() == 1


# ---- bad input and backends that cannot run -----------------------------------------

def test_bn_act_errors():
    bn = make_bn(4)
    x = torch.randn(2, 4, 3, 3)
    with pytest.raises(TypeError, match="bn must be a torch.nn BatchNorm"):
        bn_act(x, nn.Linear(4, 4))
    with pytest.raises(ValueError, match="residual must have x's shape"):
        bn_act(x, bn, torch.randn(2, 4, 3, 2))
    with pytest.raises(ValueError, match="expected 4D input"):
        with resnet_fast.use_backend("ext" if EXT else "torch"):
            bn_act(torch.randn(2, 4, 3), bn)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        with resnet_fast.use_backend("ext" if EXT else "torch"):
            bn_act(torch.randn(1, 4, 1, 1), bn)
    with pytest.raises(TypeError, match="backend 'triton' runs bn_act in float16, bfloat16 or float32"):
        with resnet_fast.use_backend("triton"):
            bn_act(x.double(), bn.double())


def test_explicit_backend_that_cannot_run_raises(monkeypatch):
    monkeypatch.setattr(_backend, "ext_usable", lambda device: False)
    with pytest.raises(RuntimeError, match="backend 'ext' cannot run on cpu"):
        with resnet_fast.use_backend("ext"):
            bn_act(torch.randn(2, 4, 3, 3), make_bn(4))
    before = _dispatch.CALLS[("bn_act", "torch")]
    bn_act(torch.randn(2, 4, 3, 3), make_bn(4))  # auto still runs, on torch
    assert _dispatch.CALLS[("bn_act", "torch")] == before + 1


def test_batchnorm_subclass_runs_unfused():
    class CustomBN(nn.BatchNorm2d):
        pass

    bn = CustomBN(4)
    x = torch.randn(2, 4, 3, 3)
    torch.testing.assert_close(bn_act(x, bn), F.relu(copy.deepcopy(bn)(x)))
    with pytest.raises(ValueError, match="fuses nn.BatchNorm1d/2d/3d only, got CustomBN"):
        with resnet_fast.use_backend("triton"):
            bn_act(x, bn)


# ---- add_relu and scale_bias_act --------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_add_relu_backends(backend):
    skip_unless_usable(backend)
    x, r = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    grad = torch.randn(2, 3, 4, 4)
    before = _dispatch.CALLS[("add_relu", backend)]
    with resnet_fast.use_backend(backend):
        out, gx, gr = step(add_relu, x, r, grad)
        inplace = x.clone()
        assert add_relu(inplace, r, out=inplace) is inplace
        into = torch.empty_like(x).to(memory_format=torch.channels_last)
        add_relu(x, r, out=into)
        with pytest.raises(RuntimeError, match="does not support autograd"):
            add_relu(x.clone().requires_grad_(), r, out=torch.empty_like(x))
        with pytest.raises(ValueError, match="residual must have x's shape, dtype and device"):
            add_relu(x, r.double())
    eout, egx, egr = step(lambda a, b: F.relu(a + b), x, r, grad)
    for got, want in ((out, eout), (gx, egx), (gr, egr), (inplace, eout), (into, eout)):
        torch.testing.assert_close(got, want)
    assert _dispatch.CALLS[("add_relu", backend)] == before + 3


@pytest.mark.parametrize("backend", BACKENDS)
def test_scale_bias_act_backends(backend):
    skip_unless_usable(backend)
    torch.manual_seed(3)
    x = torch.randn(2, 3, 4, 4).to(memory_format=torch.channels_last)
    r, grad = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    scale, bias = (torch.rand(3) + 0.5).requires_grad_(), torch.randn(3, requires_grad=True)
    with resnet_fast.use_backend(backend):
        out, gx, gr = step(lambda a, b: scale_bias_act(a, scale, bias, b), x, r, grad)
        gs, gb = scale.grad.clone(), bias.grad.clone()
        inplace = x.clone()
        with torch.no_grad():
            assert scale_bias_act(inplace, scale, bias, r, out=inplace) is inplace
    scale.grad = bias.grad = None
    shape = (1, -1, 1, 1)
    eout, egx, egr = step(lambda a, b: F.relu(a * scale.view(shape) + bias.view(shape) + b), x, r, grad)
    assert out.is_contiguous(memory_format=torch.channels_last)
    for got, want in ((out, eout), (gx, egx), (gr, egr), (gs, scale.grad), (gb, bias.grad), (inplace, eout)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def _resnet_composition():
    """conv+BN+ReLU stem, max-pool, two BasicBlocks: resnet18's first stage, small."""
    from resnet_fast.models.resnet import BasicBlock
    torch.manual_seed(0)
    net = nn.ModuleDict(dict(conv=nn.Conv2d(3, 16, 3, 2, 1, bias=False), bn=nn.BatchNorm2d(16),
                             b0=BasicBlock(16, 16), b1=BasicBlock(16, 16)))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(16, generator=g) + 0.5)
                m.bias.copy_(torch.randn(16, generator=g) * 0.2)
    return net.train()


@pytest.mark.parametrize("backend", ["torch", "ext"])
def test_bn_act_composition_gradients(backend, monkeypatch):
    """Train-mode gradients through stem + max-pool + two residual blocks, where outputs
    feed max-pool, later convs and residuals. The fp64 reference reuses this run's ReLU
    masks and max-pool indices: a pre-activation within fp32 rounding of 0 (or a near-tie
    in a pool window) may resolve differently in fp64, a discontinuity any fp32
    implementation hits now and then, which would otherwise swamp the comparison."""
    skip_unless_usable(backend)
    import resnet_fast.ops.bn_act as bn_act_mod
    from resnet_fast.ops.conv_bn import conv_bn_act
    outs = []

    def recording_bn_act(*args, **kwargs):
        out = bn_act(*args, **kwargs)
        outs.append(out.detach())
        return out

    monkeypatch.setattr(bn_act_mod, "bn_act", recording_bn_act)  # conv_bn_act looks it up per call
    net = _resnet_composition()
    ref = copy.deepcopy(net).double()
    x = torch.randn(8, 3, 32, 32)
    grad = torch.randn(8, 16, 8, 8)
    _dispatch.CALLS.clear()
    with resnet_fast.use_backend(backend):
        h = conv_bn_act(x, net["conv"], net["bn"], relu=True)
        h, idx = F.max_pool2d(h, 3, 2, 1, return_indices=True)
        y = net["b1"](net["b0"](h))
    y.backward(grad)
    assert _dispatch.CALLS[("bn_act", backend)] == 5 and len(outs) == 5

    masks = iter([o > 0 for o in outs])

    def bn_relu(c, bn, residual=None):
        z = F.batch_norm(c, None, None, bn.weight, bn.bias, True, 0.0, bn.eps)
        return (z if residual is None else z + residual) * next(masks)

    hr = bn_relu(ref["conv"](x.double()), ref["bn"])
    hr = hr.flatten(2).gather(2, idx.flatten(2)).view(idx.shape)
    for b in (ref["b0"], ref["b1"]):
        hr = bn_relu(b.conv2(bn_relu(b.conv1(hr), b.bn1)), b.bn2, residual=hr)
    hr.backward(grad.double())
    torch.testing.assert_close(y.double(), hr, rtol=0, atol=1e-5)
    for (name, p), p_ref in zip(net.named_parameters(), ref.parameters()):
        err = (p.grad.double() - p_ref.grad).abs().max() / p_ref.grad.abs().max()
        assert err < 1e-5, f"{name}: relative gradient error {err:.1e}"


def test_triton_opcheck():
    skip_unless_usable("triton")
    from resnet_fast.ops import triton_bn_act  # noqa: F401  registers the ops
    ops = torch.ops.resnet_fast
    x = torch.randn(2, 4, 3, 3).to(memory_format=torch.channels_last).requires_grad_()
    w, b = torch.rand(4, requires_grad=True), torch.randn(4, requires_grad=True)
    r = torch.randn(2, 4, 3, 3).to(memory_format=torch.channels_last).requires_grad_()
    out, mean, var = ops.triton_bn_act_fwd(x, w, b, r, 1e-5, True)
    torch.library.opcheck(ops.triton_bn_act_fwd, (x, w, b, r, 1e-5, True))
    torch.library.opcheck(ops.triton_bn_act_bwd, (torch.randn_like(x), x.detach(), out.detach(), w.detach(),
                                                  mean, var, 1e-5, True, True))
    torch.library.opcheck(ops.triton_add_relu, (x, r))
    torch.library.opcheck(ops.triton_scale_bias_act, (x, w, b, None, True))
    torch.library.opcheck(ops.triton_bn_update_stats_, (torch.zeros(4), torch.ones(4), mean, var, 0.1, 18))


def test_triton_kernels_compile_for_sm80_and_sm90():
    """Full Triton -> PTX -> cubin compile of every kernel variant (no GPU needed)."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "triton_sm_compile.py"), "80", "90"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "sm_90: compiled" in proc.stdout


# ---- CUDA -------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["ext", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_cuda_backends_match_eager(backend, dtype, fmt):
    device = torch.device("cuda")
    skip_unless_usable(backend, device)
    if backend == "ext":
        assert _ext.available(device), _ext.status()[1]
    torch.manual_seed(4)
    shape = (8, 64, 28, 28)
    x = (torch.randn(shape, device=device) * 2 + 1).to(dtype=dtype, memory_format=fmt)
    r = torch.randn(shape, device=device).to(dtype=dtype, memory_format=fmt)
    grad = torch.randn(shape, device=device).to(dtype=dtype, memory_format=fmt)
    bns = {k: make_bn(64).to(device) for k in ("ours", "eager", "ref")}
    bns["eager"].load_state_dict(bns["ours"].state_dict())
    bns["ref"].load_state_dict(bns["ours"].state_dict())
    bns["ref"].double()
    with resnet_fast.use_backend(backend):
        out, gx, gr = step(lambda x, r: bn_act(x, bns["ours"], r), x, r, grad)
    eout, egx, egr = step(lambda x, r: F.relu(bns["eager"](x) + r), x, r, grad)
    rout, rgx, rgr = step(lambda x, r: F.relu(bns["ref"](x) + r), x.double(), r.double(), grad.double())
    floor = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    pairs = [("out", out, eout, rout), ("grad_x", gx, egx, rgx), ("grad_r", gr, egr, rgr),
             ("grad_w", bns["ours"].weight.grad, bns["eager"].weight.grad, bns["ref"].weight.grad),
             ("grad_b", bns["ours"].bias.grad, bns["eager"].bias.grad, bns["ref"].bias.grad),
             ("running_var", bns["ours"].running_var, bns["eager"].running_var, bns["ref"].running_var)]
    for name, ours, eager, ref in pairs:
        scale = max(1.0, ref.abs().max().item())
        err = (ours.double() - ref).abs().max().item()
        eager_err = (eager.double() - ref).abs().max().item()
        assert err <= 2 * eager_err + floor * scale, f"{name}: {err:.3g} vs eager {eager_err:.3g}"
    assert out.is_contiguous(memory_format=fmt)
