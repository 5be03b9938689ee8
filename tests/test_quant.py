"""INT8 (resnet_fast.quantize): each oneDNN int8 layer and the whole model against the plain-torch fake-quant
reference (resnet_fast/quant/reference.py), calibration determinism, the state_dict round trip and the
invalidation of the prepacked weights."""
import gc

import pytest
import torch

import resnet_fast
from resnet_fast.quant import kernels, reference
from resnet_fast.quant.structure import ConvSpec
from tests._quant import batches, small_model

CL = torch.channels_last


def _codes(shape, seed, lo=0, hi=256):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(lo, hi, shape, generator=g, dtype=torch.uint8).contiguous(memory_format=CL)


def _layer(seed, groups=1, stride=1, out_ch=16, in_ch=16, k=3, pow2=True):
    """A random int8 conv; with pow2 every scale and bias is a power-of-two multiple, so oneDNN's fp32
    requantization is exact and the codes must match the reference bit for bit."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randint(-127, 128, (out_ch, in_ch // groups, k, k), generator=g, dtype=torch.int8)
    if pow2:
        w_scale = 2.0 ** -torch.randint(6, 9, (out_ch,), generator=g).double()
        bias = torch.randint(-64, 64, (out_ch,), generator=g).double() * 2.0 ** -4
        x_qp, out_qp = (2.0 ** -5, 3), (2.0 ** 1, 7)
    else:
        w_scale = torch.rand(out_ch, generator=g).double() * 0.01 + 0.001
        bias = torch.randn(out_ch, generator=g).double()
        x_qp, out_qp = (0.0371, 3), (1.913, 7)
    geometry = [stride, stride, k // 2, k // 2, 1, 1, groups]
    packed = kernels.PackedConv(w, w_scale.float(), bias.float(), geometry, x_qp, out_qp)
    spec = ConvSpec("c", w.double() * w_scale.view(-1, 1, 1, 1), bias, (stride,) * 2, (k // 2,) * 2, (1, 1),
                    groups, True)
    return packed, spec, x_qp, out_qp


@pytest.mark.parametrize("groups,stride,k", [(1, 1, 3), (1, 2, 3), (1, 1, 1), (1, 2, 1), (4, 1, 3), (1, 2, 7)])
@pytest.mark.parametrize("relu", [True, False])
def test_conv_matches_fake_quant_exactly(groups, stride, k, relu):
    packed, spec, x_qp, out_qp = _layer(seed=groups * 10 + stride + k, groups=groups, stride=stride, k=k)
    spec = spec._replace(relu=relu)
    x = _codes((2, 16, 9, 9), seed=k)
    before = kernels.CALLS["conv"]
    got = kernels.conv(x, packed, relu)
    assert kernels.CALLS["conv"] == before + 1 and got.dtype == torch.uint8
    want = reference.conv(x, x_qp, spec, out_qp)
    assert 0 < got.float().mean() < 255  # neither saturated nor all zero: the comparison means something
    assert torch.equal(got.double(), want)


def test_conv_sum_relu_matches_fake_quant_exactly():
    packed, spec, x_qp, out_qp = _layer(seed=3)
    x, accum = _codes((2, 16, 8, 8), seed=1), _codes((2, 16, 8, 8), seed=2)
    accum_qp = (2.0 ** -1, 100)
    want = reference.conv(x, x_qp, spec, out_qp, accum, accum_qp)
    before = kernels.CALLS["conv_sum_relu"]
    got = kernels.conv(x, packed, True, accum.clone(), accum_qp)
    assert kernels.CALLS["conv_sum_relu"] == before + 1
    assert torch.equal(got.double(), want)


def test_conv_with_arbitrary_scales_is_off_by_at_most_one_rarely():
    # oneDNN requantizes in fp32, the reference in fp64: values within fp32 rounding of a .5 may round apart.
    packed, spec, x_qp, out_qp = _layer(seed=5, pow2=False)
    x = _codes((2, 16, 12, 12), seed=4)
    diff = (kernels.conv(x, packed, True).double() - reference.conv(x, x_qp, spec, out_qp)).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() < 0.01


def test_pools_on_codes_are_exact():
    x = _codes((2, 64, 15, 15), seed=9)
    want = torch.nn.functional.max_pool2d(x.double(), 3, 2, 1)
    assert torch.equal(kernels.max_pool(x, 3, 2, 1, False).double(), want)
    assert torch.equal(kernels.max_pool(x, 2, 2, 0, True).double(), torch.nn.functional.max_pool2d(
        x.double(), 2, 2, 0, ceil_mode=True))
    from resnet_fast.quant.structure import PoolSpec
    p = PoolSpec("avg", 2, 2, 0, True, False)
    assert torch.equal(kernels.avg_pool(x, 2, 2, 0, True, False).double(), reference.avg_pool(x, p))


def test_input_quantization_matches_reference():
    x = torch.randn(2, 3, 8, 8) * 3
    got = kernels.quantize_input(x, 0.0371, 120)
    assert got.is_contiguous(memory_format=CL)
    assert torch.equal(got.double(), reference.quantize(x, (0.0371, 120)))


@pytest.mark.parametrize("arch", ["resnet18", "resnet50", "resnet18d", "resnext50_32x4d"])
def test_model_matches_fake_quant_model(arch):
    model = small_model(arch)
    data = batches()
    q = resnet_fast.quantize(model, data)
    x = batches(1, seed=7)[0]
    before = dict(kernels.CALLS)
    with torch.no_grad():
        got, fp32 = q(x), model(x)
    want = reference.forward(q, x)
    n_blocks = len(q.blocks)
    assert kernels.CALLS["conv_sum_relu"] - before.get("conv_sum_relu", 0) == n_blocks
    # off-by-one codes (see reference.py) propagate: a small fraction of the logit range
    span = (want.max() - want.min()).item()
    assert (got.double() - want).abs().max() < 0.03 * span
    assert (got - fp32).abs().max() < 0.15 * (fp32.max() - fp32.min())  # and int8 is close to fp32


def test_calibration_is_deterministic_and_order_independent():
    model, data = small_model(), batches(3)
    a = resnet_fast.quantize(model, data).state_dict()
    b = resnet_fast.quantize(model, [(x, 0) for x in reversed(data)]).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("observer", ["mse", "percentile", "minmax"])
def test_observers_give_valid_qparams(observer):
    q = resnet_fast.quantize(small_model(), batches(1), observer=observer)
    scales = [c.out_scale.item() for b in q.blocks for c in b.convs]
    assert all(s > 0 for s in scales)
    assert all(int(c.out_zero_point) == 0 for b in q.blocks for c in b.convs)  # post-ReLU: zero point 0


@pytest.mark.parametrize("outlier", [None, 200.0])
def test_mse_observer_has_the_least_error(outlier):
    from resnet_fast.quant.observers import METHODS, HistogramObserver
    g = torch.Generator().manual_seed(0)
    t = (-torch.rand(1_000_000, generator=g).log()) * torch.randn(1_000_000, generator=g).sign()  # Laplace
    if outlier is not None:
        t[0] = outlier
    qparams = {}
    for m in METHODS:
        o = HistogramObserver(m)
        o.observe_range(t)
        o.observe_histogram(t)
        qparams[m] = o.qparams()

    def error(qp):
        return ((reference.dequantize(reference.quantize(t, qp), qp) - t) ** 2).mean().item()
    errors = {m: error(qp) for m, qp in qparams.items()}
    assert errors["mse"] <= 1.01 * min(errors.values()), errors
    if outlier is not None:  # a far outlier: MSE trades some clipping for resolution, min/max does not
        assert qparams["mse"][0] < 0.7 * qparams["minmax"][0]


def test_state_dict_round_trip(tmp_path):
    q = resnet_fast.quantize(small_model("resnet18d"), batches())
    path = tmp_path / "int8.pt"
    torch.save(q.state_dict(), path)
    loaded = resnet_fast.load_quantized(torch.load(path, weights_only=True))
    x = batches(1, seed=5)[0]
    with torch.no_grad():
        assert torch.equal(q(x), loaded(x))


def _two_quantized():
    """An input, two models quantized from different weights, and their outputs on it."""
    x = batches(1, seed=5)[0]
    q1 = resnet_fast.quantize(small_model(seed=0), batches())
    q2 = resnet_fast.quantize(small_model(seed=1), batches())
    with torch.no_grad():
        return x, q1, q2, q1(x), q2(x)


def test_load_state_dict_and_inplace_edits_repack():
    x, q1, q2, y1, y2 = _two_quantized()
    with torch.no_grad():
        assert not torch.equal(y1, y2)
        q1.load_state_dict(q2.state_dict())
        assert torch.equal(q1(x), y2)  # the cached plan of q1's old weights is not used
        q1.stem[0].weight.mul_(-1)
        assert not torch.equal(q1(x), y2)
        packs = kernels.CALLS["prepack"]
        q1(x)
        assert kernels.CALLS["prepack"] == packs  # unchanged buffers: the prepacked weights are reused


def test_data_writes_are_seen_at_eval_and_replaced_buffers_at_once():
    x, q1, q2, y1, y2 = _two_quantized()
    with torch.no_grad():
        q1.stem[0].weight.data.copy_(q2.stem[0].weight)  # `.data`: a version counter of its own
        q1.eval()
        assert not torch.equal(q1(x), y1)
        q1.load_state_dict(q2.state_dict())
        q1.stem[0].weight = q2.stem[0].weight.clone()  # a new buffer object, same values
        assert torch.equal(q1(x), y2)
        q1.stem[0].weight = -q2.stem[0].weight  # a new buffer object, other values: not the cached plan
        assert not torch.equal(q1(x), y2)


def test_plan_cache_does_not_keep_the_model_alive():
    from resnet_fast.quant import qmodule
    q = resnet_fast.quantize(small_model(), batches(1))
    with torch.no_grad():
        q(batches(1)[0])
    n = len(qmodule._PLANS)
    del q
    gc.collect()
    assert len(qmodule._PLANS) == n - 1


def test_channels_last_and_inference_mode_inputs():
    q = resnet_fast.quantize(small_model(), batches(1))
    x = batches(1, seed=3)[0]
    with torch.no_grad():
        y = q(x)
    with torch.inference_mode():
        assert torch.equal(q(x.contiguous(memory_format=CL)), y)
        assert q(x[:0]).shape == (0, 10)


@pytest.mark.parametrize("shape", [(1, 3, 7, 7), (2, 40, 9, 8), (1, 64, 15, 15), (2, 70, 1, 2)])
def test_extension_max_pool_on_uint8_is_exact(shape):
    from resnet_fast.ops import ext
    if not ext.available("cpu"):
        pytest.skip("resnet_fast._C not built")
    x = _codes(shape, seed=sum(shape))
    got = torch.ops.resnet_fast.max_pool_3x3s2(x)
    assert got.dtype == torch.uint8 and got.is_contiguous(memory_format=CL)
    assert torch.equal(got.double(), torch.nn.functional.max_pool2d(x.double(), 3, 2, 1))
