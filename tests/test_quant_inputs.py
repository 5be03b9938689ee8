"""INT8: bad inputs and models are refused with one clear line, the VNNI decision, and every builder quantizes."""
import pytest
import torch
from torch import nn

import resnet_fast
from resnet_fast.quant import isa, kernels
from resnet_fast.quant.structure import UnsupportedModel
from tests._quant import batches, small_model


@pytest.fixture(scope="module")
def qmodel():
    return resnet_fast.quantize(small_model(), batches(1))


def _one_line(exc) -> str:
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


def test_empty_calibration_is_refused():
    with pytest.raises(ValueError, match="calibration yielded no batches") as e:
        resnet_fast.quantize(small_model(), [])
    _one_line(e)


@pytest.mark.parametrize("bad,err,match", [
    (torch.randn(2, 4, 32, 32), ValueError, r"expected shape \(N>0, 3, H, W\)"),
    (torch.randint(0, 255, (2, 3, 32, 32), dtype=torch.uint8), TypeError, "floating-point"),
    ("images", TypeError, "expected a tensor"),
])
def test_bad_calibration_batches_are_refused(bad, err, match):
    with pytest.raises(err, match=match) as e:
        resnet_fast.quantize(small_model(), [batches(1)[0], bad])
    assert "batch 1" in _one_line(e)


@pytest.mark.parametrize("bad,err,match", [
    (torch.randn(2, 4, 32, 32), ValueError, r"\(N, 3, H, W\)"),
    (torch.randn(3, 32, 32), ValueError, r"\(N, 3, H, W\)"),
    (torch.randint(0, 255, (2, 3, 32, 32), dtype=torch.uint8), TypeError, "floating-point"),
])
def test_bad_forward_inputs_are_refused(qmodel, bad, err, match):
    with torch.no_grad(), pytest.raises(err, match=match) as e:
        qmodel(bad)
    _one_line(e)


def test_train_and_autograd_are_refused(qmodel):
    with pytest.raises(RuntimeError, match="inference-only"):
        qmodel.train()
    assert not qmodel.training
    qmodel.eval()  # allowed
    with pytest.raises(RuntimeError, match="torch.no_grad"):
        qmodel(batches(1)[0])


def test_model_in_training_mode_is_refused():
    with pytest.raises(ValueError, match="model.eval"):
        resnet_fast.quantize(small_model().train(), batches(1))


class _CustomBlock(nn.Module):
    def forward(self, x):
        return x


@pytest.mark.parametrize("edit,name", [
    (lambda m: setattr(m.layer2[0], "relu", nn.GELU()), "layer2.0.relu is GELU"),
    (lambda m: setattr(m, "relu", nn.SiLU()), "relu is SiLU"),
    (lambda m: m.layer3.__setitem__(1, _CustomBlock()), "layer3.1 is _CustomBlock"),
    (lambda m: setattr(m.layer1[1], "bn2", nn.GroupNorm(8, 64)), "layer1.1.bn2 is GroupNorm"),
    (lambda m: setattr(m, "avgpool", nn.AdaptiveMaxPool2d(1)), "avgpool is AdaptiveMaxPool2d"),
])
def test_unsupported_modules_are_refused_by_name(edit, name):
    model = small_model()
    edit(model)
    with pytest.raises(UnsupportedModel, match=name) as e:
        resnet_fast.quantize(model, batches(1))
    _one_line(e)


def test_vnni_decision():
    vnni = {"avx512_vnni": True}
    assert isa.has_exact_int8(vnni, "x86_64") and isa.weight_qmax(vnni, "x86_64") == 127
    assert isa.has_exact_int8({"avx_vnni": True}, "x86_64")  # AVX2-VNNI (client CPUs)
    assert isa.has_exact_int8({"amx_int8": True}, "x86_64")
    plain = {"avx512_vnni": False, "avx2": True}
    assert not isa.has_exact_int8(plain, "x86_64") and isa.weight_qmax(plain, "x86_64") == 63
    assert isa.weight_qmax(vnni, "aarch64") == 63


def test_without_vnni_weights_use_7_bits_and_8_bit_models_are_refused(monkeypatch, qmodel):
    monkeypatch.setattr(isa, "cpu_capabilities", lambda: {"avx512_vnni": False})
    with pytest.warns(UserWarning, match="7 bits"):
        q7 = resnet_fast.quantize(small_model(), batches(1))
    assert max(int(c.weight.abs().max()) for c in q7.stem) <= 63
    assert int(q7.weight_qmax) == 63
    with torch.no_grad():
        q7(batches(1)[0])  # runs: no pair of u8*s7 products can saturate int16
        loaded = resnet_fast.load_quantized(qmodel.state_dict())
        with pytest.raises(RuntimeError, match="8-bit weights"):
            loaded(batches(1)[0])


def test_this_cpu_uses_full_int8_when_it_has_vnni(qmodel):
    if not isa.has_exact_int8(isa.cpu_capabilities()):
        pytest.skip("this CPU has no VNNI")
    assert int(qmodel.weight_qmax) == 127


@pytest.mark.parametrize("arch", resnet_fast.ARCHS)
def test_every_builder_quantizes_and_runs(arch):
    model = small_model(arch)
    x = batches(1, size=32, batch=2)[0]
    q = resnet_fast.quantize(model, [x])
    before = kernels.CALLS["conv"] + kernels.CALLS["conv_sum_relu"]
    with torch.no_grad():
        y, want = q(x), model(x)
    n_convs = len(q.stem) + sum(len(b.convs) + (b.shortcut is not None) for b in q.blocks)
    assert kernels.CALLS["conv"] + kernels.CALLS["conv_sum_relu"] - before == n_convs
    assert y.shape == want.shape and torch.isfinite(y).all()
    assert (y - want).abs().max() < 0.25 * (want.max() - want.min()) + 1e-3
