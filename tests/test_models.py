"""The drop-in contract: torchvision's API, state_dict and numerics (CPU, fp32)."""
import copy

import pytest
import torch
import torchvision
from torch import nn

import resnet_fast
from _models import eval_out, pair, randomize_bn
from _numerics import assert_2x, max_rel_err
from resnet_fast.ops import dispatch

TV_ARCHS = resnet_fast.models.TORCHVISION_ARCHS
D_ARCHS = resnet_fast.models.RESNET_D_ARCHS


@pytest.mark.parametrize("arch", TV_ARCHS)
def test_state_dict_identical_both_ways(arch):
    torch.manual_seed(0)
    tv = getattr(torchvision.models, arch)(num_classes=7)
    fast = getattr(resnet_fast, arch)(num_classes=7)
    tv_sd, fast_sd = tv.state_dict(), fast.state_dict()
    assert list(tv_sd) == list(fast_sd)
    for k in tv_sd:
        assert tv_sd[k].shape == fast_sd[k].shape and tv_sd[k].dtype == fast_sd[k].dtype, k
    fast.load_state_dict(tv_sd, strict=True)
    tv.load_state_dict(fast.state_dict(), strict=True)
    assert all(torch.equal(tv.state_dict()[k], fast.state_dict()[k]) for k in tv_sd)


@pytest.mark.parametrize("arch", TV_ARCHS)
def test_eval_matches_torchvision(arch):
    tv, fast = pair(arch, num_classes=10)
    x = torch.randn(2, 3, 32, 32)
    dispatch.CALLS.clear()
    with torch.inference_mode():
        expected, got = tv(x), fast(x)
    assert got.shape == expected.shape and got.dtype == expected.dtype
    assert max_rel_err(got, expected) < 1e-5
    fused = sum(n for (op, impl), n in dispatch.CALLS.items() if op.endswith("conv_bias_act") and impl == "onednn")
    assert fused > 0 and dispatch.CALLS[("conv_bn_act", "modules")] == 0  # the fused path ran


def test_signatures_match_torchvision():
    import inspect
    for arch in TV_ARCHS:
        ours = inspect.signature(getattr(resnet_fast, arch)).parameters
        theirs = inspect.signature(getattr(torchvision.models, arch)).parameters
        assert list(ours) == list(theirs), arch
    ours = list(inspect.signature(resnet_fast.ResNet).parameters)
    theirs = list(inspect.signature(torchvision.models.ResNet).parameters)
    assert ours[: len(theirs)] == theirs


def test_torchvision_kwargs():
    kwargs = dict(num_classes=5, zero_init_residual=True, replace_stride_with_dilation=[False, True, True])
    tv, fast = pair("resnet50", **kwargs)
    x = torch.randn(1, 3, 48, 48)
    with torch.inference_mode():
        assert max_rel_err(fast(x), tv(x)) < 1e-5
    fresh = resnet_fast.resnet50(**kwargs)
    assert all(float(b.bn3.weight.abs().sum()) == 0 for layer in (fresh.layer1, fresh.layer4) for b in layer)
    with pytest.raises(ValueError, match="groups"):
        resnet_fast.resnext50_32x4d(groups=8)


def test_in_channels_and_fine_tuned_conversion():
    torch.manual_seed(0)
    tv = torchvision.models.resnet18(num_classes=3)
    tv.conv1 = nn.Conv2d(1, 64, 7, 2, 3, bias=False)
    tv.fc = nn.Sequential(nn.Dropout(0.2), nn.Linear(512, 3))
    randomize_bn(tv).eval()
    fast = resnet_fast.from_torchvision(tv)
    assert not fast.training
    x = torch.randn(2, 1, 40, 40)
    with torch.inference_mode():
        assert max_rel_err(fast(x), tv(x)) < 1e-5
    # copied, not shared
    assert fast.conv1.weight.data_ptr() != tv.conv1.weight.data_ptr()
    assert resnet_fast.resnet18(in_channels=1).conv1.in_channels == 1


def test_frozen_batchnorm_norm_layer():
    from torchvision.ops.misc import FrozenBatchNorm2d
    torch.manual_seed(0)
    tv = torchvision.models.resnet18(norm_layer=FrozenBatchNorm2d)
    for m in tv.modules():
        if isinstance(m, FrozenBatchNorm2d):
            m.running_var.uniform_(0.5, 1.5)
            m.weight.uniform_(0.5, 1.5)
    fast = resnet_fast.from_torchvision(tv)
    x = torch.randn(1, 3, 32, 32)
    with torch.inference_mode():
        assert max_rel_err(fast(x), tv(x)) < 1e-5


# --- ResNet-D --------------------------------------------------------------

def reference_forward(model, x):
    """Module-by-module forward of a resnet_fast model (no fused ops)."""
    x = model.relu(model.bn1(model.conv1(x)))
    x = model.maxpool(x)
    for layer in (model.layer1, model.layer2, model.layer3, model.layer4):
        for b in layer:
            identity = b.downsample(x) if b.downsample is not None else x
            out = b.relu(b.bn1(b.conv1(x)))
            if hasattr(b, "conv3"):
                out = b.relu(b.bn2(b.conv2(out)))
                out = b.bn3(b.conv3(out))
            else:
                out = b.bn2(b.conv2(out))
            x = b.relu(out + identity)
    return model.fc(torch.flatten(model.avgpool(x), 1))


@pytest.mark.parametrize("arch", D_ARCHS)
def test_resnet_d_structure_and_eval(arch):
    torch.manual_seed(0)
    model = randomize_bn(getattr(resnet_fast, arch)(num_classes=10)).eval()
    stem = model.conv1
    assert [m.out_channels for m in stem if isinstance(m, nn.Conv2d)] == [32, 32, 64]
    assert stem[0].stride == (2, 2) and stem[0].kernel_size == (3, 3)
    ds = model.layer2[0].downsample
    assert isinstance(ds[0], nn.AvgPool2d) and ds[1].stride == (1, 1) and ds[1].kernel_size == (1, 1)
    x = torch.randn(2, 3, 33, 33)
    with torch.inference_mode():
        assert max_rel_err(model(x), reference_forward(model, x)) < 1e-5


def test_resnet_d_zero_init_residual():
    m = resnet_fast.resnet50d(zero_init_residual=True)
    assert float(m.layer3[2].bn3.weight.abs().sum()) == 0


# --- train mode --------------------------------------------------------------

@pytest.mark.parametrize("arch", ["resnet18", "resnet50", "resnext50_32x4d"])
def test_train_mode_matches_torchvision(arch):
    """Exact semantics in float64: outputs, every gradient and every BN buffer after one
    train-mode step equal torchvision's to 1e-9. (In float32 a pre-ReLU value within
    rounding of zero can fall on either side of zero depending on summation order and
    flip a mask bit, which BatchNorm's backward spreads upstream; float64 has no flips.
    float32 outputs are checked below and in test_train_parity.py.)"""
    torch.manual_seed(0)
    tv = randomize_bn(getattr(torchvision.models, arch)(num_classes=4)).train().double()
    fast = resnet_fast.from_torchvision(tv)
    assert fast.training
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    dispatch.CALLS.clear()
    out_tv, out_fast = tv(x), fast(x)
    assert sum(n for (op, _), n in dispatch.CALLS.items() if op == "bn_act") > 0  # the fused op ran
    assert max_rel_err(out_fast, out_tv) < 1e-9
    out_tv.square().sum().backward()
    out_fast.square().sum().backward()
    for (name, p_tv), p_fast in zip(tv.named_parameters(), fast.parameters()):
        assert max_rel_err(p_fast.grad, p_tv.grad) < 1e-9, name
    for (name, b_tv), b_fast in zip(tv.named_buffers(), fast.buffers()):
        torch.testing.assert_close(b_fast, b_tv, rtol=1e-9, atol=1e-12, msg=name)


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_train_mode_fp32_outputs_two_x_rule(arch):
    torch.manual_seed(0)
    tv = randomize_bn(getattr(torchvision.models, arch)(num_classes=4)).train()
    ref = copy.deepcopy(tv).double()
    fast = resnet_fast.from_torchvision(tv)
    x = torch.randn(8, 3, 64, 64)
    out_ref, out_tv, out_fast = ref(x.double()), tv(x), fast(x)
    assert_2x(out_fast, out_tv, out_ref)


def test_train_mode_torch_backend_is_torchvision():
    torch.manual_seed(0)
    tv = randomize_bn(torchvision.models.resnet18(num_classes=4)).train()
    fast = resnet_fast.from_torchvision(tv)
    x = torch.randn(4, 3, 32, 32)
    with resnet_fast.use_backend("torch"):
        torch.testing.assert_close(fast(x), tv(x), rtol=1e-6, atol=1e-6)


def test_eval_with_autograd_is_differentiable():
    tv, fast = pair("resnet18", num_classes=10)
    x1 = torch.randn(2, 3, 32, 32, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_()
    tv(x1).sum().backward()
    fast(x2).sum().backward()
    assert max_rel_err(x2.grad, x1.grad) < 1e-4
    assert max_rel_err(fast.layer1[0].bn1.weight.grad, tv.layer1[0].bn1.weight.grad) < 1e-4


# --- inputs ------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(2, 3, 1, 1), (1, 3, 7, 9), (3, 3, 64, 48)])
def test_spatial_sizes(shape):
    tv, fast = pair("resnet50", num_classes=10)
    x = torch.randn(shape)
    with torch.inference_mode():
        assert max_rel_err(fast(x), tv(x)) < 1e-5


def test_channels_last_input():
    tv, fast = pair("resnet18", num_classes=10)
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        assert max_rel_err(fast(x), tv(x.contiguous())) < 1e-5


def test_batch_zero():
    tv, fast = pair("resnet18", num_classes=10)
    with torch.inference_mode():
        out = fast(torch.randn(0, 3, 32, 32))
    assert out.shape == (0, 10) and out.dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_two_x_rule(dtype):
    tv, fast = pair("resnet18", num_classes=10)
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        ref = tv.double()(x.double())
        eager = tv.to(dtype)(x.to(dtype))
        got = fast.to(dtype)(x.to(dtype))
    assert got.dtype == dtype
    assert_2x(got, eager, ref)


def test_autocast_cpu_bf16():
    tv, fast = pair("resnet18", num_classes=10)
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        ref = tv.double()(x.double())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = fast(x)
            eager = tv.float()(x)
    assert got.dtype == eager.dtype == torch.bfloat16
    assert_2x(got, eager, ref)


@pytest.mark.parametrize("bad, exc, match", [
    (torch.randn(3, 32, 32), ValueError, "4D input"),
    (torch.randn(1, 4, 32, 32), ValueError, "3 input channels"),
    (torch.ones(1, 3, 32, 32, dtype=torch.int64), TypeError, "floating-point"),
    (torch.randn(1, 3, 32, 32, dtype=torch.float16), TypeError, "does not match the model"),
    ([[1.0]], TypeError, "torch.Tensor"),
])
def test_bad_inputs(bad, exc, match):
    model = resnet_fast.resnet18().eval()
    with pytest.raises(exc, match=match):
        model(bad)


def test_bad_state_dict_lists_every_problem():
    model = resnet_fast.resnet18()
    sd = model.state_dict()
    sd.pop("layer1.0.conv1.weight")
    sd["extra.weight"] = torch.zeros(1)
    sd["fc.weight"] = torch.zeros(3, 512)
    with pytest.raises(ValueError) as info:
        resnet_fast.resnet18(weights=sd)
    msg = str(info.value)
    assert "layer1.0.conv1.weight" in msg and "extra.weight" in msg and "fc.weight: expected (1000, 512)" in msg


def test_weights_from_file_and_state_dict(tmp_path):
    tv = randomize_bn(torchvision.models.resnet18(num_classes=10)).eval()
    path = tmp_path / "tv.pt"
    torch.save(tv.state_dict(), path)
    x = torch.randn(1, 3, 32, 32)
    expected = eval_out(tv, x)
    for weights in (str(path), path, tv.state_dict(), {"model": tv.state_dict()}):
        model = resnet_fast.resnet18(weights=weights if not isinstance(weights, dict) or "model" not in weights
                                     else _save(tmp_path, weights), num_classes=10).eval()
        assert max_rel_err(eval_out(model, x), expected) < 1e-5
    with pytest.raises(FileNotFoundError):
        resnet_fast.resnet18(weights=str(tmp_path / "missing.pt"))


def _save(tmp_path, obj):
    path = tmp_path / "ckpt.pt"
    torch.save(obj, path)
    return path


def test_torchvision_weights_enum_is_resolved_through_torchvision():
    # No network here: a wrong enum name must fail in torchvision's verify, before any download.
    with pytest.raises(ValueError):
        resnet_fast.resnet50(weights="NO_SUCH_WEIGHTS")
    with pytest.raises(ValueError, match="no pretrained weights"):
        resnet_fast.resnet50d(weights="DEFAULT")


# --- torch.compile ---------------------------------------------------------------

@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_fullgraph_eval(backend):
    torch._dynamo.reset()
    tv, fast = pair("resnet18", num_classes=10)
    x = torch.randn(2, 3, 32, 32)
    compiled = torch.compile(fast, fullgraph=True, backend=backend)  # fullgraph: a graph break raises
    with torch.no_grad():
        assert max_rel_err(compiled(x), tv(x)) < 1e-5


def test_compile_fullgraph_train_step():
    torch._dynamo.reset()
    torch.manual_seed(0)
    tv = randomize_bn(torchvision.models.resnet18(num_classes=4)).train()
    fast = resnet_fast.from_torchvision(tv)
    compiled = torch.compile(fast, fullgraph=True, backend="aot_eager")
    x = torch.randn(4, 3, 32, 32)
    compiled(x).square().sum().backward()
    tv(x).square().sum().backward()
    assert max_rel_err(fast.conv1.weight.grad, tv.conv1.weight.grad) < 1e-3


# --- residual buffers reused only when nothing can see them -------------------------

def test_block_called_directly_keeps_its_input():
    _, fast = pair("resnet18", num_classes=10)
    x = torch.randn(1, 64, 8, 8).contiguous(memory_format=torch.channels_last)
    before = x.clone()
    with torch.inference_mode():
        fast.layer1[1](x)  # identity shortcut: its residual is x itself
    assert torch.equal(x, before)


def test_hooked_activations_are_not_overwritten():
    tv, fast = pair("resnet18", num_classes=10)
    seen = {}

    def keep(module, inputs, output):
        seen["ref"], seen["copy"] = output, output.clone()

    fast.layer1[0].register_forward_hook(keep)  # its output is layer1[1]'s residual
    x = torch.randn(1, 3, 32, 32)
    with torch.inference_mode():
        assert max_rel_err(fast(x), tv(x)) < 1e-5
    assert torch.equal(seen["ref"], seen["copy"])


# --- every backend, whole models ------------------------------------------------------

@pytest.mark.parametrize("backend", ["triton", "ext"])
@pytest.mark.parametrize("arch", ["resnet18", "resnet50", "resnet50d"])
def test_eval_on_each_backend_matches_torch_and_torchvision(arch, backend):
    """eval() on "triton" (CPU tensors under the interpreter, CUDA on a GPU) and "ext" matches backend
    "torch" and torchvision, with every conv and pooling step on the requested implementation."""
    from _backends import DEVICE, skip_unless_usable
    from resnet_fast.ops.triton._common import LAUNCHES
    skip_unless_usable(backend)
    torch.manual_seed(0)
    model = randomize_bn(getattr(resnet_fast, arch)(num_classes=10)).eval().to(DEVICE)
    x = torch.randn(1, 3, 20, 20, device=DEVICE)
    # TF32 (allowed for convs by default on CUDA) bounds fp32 agreement at ~1e-3.
    tol = 1e-2 if DEVICE.type == "cuda" and torch.backends.cudnn.allow_tf32 else 1e-4
    with torch.inference_mode():
        with resnet_fast.use_backend("torch"):
            ref = model(x)
        LAUNCHES.clear()
        dispatch.CALLS.clear()
        with resnet_fast.use_backend(backend):
            got = model(x)
        if arch in TV_ARCHS:
            tv = getattr(torchvision.models, arch)(num_classes=10).to(DEVICE).eval()
            tv.load_state_dict(model.state_dict())
            assert max_rel_err(got, tv(x)) < tol
    convs = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    assert dispatch.CALLS[("conv_bias_act", backend)] == convs  # every conv went to the backend...
    if backend == "triton":  # ...and launched its kernel, as did the pools (+ the fc, a 1x1 conv)
        assert sum(n for k, n in LAUNCHES.items() if k.startswith("conv_bias_act")) == convs + 1
        assert LAUNCHES["max_pool_3x3s2"] == 1 and LAUNCHES["global_avg_pool"] == 1
        assert LAUNCHES["avg_pool_2x2_ceil"] == (3 if arch.endswith("d") else 0)  # layers 2-4 shortcuts
    assert max_rel_err(got, ref) < tol
