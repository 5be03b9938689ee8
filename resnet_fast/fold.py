"""BatchNorm folding for eval(), cached per conv and checked against its sources on every use.

conv(x, W) followed by BN(mean, var, gamma, beta, eps) equals conv(x, W * s) + t
with s = gamma / sqrt(var + eps) and t = beta - mean * s (+ conv bias * s).

What a cached fold is checked against on every use (any change rebuilds it):
- the identity of every source tensor (conv weight and bias; BN weight, bias, running statistics and
  num_batches_tracked), held by weak reference, so a replaced Parameter never matches a freed one;
- each source's storage, dtype, device and version counter: in-place edits, load_state_dict (copy_),
  optimizer steps (foreach and fused included), `.to()`, and resnet_fast's own BN-statistics updates
  (every resnet_fast op that writes a tensor bumps its version). A train-mode BatchNorm forward bumps
  num_batches_tracked, which catches torch's own batch_norm too: it updates the running statistics
  without bumping their versions.
Not seen: writes through `.data` (or `.detach()`), which have a version counter of their own. For
those, `invalidate_caches(model)` drops a model's caches; resnet_fast's ResNet and blocks also drop
them on every train(), eval() and `.to()` (see models/blocks.py).

A cache never holds a module: entries are keyed by the conv in a WeakKeyDictionary and their values
must not reference the conv or the BN (else the key would keep itself alive).
"""
from __future__ import annotations

import weakref
from typing import Callable, Optional

import torch
from torch import Tensor, nn


def _acc(t: Tensor) -> Tensor:
    # fp32 for fp32/fp16/bf16 sources, fp64 stays fp64.
    return t.to(torch.promote_types(t.dtype, torch.float32))


def bn_scale_shift(bn: nn.Module, conv_bias: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """Per-channel (scale, shift), fp32 or wider, such that BN(y + conv_bias) == y * scale + shift.

    Differentiable in BN's weight and bias (frozen-statistics fine-tuning)."""
    scale = torch.rsqrt(_acc(bn.running_var) + bn.eps)
    if bn.weight is not None:
        scale = scale * _acc(bn.weight)
    shift = -_acc(bn.running_mean) * scale
    if bn.bias is not None:
        shift = shift + _acc(bn.bias)
    if conv_bias is not None:
        shift = shift + _acc(conv_bias) * scale
    return scale, shift


def fold_conv_bn(conv: nn.Conv2d, bn: nn.Module) -> tuple[Tensor, Tensor]:
    """(weight, bias), fp32 or wider, of the single conv equal to conv followed by bn in eval mode.

    Differentiable with respect to every parameter (used as is when autograd is on)."""
    scale, shift = bn_scale_shift(bn, conv.bias)
    return _acc(conv.weight) * scale.view(-1, 1, 1, 1), shift


def _tensor(module: nn.Module, name: str) -> Optional[Tensor]:
    # A parameter or buffer straight from the module's dicts: Module.__getattr__ costs more than the
    # whole check otherwise (it runs for every conv of every eval forward).
    t = module._parameters.get(name)
    return module._buffers.get(name) if t is None else t


def _sources(conv: nn.Module, bn: nn.Module) -> tuple:
    return (_tensor(conv, "weight"), _tensor(conv, "bias"), _tensor(bn, "weight"), _tensor(bn, "bias"),
            _tensor(bn, "running_mean"), _tensor(bn, "running_var"), _tensor(bn, "num_batches_tracked"))


def _state(sources: tuple, eps: float) -> Optional[tuple]:
    """Storage, version, dtype and device of every source; None when versions are untracked
    (inference tensors), in which case nothing is cached."""
    try:
        return (eps, *[t if t is None else (t.data_ptr(), t._version, t.dtype, t.device) for t in sources])
    except RuntimeError:  # inference tensors carry no version counter
        return None


def _refs(sources: tuple) -> tuple:
    return tuple(t if t is None else weakref.ref(t) for t in sources)


def _same(refs: tuple, sources: tuple) -> bool:
    return all(t is r if t is None else (r is not None and r() is t) for r, t in zip(refs, sources))


class _Entry:
    __slots__ = ("refs", "state", "value")

    def __init__(self, refs: tuple, state: tuple, value):
        self.refs, self.state, self.value = refs, state, value


# conv module -> {variant: _Entry}. Weak, so a model's cache dies with the model
# and never shows up in its state_dict, deepcopy or pickle.
_CACHE: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()
STATS = {"hits": 0, "misses": 0}


def cached(conv: nn.Module, bn: nn.Module, variant: tuple, build: Callable[[], object]) -> object:
    """build() once per (conv, variant, sources); afterwards the cached result.

    variant names what build() produces (backend, dtype, layout, device), so two backends or
    precisions never share an entry. What build() returns must not reference conv or bn."""
    sources = _sources(conv, bn)
    state = _state(sources, bn.eps)
    per_conv = _CACHE.get(conv)
    entry = None if per_conv is None else per_conv.get(variant)
    if state is not None and entry is not None and entry.state == state and _same(entry.refs, sources):
        STATS["hits"] += 1
        return entry.value
    STATS["misses"] += 1
    with torch.no_grad():
        value = build()
    if state is not None:
        if per_conv is None:
            per_conv = _CACHE[conv] = {}
        per_conv[variant] = _Entry(_refs(sources), state, value)
    return value


def invalidate_caches(model: nn.Module) -> None:
    """Drop every fold and prepacked weight cached for `model`'s modules; the next forward rebuilds them.

    Call it after writing weights or BatchNorm statistics through `.data` (or `.detach()`, or from C
    code) while the model stays in eval(): those writes bypass the version counters the caches check.
    resnet_fast's ResNet does it itself on every train(), eval(), `.to()` and load_state_dict."""
    for module in model.modules():
        _CACHE.pop(module, None)


def clear() -> None:
    """Drop every cached fold (they are rebuilt on demand)."""
    _CACHE.clear()


def folded(conv: nn.Conv2d, bn: nn.Module, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """The cached fold: weight in `dtype`, channels_last; bias fp32 (or wider)."""
    def build():
        w, b = fold_conv_bn(conv, bn)
        return w.to(device=device, dtype=dtype).contiguous(memory_format=torch.channels_last), b.to(device)
    return cached(conv, bn, ("folded", device, dtype), build)
