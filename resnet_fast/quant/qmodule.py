"""QuantizedResNet: the int8 inference module quantize() returns.

It owns its quantized state as buffers (int8 weights, per-channel weight scales, fp32 biases, every
activation's scale and zero point, the conv geometry), so its state_dict loads with
torch.load(weights_only=True) and rebuilds with load_quantized() without the fp32 model or calibration.
Nothing in it is CPU-specific but the kernels (kernels.py): a GPU backend can run the same state.

The oneDNN arguments (Python scalars, weights prepacked per input shape) are derived from those buffers
and cached per model under the fp32 fold cache's rule: checked against the identity (weak reference),
storage and version counter of every buffer, so load_state_dict, an in-place edit or a replaced buffer
rebuilds them on the next forward, and dropped on eval() (a `.data` write has a version counter of its own);
the cache is weak (it dies with the model and never pins it).
"""
from __future__ import annotations

import re
import weakref
from typing import NamedTuple, Optional

import torch
from torch import Tensor, nn

from . import isa, kernels
from .structure import BlockSpec, ConvSpec, Net, PoolSpec

FORMAT = 1


class QConv(nn.Module):
    """One conv with its BN folded: int8 weight, per-output-channel scales, fp32 bias, its output's qparams."""

    def __init__(self, weight_shape: tuple[int, ...]):
        super().__init__()
        self.register_buffer("weight", torch.zeros(weight_shape, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(weight_shape[0]))
        self.register_buffer("bias", torch.zeros(weight_shape[0]))
        self.register_buffer("geometry", torch.zeros(7, dtype=torch.long))  # stride, padding, dilation (h, w), groups
        self.register_buffer("out_scale", torch.ones(()))
        self.register_buffer("out_zero_point", torch.zeros((), dtype=torch.long))

    @classmethod
    def from_spec(cls, c: ConvSpec, out_qparams: tuple[float, int], qmax: int) -> "QConv":
        m = cls(tuple(c.weight.shape))
        w = c.weight.float()
        scale = (w.abs().amax((1, 2, 3)) / qmax).clamp_min(1e-12)
        m.weight.copy_(torch.round(w / scale.view(-1, 1, 1, 1)).clamp(-qmax, qmax).to(torch.int8))
        m.weight_scale.copy_(scale)
        m.bias.copy_(c.bias)
        m.geometry.copy_(torch.tensor([*c.stride, *c.padding, *c.dilation, c.groups]))
        m.out_scale.fill_(out_qparams[0])
        m.out_zero_point.fill_(out_qparams[1])
        return m

    def out_qparams(self) -> tuple[float, int]:
        return self.out_scale.item(), int(self.out_zero_point)

    def spec(self, name: str, relu: bool) -> ConvSpec:
        """The conv as a Net entry with its dequantized (fp64) weight: what the fake-quant reference runs."""
        g = self.geometry.tolist()
        w = self.weight.double() * self.weight_scale.double().view(-1, 1, 1, 1)
        return ConvSpec(name, w, self.bias.double(), tuple(g[0:2]), tuple(g[2:4]), tuple(g[4:6]), g[6], relu)


def _pool_tensor(p: Optional[PoolSpec]) -> Tensor:
    if p is None:
        return torch.zeros(0, dtype=torch.long)
    return torch.tensor([p.kernel, p.stride, p.padding, int(p.ceil_mode), int(p.count_include_pad)])


def _pool_spec(kind: str, t: Tensor) -> Optional[PoolSpec]:
    if t.numel() == 0:
        return None
    k, s, p, ceil, include = t.tolist()
    return PoolSpec(kind, k, s, p, bool(ceil), bool(include))


class QBlock(nn.Module):
    def __init__(self, convs: list[QConv], shortcut: Optional[QConv], shortcut_pool: Tensor):
        super().__init__()
        self.convs = nn.ModuleList(convs)
        self.shortcut = shortcut
        self.register_buffer("shortcut_pool", shortcut_pool)  # kernel, stride, padding, ceil, count_include_pad


class _Block(NamedTuple):
    pool: Optional[PoolSpec]
    shortcut: Optional[kernels.PackedConv]
    convs: tuple[kernels.PackedConv, ...]


class _Plan(NamedTuple):
    input_qparams: tuple[float, int]
    stem: tuple[kernels.PackedConv, ...]
    maxpool: PoolSpec
    blocks: tuple[_Block, ...]


_PLANS: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


class QuantizedResNet(nn.Module):
    """An int8 ResNet for CPU inference: float NCHW (or channels_last) images in, fp32 logits out."""

    def __init__(self, in_channels: int, stem: list[QConv], blocks: list[QBlock], num_classes: int,
                 fc_in: int, maxpool: Tensor):
        super().__init__()
        self.in_channels = in_channels
        self.stem = nn.ModuleList(stem)
        self.blocks = nn.ModuleList(blocks)
        self.register_buffer("format", torch.tensor(FORMAT))
        self.register_buffer("weight_qmax", torch.tensor(isa.FULL_WEIGHT_QMAX))
        self.register_buffer("input_scale", torch.ones(()))
        self.register_buffer("input_zero_point", torch.zeros((), dtype=torch.long))
        self.register_buffer("maxpool", maxpool)  # kernel, stride, padding, ceil_mode, (unused)
        self.register_buffer("fc_weight", torch.zeros(num_classes, fc_in))
        self.register_buffer("fc_bias", torch.zeros(num_classes))
        self.eval()

    def train(self, mode: bool = True) -> "QuantizedResNet":
        if mode:
            raise RuntimeError("QuantizedResNet is inference-only: train the fp32 model and quantize it again")
        _PLANS.pop(self, None)  # eval() is where a `.data` write (unseen by version counters) is picked up
        return super().train(False)

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, int8 weights |w| <= {int(self.weight_qmax)}"

    def net(self) -> Net:
        """The layout with dequantized fp64 weights (the fake-quant reference's view of this model)."""
        stem = tuple(c.spec(f"stem.{i}", True) for i, c in enumerate(self.stem))
        blocks = []
        for i, b in enumerate(self.blocks):
            convs = tuple(c.spec(f"blocks.{i}.convs.{j}", True) for j, c in enumerate(b.convs))
            shortcut = None if b.shortcut is None else b.shortcut.spec(f"blocks.{i}.shortcut", False)
            blocks.append(BlockSpec(f"blocks.{i}", convs, _pool_spec("avg", b.shortcut_pool), shortcut))
        return Net(self.in_channels, stem, _pool_spec("max", self.maxpool), tuple(blocks),
                   self.fc_weight.double(), self.fc_bias.double())

    def _check(self, x: Tensor) -> None:
        if not isinstance(x, Tensor) or not x.is_floating_point():
            raise TypeError(f"QuantizedResNet expects a floating-point image tensor, got "
                            f"{x.dtype if isinstance(x, Tensor) else type(x).__name__}")
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"QuantizedResNet expects input of shape (N, {self.in_channels}, H, W), "
                             f"got {tuple(x.shape)}")
        if x.device.type != "cpu":
            raise ValueError(f"QuantizedResNet runs on CPU only, got input on {x.device}")
        if self.training:
            raise RuntimeError("QuantizedResNet is inference-only; it cannot run in training mode")
        if torch.is_grad_enabled():
            raise RuntimeError("QuantizedResNet is inference-only: call it under torch.no_grad() or "
                               "torch.inference_mode() (int8 kernels have no backward)")

    def forward(self, x: Tensor) -> Tensor:
        self._check(x)
        if x.shape[0] == 0:
            return x.new_zeros((0, self.fc_weight.shape[0]), dtype=torch.float32)
        plan = self._plan()
        q, qparams = kernels.quantize_input(x.float(), *plan.input_qparams), plan.input_qparams
        for c in plan.stem:
            q, qparams = kernels.conv(q, c, True), (c.out_scale, c.out_zero_point)
        mp = plan.maxpool
        q = kernels.max_pool(q, mp.kernel, mp.stride, mp.padding, mp.ceil_mode)
        for b in plan.blocks:
            identity, identity_qparams = q, qparams
            if b.pool is not None:
                p = b.pool
                identity = kernels.avg_pool(identity, p.kernel, p.stride, p.padding, p.ceil_mode, p.count_include_pad)
            if b.shortcut is not None:
                identity = kernels.conv(identity, b.shortcut, False)
                identity_qparams = (b.shortcut.out_scale, b.shortcut.out_zero_point)
            # The last conv's sum post-op overwrites identity: an activation of this forward, already read.
            *inner, last = b.convs
            for c in inner:
                q = kernels.conv(q, c, True)
            q = kernels.conv(q, last, True, identity, identity_qparams)
            qparams = (last.out_scale, last.out_zero_point)
        return kernels.head(q, qparams, self.fc_weight, self.fc_bias)

    # The plan: oneDNN arguments derived from the buffers, cached per buffer version (see the module docstring).

    @staticmethod
    def _buffers_of(modules) -> tuple:
        return tuple(t for m in modules for t in m._buffers.values())

    @staticmethod
    def _state(modules, buffers) -> Optional[tuple]:
        try:
            return tuple((t.data_ptr(), t._version) for t in buffers) \
                + tuple(id(c) for m in modules for c in m._modules.values())  # modules: held by the entry
        except RuntimeError:  # inference tensors carry no version counter: nothing is cached
            return None

    def _plan(self) -> _Plan:
        cached = _PLANS.get(self)
        if cached is not None:
            refs, state, plan, submodules = cached
            modules = (self, *submodules)
            buffers = self._buffers_of(modules)
            # Buffers by weak reference (a replaced buffer never matches a freed one's reused address).
            if (len(refs) == len(buffers) and all(r() is t for r, t in zip(refs, buffers))
                    and self._state(modules, buffers) == state):
                return plan
        submodules = tuple(self.modules())[1:]  # the cache holds these, never self (it is keyed weakly by self)
        modules = (self, *submodules)
        buffers = self._buffers_of(modules)
        state = self._state(modules, buffers)
        plan = self._build_plan()
        if state is not None:
            _PLANS[self] = (tuple(weakref.ref(t) for t in buffers), state, plan, submodules)
        return plan

    def _build_plan(self) -> _Plan:
        if int(self.weight_qmax) > isa.weight_qmax():
            raise RuntimeError(f"this QuantizedResNet has 8-bit weights, which oneDNN would saturate on this CPU "
                               f"({isa.isa_name()}); quantize the fp32 model on this CPU (7-bit weights)")
        input_qparams = qparams = (self.input_scale.item(), int(self.input_zero_point))

        def packed(c: QConv, x_qparams):
            return kernels.PackedConv(c.weight, c.weight_scale, c.bias, c.geometry.tolist(), x_qparams,
                                      c.out_qparams())
        stem = []
        for c in self.stem:
            stem.append(packed(c, qparams))
            qparams = c.out_qparams()
        blocks = []
        for b in self.blocks:
            shortcut = None if b.shortcut is None else packed(b.shortcut, qparams)
            convs = []
            for c in b.convs:
                convs.append(packed(c, qparams))
                qparams = c.out_qparams()
            blocks.append(_Block(_pool_spec("avg", b.shortcut_pool), shortcut, tuple(convs)))
        return _Plan(input_qparams, tuple(stem), _pool_spec("max", self.maxpool), tuple(blocks))


def build(net: Net, qparams: dict[str, tuple[float, int]], weight_qmax: int) -> QuantizedResNet:
    """The QuantizedResNet of a Net (fp32 folded weights) and its calibrated activation qparams."""
    stem = [QConv.from_spec(c, qparams[c.name], weight_qmax) for c in net.stem]
    blocks = []
    for b in net.blocks:
        shortcut = None if b.shortcut is None else QConv.from_spec(b.shortcut, qparams[b.shortcut.name], weight_qmax)
        convs = [QConv.from_spec(c, qparams[c.name], weight_qmax) for c in b.convs]
        blocks.append(QBlock(convs, shortcut, _pool_tensor(b.shortcut_pool)))
    num_classes, fc_in = net.fc_weight.shape
    m = QuantizedResNet(net.in_channels, stem, blocks, num_classes, fc_in, _pool_tensor(net.maxpool))
    with torch.no_grad():
        m.weight_qmax.fill_(weight_qmax)
        m.input_scale.fill_(qparams["input"][0])
        m.input_zero_point.fill_(qparams["input"][1])
        m.fc_weight.copy_(net.fc_weight)
        m.fc_bias.copy_(net.fc_bias)
    return m


def load_quantized(state_dict: dict) -> QuantizedResNet:
    """A QuantizedResNet rebuilt from its state_dict alone (e.g. torch.load(path, weights_only=True))."""
    if not isinstance(state_dict, dict) or "format" not in state_dict or "stem.0.weight" not in state_dict:
        raise ValueError("load_quantized expects the state_dict of a resnet_fast QuantizedResNet")
    if int(state_dict["format"]) != FORMAT:
        raise ValueError(f"QuantizedResNet state_dict format {int(state_dict['format'])}, this version reads {FORMAT}")
    n_stem = len([k for k in state_dict if re.fullmatch(r"stem\.\d+\.weight", k)])
    stem = [QConv(tuple(state_dict[f"stem.{i}.weight"].shape)) for i in range(n_stem)]
    blocks, i = [], 0
    while f"blocks.{i}.convs.0.weight" in state_dict:
        n = len([k for k in state_dict if re.fullmatch(rf"blocks\.{i}\.convs\.\d+\.weight", k)])
        convs = [QConv(tuple(state_dict[f"blocks.{i}.convs.{j}.weight"].shape)) for j in range(n)]
        sc = state_dict.get(f"blocks.{i}.shortcut.weight")
        blocks.append(QBlock(convs, None if sc is None else QConv(tuple(sc.shape)),
                             torch.zeros_like(state_dict[f"blocks.{i}.shortcut_pool"])))
        i += 1
    num_classes, fc_in = state_dict["fc_weight"].shape
    m = QuantizedResNet(state_dict["stem.0.weight"].shape[1], stem, blocks, num_classes, fc_in,
                        torch.zeros_like(state_dict["maxpool"]))
    m.load_state_dict(state_dict)
    return m
