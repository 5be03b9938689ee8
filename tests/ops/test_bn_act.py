"""bn_act: act(bn(x) + residual), the training op of every block, on every backend.

The front (resnet_fast.ops.bn_act.bn_act) must equal relu(bn(x) + residual) with nn.BatchNorm2d's
semantics: outputs, every gradient, running stats and num_batches_tracked, in training and eval,
momentum=None, track_running_stats=False, affine=False. The fused ops behind it
(bn_act_fwd, bn_act_bwd, bn_update_stats_) have one schema in two families, the extension's
(torch.ops.resnet_fast.<op>) and Triton's (.triton_<op>): both are held to eager PyTorch and a
float64 reference under the 2x rule, opcheck'ed, and proven to have run (dispatch.CALLS, the
Triton launch counter, a dispatch spy). Triton runs under the interpreter without CUDA.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import resnet_fast
from _backends import (BACKENDS, DEVICES, FAMILIES, FORMATS, Family, cuda_family,
                       every_cuda_tiling, every_family_dtype_layout, launches, skip_unless_usable)
from _numerics import DTYPES, FLOOR, Spy, assert_2x, grads_of, rand, step
from resnet_fast.ops import dispatch
from resnet_fast.ops.bn_act import bn_act

def make_bn(C, **kw):
    bn = nn.BatchNorm2d(C, **kw)
    if bn.affine:
        with torch.no_grad():
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    return bn


# ---- the front: nn.BatchNorm2d's semantics on every backend ------------------------------

MODES = {  # name: (module kwargs, training)
    "train": ({}, True),
    "train_momentum_none": ({"momentum": None}, True),
    "train_no_running_stats": ({"track_running_stats": False}, True),
    "train_affine_false": ({"affine": False}, True),
    "eval": ({}, False),
    "eval_no_running_stats": ({"track_running_stats": False}, False),
}


def compare_modules(ours, ref, atol):
    for (name, a), (_, b) in zip(ours.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=atol, rtol=atol, msg=f"grad of {name}")
    for (name, a), (_, b) in zip(ours.named_buffers(), ref.named_buffers()):
        torch.testing.assert_close(a, b, atol=atol, rtol=atol, msg=name)


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
    before = (dispatch.CALLS[("bn_act", backend)], launches())
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
    assert dispatch.CALLS[("bn_act", backend)] == before[0] + 3
    assert (launches() > before[1]) == (backend == "triton")


@every_family_dtype_layout
def test_front_2x_rule(family, dtype, fmt, device):
    """The front vs eager in the same dtype, both against fp64: output, all gradients, running
    statistics. ResNet-sized on a GPU."""
    skip_unless_usable(family, torch.device(device))
    torch.manual_seed(1)
    shape = (8, 64, 28, 28) if device == "cuda" else (2, 4, 3, 5)
    x = (torch.randn(shape, device=device) * 3 + 1).to(dtype=dtype, memory_format=fmt)
    r = torch.randn(shape, device=device).to(dtype=dtype, memory_format=fmt)
    grad = torch.randn(shape, device=device).to(dtype=dtype, memory_format=fmt)
    bns = {k: make_bn(shape[1]).to(device) for k in ("ours", "eager", "ref")}
    bns["eager"].load_state_dict(bns["ours"].state_dict())
    bns["ref"].load_state_dict(bns["ours"].state_dict())
    bns["ref"].double()
    before = dispatch.CALLS[("bn_act", family)]
    with resnet_fast.use_backend(family):
        out, gx, gr = step(lambda x, r: bn_act(x, bns["ours"], r), x, r, grad)
    assert dispatch.CALLS[("bn_act", family)] == before + 1
    eout, egx, egr = step(lambda x, r: F.relu(bns["eager"](x) + r), x, r, grad)
    rout, rgx, rgr = step(lambda x, r: F.relu(bns["ref"](x) + r), x.double(), r.double(), grad.double())
    assert out.dtype == eout.dtype and out.is_contiguous(memory_format=fmt)
    for name, ours, eager, ref in [("out", out, eout, rout), ("grad_x", gx, egx, rgx), ("grad_r", gr, egr, rgr),
                                   *[(f"{p}.grad", getattr(bns["ours"], p).grad, getattr(bns["eager"], p).grad,
                                      getattr(bns["ref"], p).grad) for p in ("weight", "bias")],
                                   *[(p, getattr(bns["ours"], p), getattr(bns["eager"], p), getattr(bns["ref"], p))
                                     for p in ("running_mean", "running_var")]]:
        assert_2x(ours, eager, ref, dtype, name)


def test_auto_follows_the_routing_table():
    x = torch.randn(2, 4, 3, 3)
    expected = next(i for i in dispatch.ROUTES["bn_act"]["auto"]["cpu"] if dispatch.usable(i, x.device, x.dtype))
    before = dispatch.CALLS[("bn_act", expected)]
    with resnet_fast.use_backend("auto"):
        bn_act(x, make_bn(4))
    assert dispatch.CALLS[("bn_act", expected)] == before + 1
    assert "triton" not in dispatch.ROUTES["bn_act"]["auto"]["cpu"]  # the interpreter is never "fastest"


@pytest.mark.parametrize("backend", FAMILIES)
def test_autocast_like_batchnorm(backend):
    skip_unless_usable(backend)
    torch.manual_seed(2)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    ours, ref = make_bn(4), make_bn(4)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(2, 3, 6, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with resnet_fast.use_backend(backend):
            out = bn_act(conv(x), ours)
        eout = F.relu(ref(conv(x)))
    assert out.dtype == eout.dtype == torch.bfloat16
    assert ours.running_mean.dtype == torch.float32
    torch.testing.assert_close(out.float(), eout.float(), atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(ours.running_mean, ref.running_mean, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(ours.running_var, ref.running_var, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("backend", FAMILIES)
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


def test_front_compiles_with_aot_autograd():
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


def test_front_errors():
    bn = make_bn(4)
    x = torch.randn(2, 4, 3, 3)
    with pytest.raises(TypeError, match="bn must be a torch.nn BatchNorm"):
        bn_act(x, nn.Linear(4, 4))
    with pytest.raises(ValueError, match="residual must have x's shape"):
        bn_act(x, bn, torch.randn(2, 4, 3, 2))
    with pytest.raises(ValueError, match="expected 4D input"):
        bn_act(torch.randn(2, 4, 3), bn)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        bn_act(torch.randn(1, 4, 1, 1), bn)
    with pytest.raises(TypeError, match="backend 'triton' runs bn_act in float16, bfloat16 or float32"):
        with resnet_fast.use_backend("triton"):
            bn_act(x.double(), bn.double())


def test_explicit_backend_that_cannot_run_raises(monkeypatch):
    monkeypatch.setattr(dispatch, "ext_usable", lambda device: False)
    with pytest.raises(RuntimeError, match="backend 'ext' cannot run on cpu"):
        with resnet_fast.use_backend("ext"):
            bn_act(torch.randn(2, 4, 3, 3), make_bn(4))
    before = dispatch.CALLS[("bn_act", "torch")]
    bn_act(torch.randn(2, 4, 3, 3), make_bn(4))  # auto still runs, on torch
    assert dispatch.CALLS[("bn_act", "torch")] == before + 1


def test_batchnorm_subclass_runs_unfused():
    class CustomBN(nn.BatchNorm2d):
        pass

    bn = CustomBN(4)
    x = torch.randn(2, 4, 3, 3)
    torch.testing.assert_close(bn_act(x, bn), F.relu(copy.deepcopy(bn)(x)))
    with pytest.raises(ValueError, match="fuses nn.BatchNorm1d/2d/3d only, got CustomBN"):
        with resnet_fast.use_backend("triton"):
            bn_act(x, bn)


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
    from resnet_fast.ops import conv_bn
    outs = []

    def recording_bn_act(*args, **kwargs):
        out = bn_act(*args, **kwargs)
        outs.append(out.detach())
        return out

    monkeypatch.setattr(conv_bn, "bn_act", recording_bn_act)
    net = _resnet_composition()
    ref = copy.deepcopy(net).double()
    x = torch.randn(8, 3, 32, 32)
    grad = torch.randn(8, 16, 8, 8)
    before = dispatch.CALLS[("bn_act", backend)]
    with resnet_fast.use_backend(backend):
        h = conv_bn.conv_bn_act(x, net["conv"], net["bn"], relu=True)
        h, idx = F.max_pool2d(h, 3, 2, 1, return_indices=True)
        y = net["b1"](net["b0"](h))
    y.backward(grad)
    assert dispatch.CALLS[("bn_act", backend)] == before + 5 and len(outs) == 5

    masks = iter([o > 0 for o in outs])

    def bn_relu(c, bn, residual=None):
        z = F.batch_norm(c, None, None, bn.weight, bn.bias, True, 0.0, bn.eps)
        return (z if residual is None else z + residual) * next(masks)

    hr = bn_relu(ref["conv"](x.double()), ref["bn"])
    hr = hr.flatten(2).gather(2, idx.flatten(2)).view(idx.shape)
    for b in (ref["b0"], ref["b1"]):
        hr = bn_relu(b.conv2(bn_relu(b.conv1(hr), b.bn1)), b.bn2, residual=hr)
    hr.backward(grad.double())
    # fp32 rounding relative to the output's size (as resnet_fast.numerics' floor): the convs run in
    # channels_last on CPU, whose oneDNN rounding alone reaches ~1e-5 on outputs of size ~3.
    torch.testing.assert_close(y.double(), hr, rtol=0, atol=1e-5 * max(1.0, hr.abs().max().item()))
    for (name, p), p_ref in zip(net.named_parameters(), ref.parameters()):
        err = (p.grad.double() - p_ref.grad).abs().max() / p_ref.grad.abs().max()
        assert err < 1e-5, f"{name}: relative gradient error {err:.1e}"


# ---- the fused ops of both families ---------------------------------------------------------

def eager_bn_act(x, w, b, r, rm, rv, momentum, eps, relu):
    y = F.batch_norm(x, rm, rv, w, b, True, momentum, eps)
    if r is not None:
        y = y + r
    return F.relu(y) if relu else y


def run_bn_act(ops, x, w, b, r, rm, rv, momentum, eps, relu):
    out, mean, var = ops.bn_act_fwd(x, w, b, r, eps, relu)
    with torch.no_grad():
        ops.bn_update_stats_(rm, rv, mean, var, momentum, x.numel() // x.shape[1])
    return out


def bn_case(dtype, fmt, residual, device="cpu", shape=(4, 6, 5, 7), affine=True):
    x = rand(shape, dtype, fmt, device) * 2 + 0.5
    pdt = torch.float64 if dtype == torch.float64 else torch.float32  # params stay fp32 under AMP
    w = (torch.rand(shape[1], device=device, dtype=pdt) + 0.5) if affine else None
    b = torch.randn(shape[1], device=device, dtype=pdt) if affine else None
    r = rand(shape, dtype, fmt, device) if residual else None
    return x, w, b, r


@every_family_dtype_layout
@pytest.mark.parametrize("residual,relu", [(True, True), (False, True), (False, False)])
def test_ops_parity(family, dtype, fmt, residual, relu, device):
    _check_parity(family, dtype, fmt, residual, relu, device)


# channels_last reductions sum groups of vector Steps of channels in registers, then single Steps, then a
# scalar tail (csrc/cpu/vec.h: sum_tile); these channel counts reach each path on AVX2 (8 fp32 lanes) and
# AVX-512 (16), fp32 and bf16, and 16x24 positions per image make two 256-row tiles, the second partial.
@pytest.mark.parametrize("C", [8, 16, 24, 48, 70, 136])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_ext_channels_last_reduction_paths(C, dtype):
    skip_unless_usable("ext")
    _check_parity("ext", dtype, torch.channels_last, True, True, "cpu", shape=(2, C, 16, 24))


def _check_parity(family, dtype, fmt, residual, relu, device, shape=(4, 6, 5, 7)):
    ops = Family(family, device)
    torch.manual_seed(0)
    x, w, b, r = bn_case(dtype, fmt, residual, device, shape=shape)
    C = x.shape[1]
    stats = {k: (torch.zeros(C, device=device), torch.ones(C, device=device)) for k in ("ours", "eager", "ref")}
    grad = rand(x.shape, dtype, fmt, device)
    kernels = launches()
    with Spy() as spy:
        out, g = grads_of(lambda x, w, b, r: run_bn_act(ops, x, w, b, r, *stats["ours"], 0.1, 1e-5, relu),
                          (x, w, b, r), grad)
    assert [spy.count(ops.prefix + op) for op in ("bn_act_fwd", "bn_act_bwd", "bn_update_stats_")] == [1, 1, 1]
    assert (launches() > kernels) == (family == "triton")
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


@every_cuda_tiling()
def test_ops_resnet_shapes_on_cuda(family, dtype, shape, fmt, path):
    ops = cuda_family(family, shape, dtype, fmt, path)
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


def _misaligned(t):
    """A copy of t that starts one element into its storage: not 16-byte aligned."""
    view = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)[1:].view(t.shape)
    return view.copy_(t)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_ext_misaligned_inputs_on_cuda(dtype):
    """Inputs that are not 16-byte aligned take the scalar path of the CUDA kernels."""
    ops = Family("ext", "cuda")
    shape = (8, 64, 7, 7)
    torch.manual_seed(6)
    x, w, b, r = bn_case(dtype, torch.contiguous_format, True, "cuda", shape=shape)
    grad = rand(shape, dtype, device="cuda")
    xm, rm, gm = _misaligned(x), _misaligned(r), _misaligned(grad)
    assert xm.data_ptr() % 16 != 0
    out, mean, var = ops.bn_act_fwd(xm, w, b, rm, 1e-5, True)
    gx, gw, gb, gr = ops.bn_act_bwd(gm, xm, out, w, mean, var, 1e-5, True, True)
    eager, eg = grads_of(lambda x, w, b, r: eager_bn_act(x, w, b, r, None, None, 0.1, 1e-5, True), (x, w, b, r), grad)
    ref, rg = grads_of(lambda x, w, b, r: eager_bn_act(x, w, b, r, None, None, 0.1, 1e-5, True),
                       [t.double() for t in (x, w, b, r)], grad.double())
    assert_2x(out, eager, ref, dtype, "out")
    for name, a, e, rr in zip(("grad_x", "grad_w", "grad_b", "grad_r"), (gx, gw, gb, gr), eg, rg):
        assert_2x(a, e, rr, dtype, name)


@pytest.mark.parametrize("family", FAMILIES)
def test_affine_false_and_momentum_none_update(family):
    ops = Family(family)
    torch.manual_seed(1)
    x, _, _, _ = bn_case(torch.float32, torch.contiguous_format, False, affine=False)
    rm, rv = torch.randn(6), torch.rand(6) + 0.5
    erm, erv = rm.clone(), rv.clone()
    for i in range(1, 4):  # momentum=None: cumulative average, factor 1 / num_batches_tracked
        out = run_bn_act(ops, x + i, None, None, None, rm, rv, 1.0 / i, 1e-3, True)
        ref = eager_bn_act(x + i, None, None, None, erm, erv, 1.0 / i, 1e-3, True)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rm, erm, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(rv, erv, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("family,running_dtype", [("ext", torch.float16), ("ext", torch.float64),
                                                  ("triton", torch.float16), ("triton", torch.bfloat16)])
def test_update_stats_other_buffer_dtypes(family, running_dtype):
    ops = Family(family)
    mean, var = torch.randn(5), torch.rand(5)
    rm, rv = torch.zeros(5, dtype=running_dtype), torch.ones(5, dtype=running_dtype)
    ops.bn_update_stats_(rm, rv, mean, var, 0.25, 10)
    torch.testing.assert_close(rm, (0.25 * mean).to(running_dtype))
    torch.testing.assert_close(rv, (0.75 + 0.25 * var * 10 / 9).to(running_dtype))


@pytest.mark.parametrize("family", FAMILIES)
def test_ill_conditioned_variance(family):
    # Large mean, tiny spread: the shifted one-pass sums must not cancel.
    ops = Family(family)
    x = (1000.0 + 1e-2 * torch.randn(8, 3, 16, 16)).float()
    out, mean, var = ops.bn_act_fwd(x, None, None, None, 1e-5, False)
    xd = x.double()
    torch.testing.assert_close(mean.double(), xd.mean((0, 2, 3)), rtol=1e-7, atol=0)
    torch.testing.assert_close(var.double(), xd.var((0, 2, 3), unbiased=False), rtol=1e-3, atol=0)


@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("fmt", FORMATS)
def test_ext_gradcheck_fp64(relu, fmt):
    ops = Family("ext")  # Triton takes no float64
    torch.manual_seed(2)
    x, w, b, r = bn_case(torch.float64, fmt, True, shape=(2, 3, 3, 2))
    inputs = [t.detach().requires_grad_() for t in (x, w, b, r)]
    assert torch.autograd.gradcheck(lambda *a: ops.bn_act_fwd(*a, 1e-5, relu)[0], inputs)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("fmt", FORMATS)
def test_opcheck(family, fmt, device):
    ops = Family(family, device)
    x, w, b, r = bn_case(torch.float32, fmt, True, device, shape=(2, 4, 3, 3))
    g = rand(x.shape, torch.float32, fmt, device)
    out, mean, var = ops.bn_act_fwd(x, w, b, r, 1e-5, True)
    rg = lambda t: t.detach().clone().requires_grad_()  # noqa: E731
    torch.library.opcheck(ops.bn_act_fwd, (rg(x), rg(w), rg(b), rg(r), 1e-5, True))
    torch.library.opcheck(ops.bn_act_bwd, (g, x, out, w, mean, var, 1e-5, True, True))
    torch.library.opcheck(ops.bn_update_stats_, (torch.zeros(4, device=device), torch.ones(4, device=device),
                                                 mean, var, 0.1, 18))


@pytest.mark.parametrize("family", FAMILIES)
def test_opcheck_half(family):
    ops = Family(family)
    x, w, b, r = bn_case(torch.float16, torch.channels_last, True, shape=(2, 4, 3, 3))
    torch.library.opcheck(ops.bn_act_fwd, (x.requires_grad_(), w, b, r, 1e-5, True))


@pytest.mark.parametrize("family", FAMILIES)
def test_ops_compile_with_aot_autograd(family):
    ops = Family(family)
    x, w, b, r = bn_case(torch.float32, torch.channels_last, True, shape=(2, 4, 3, 3))

    def f(x, w, b, r):
        return ops.add_relu(ops.bn_act_fwd(x, w, b, None, 1e-5, True)[0], r)

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x, w, b, r), f(x, w, b, r))


@pytest.mark.parametrize("family", FAMILIES)
def test_ops_clear_errors(family):
    ops = Family(family)
    with pytest.raises((RuntimeError, ValueError), match="more than 1 value per channel"):
        ops.bn_act_fwd(rand((1, 4, 1, 1)), None, None, None, 1e-5, True)
    with pytest.raises((RuntimeError, ValueError), match="count must be > 1"):
        ops.bn_update_stats_(torch.zeros(4), torch.ones(4), torch.zeros(4), torch.ones(4), 0.1, 1)
