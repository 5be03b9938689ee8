"""The CPU eval forward (models/cpu_runner.py + ops/onednn.py): it runs when it may, gives the module-by-module
answer, never uses a stale weight or a stale plan, never writes into the caller's input, and in steady
state runs one oneDNN primitive per conv: no weight or activation reorder."""
import copy

import pytest
import torch
from torch import nn

import resnet_fast
from resnet_fast import fold
from resnet_fast.models import cpu_runner
from resnet_fast.ops import dispatch, onednn

from _numerics import assert_2x, rand

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")

SMALL = dict(num_classes=7)


def _randomized(model: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.num_features, generator=g) * 0.5 + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model.eval()


@pytest.fixture
def runs(monkeypatch):
    """How many forwards went through the runner."""
    calls = []
    real = cpu_runner._run
    monkeypatch.setattr(cpu_runner, "_run", lambda *a: calls.append(1) or real(*a))
    return calls


def _module_by_module(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    # A hook on a module the runner would not call keeps it out (one on the model would not: its
    # forward runs the runner, and model(x) calls the hook).
    handle = model.layer1.register_forward_pre_hook(lambda m, i: None)
    try:
        return model(x)
    finally:
        handle.remove()


@pytest.mark.parametrize("arch", ["resnet18", "resnet50d", "resnext50_32x4d"])
def test_runner_matches_module_by_module(arch, runs):
    model = _randomized(getattr(resnet_fast, arch)(**SMALL))
    x = rand((2, 3, 40, 40))
    with torch.no_grad():
        before = dict(dispatch.CALLS)
        got = model(x)
        counted = sum(n - before.get(k, 0) for k, n in dispatch.CALLS.items() if k[1] == "onednn")
        assert len(runs) == 1
        convs = sum(isinstance(m, nn.Conv2d) for m in model.modules())
        assert counted == convs  # every conv counted on oneDNN, exactly once
        want = _module_by_module(model, x)
    assert len(runs) == 1
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_runner_stays_out_when_it_must(runs):
    model = _randomized(resnet_fast.resnet18(**SMALL))
    x = rand((2, 3, 32, 32))
    model(x)  # autograd on
    with torch.no_grad():
        model.train()(x)
        model.eval()
        model.layer2[0].bn1.train()  # one BN on batch statistics
        model(x)
        model.layer2[0].bn1.eval()
        if dispatch.ext_usable(x.device):
            with resnet_fast.use_backend("ext"):
                model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(x)
    assert not runs
    with torch.no_grad():
        model(x)
    assert len(runs) == 1


def test_hooks_fire_and_keep_the_runner_out(runs):
    model = _randomized(resnet_fast.resnet18(**SMALL))
    seen = []
    handle = model.layer3.register_forward_hook(lambda m, i, o: seen.append(o.clone()))
    with torch.no_grad():
        model(rand((1, 3, 32, 32)))
        assert len(seen) == 1 and not runs
        handle.remove()
        handle = nn.modules.module.register_module_forward_hook(lambda m, i, o: None)
        try:
            model(rand((1, 3, 32, 32)))
        finally:
            handle.remove()
        assert not runs
        model(rand((1, 3, 32, 32)))
    assert len(runs) == 1


def test_no_stale_weights_or_plan(runs):
    model = _randomized(resnet_fast.resnet18(**SMALL))
    x = rand((2, 3, 32, 32))
    with torch.no_grad():
        model(x)
        model.layer1[0].bn2.running_var.mul_(3.0)  # in-place edit of a folded source
        model.layer2[1].conv1.weight.add_(0.05)
        model.layer3[0].downsample[0] = copy.deepcopy(model.layer3[0].downsample[0])  # a replaced submodule
        model.layer3[0].downsample[0].weight.mul_(-1)
        got = model(x)
        fresh = _randomized(resnet_fast.resnet18(**SMALL))
        fresh.load_state_dict(model.state_dict())
        want = _module_by_module(fresh, x)
    assert len(runs) == 2
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_the_callers_input_is_never_overwritten():
    model = _randomized(resnet_fast.resnet18(**SMALL))
    x = rand((1, 3, 32, 32)).contiguous(memory_format=torch.channels_last)
    kept = x.clone()
    with torch.no_grad():
        model(x)
        # a block called directly: its input is also its residual, and stays the caller's
        block_in = torch.relu(rand((1, 64, 8, 8))).contiguous(memory_format=torch.channels_last)
        block_kept = block_in.clone()
        model.layer1[0](block_in)
    assert torch.equal(x, kept) and torch.equal(block_in, block_kept)


def test_prepacked_weights_per_shape_are_bounded_and_reused():
    model = _randomized(resnet_fast.resnet18(**SMALL))
    sizes = [32 + 8 * i for i in range(onednn.SHAPES_PER_CONV + 2)]
    with torch.no_grad():
        for s in sizes:
            model(rand((1, 3, s, s)))
        packs = fold._CACHE[model.conv1][("onednn", torch.float32)].value
        assert len(packs.by_shape) == onednn.SHAPES_PER_CONV
        misses = fold.STATS["misses"]
        model(rand((1, 3, sizes[-1], sizes[-1])))
        assert fold.STATS["misses"] == misses  # a shape seen: nothing rebuilt


def _onednn_log(capfd, run) -> list[str]:
    capfd.readouterr()
    with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
        run()
    return [line for line in capfd.readouterr().out.splitlines() if line.startswith("onednn_verbose")
            and ",exec," in line]


@pytest.mark.parametrize("batch,size", [(1, 64), (3, 48)])
def test_steady_state_runs_one_primitive_per_conv(capfd, batch, size):
    """No weight reorder (a weight packed for another shape is reordered on every call) and no activation
    reorder between layers; in torch's own ops, no activation copy either (channels_last input)."""
    model = _randomized(resnet_fast.resnet50(**SMALL))
    x = rand((batch, 3, size, size)).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        model(x)
        log = _onednn_log(capfd, lambda: model(x))
        with torch.profiler.profile(record_shapes=True) as prof:
            model(x)
    convs = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    assert sum(",convolution," in line for line in log) == convs
    assert [line for line in log if ",reorder," in line] == []
    copies = [e.name for e in prof.events() if e.name in ("aten::copy_", "aten::clone", "aten::contiguous")
              and any(len(shape) == 4 for shape in e.input_shapes)]
    assert copies == []  # (torch's avgpool and addmm copy a scalar and fc's bias: not activations)


def test_weights_packed_for_another_shape_are_what_the_reorder_check_catches(capfd, monkeypatch):
    """The check above can fail: weights packed without the input shape make oneDNN reorder them."""
    model = _randomized(resnet_fast.resnet50(**SMALL))
    x = rand((1, 3, 64, 64)).contiguous(memory_format=torch.channels_last)
    reorder = torch.ops.mkldnn._reorder_convolution_weight
    monkeypatch.setattr(torch.ops.mkldnn, "_reorder_convolution_weight",
                        lambda w, p, s, d, g, shape: reorder(w, p, s, d, g, None), raising=False)
    with torch.no_grad():
        model(x)
        log = _onednn_log(capfd, lambda: model(x))
    assert any(",reorder," in line for line in log)


def test_bf16_without_bf16_kernels_computes_in_fp32(monkeypatch, runs):
    """On a CPU without oneDNN bf16 kernels a bf16 model runs its convs in fp32 and returns bf16,
    within the 2x rule; where the CPU has them, the convs run in bf16, also within it."""
    base = _randomized(resnet_fast.resnet18(**SMALL))
    x = rand((2, 3, 32, 32))
    with torch.no_grad():
        ref = copy.deepcopy(base).double()(x.double())
        eager = _module_by_module(copy.deepcopy(base).to(torch.bfloat16), x.to(torch.bfloat16))
        model = copy.deepcopy(base).to(torch.bfloat16)
        got = model(x.to(torch.bfloat16))
    assert got.dtype == torch.bfloat16 and len(runs) == 1
    assert_2x(got, eager, ref, torch.bfloat16, "bf16 logits")
    want = torch.float32 if not torch.ops.mkldnn._is_mkldnn_bf16_supported() else torch.bfloat16
    assert onednn.compute_dtype(torch.bfloat16) == want


def test_bf16_block_called_directly_on_a_cpu_without_bf16_kernels(monkeypatch):
    """conv_bn_eval outside the runner: the fp32 compute path, forced whatever this CPU has."""
    monkeypatch.setattr(onednn, "compute_dtype", lambda dtype: torch.float32)
    block = _randomized(resnet_fast.resnet18(**SMALL)).layer2[0]
    x = torch.relu(rand((2, 64, 8, 8)))
    with torch.no_grad():
        ref = copy.deepcopy(block).double()(x.double())
        eager_bf16 = copy.deepcopy(block).to(torch.bfloat16)._torchvision_forward(x.to(torch.bfloat16))
        got = copy.deepcopy(block).to(torch.bfloat16)(x.to(torch.bfloat16))
    assert got.dtype == torch.bfloat16
    assert_2x(got, eager_bf16, ref, torch.bfloat16, "bf16 block")
