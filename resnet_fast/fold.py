"""BatchNorm folding for eval(), cached per weight version.

conv(x, W) followed by BN(mean, var, gamma, beta, eps) equals conv(x, W * s) + t
with s = gamma / sqrt(var + eps) and t = beta - mean * s (+ conv bias * s).

The folded tensors are cached per (conv, variant) and keyed by the identity,
storage and version counter of every source tensor, so the next forward sees
an in-place edit, load_state_dict (copy_), an optimizer step, a `.to()` or a
replaced Parameter: none of them can leave a stale fold behind (the bug users
hit with torch.compile's freezing, pytorch/pytorch#108863).
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
    """Per-channel (scale, shift), fp32 or wider, such that BN(y + conv_bias) == y * scale + shift."""
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
            _tensor(bn, "running_mean"), _tensor(bn, "running_var"))


def _version_key(conv: nn.Module, bn: nn.Module) -> Optional[tuple]:
    """Identity + storage + version of every source; None when versions are untracked
    (inference tensors), in which case nothing is cached."""
    try:
        return (bn.eps, *[t if t is None else (id(t), t.data_ptr(), t._version, t.dtype, t.device)
                          for t in _sources(conv, bn)])
    except RuntimeError:  # inference tensors carry no version counter
        return None


class _Entry:
    __slots__ = ("key", "value")

    def __init__(self, key, value):
        self.key, self.value = key, value


# conv module -> {variant: _Entry}. Weak, so a model's cache dies with the model
# and never shows up in its state_dict, deepcopy or pickle.
_CACHE: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()
STATS = {"hits": 0, "misses": 0}


def cached(conv: nn.Module, bn: nn.Module, variant: tuple, build: Callable[[], tuple]) -> tuple:
    """build() once per (conv, variant, source versions); afterwards the cached result.

    variant names what build() produces (backend, dtype, layout, device), so two
    backends or precisions never share an entry."""
    key = _version_key(conv, bn)
    per_conv = _CACHE.setdefault(conv, {})
    entry = per_conv.get(variant)
    if key is not None and entry is not None and entry.key == key:
        STATS["hits"] += 1
        return entry.value
    STATS["misses"] += 1
    with torch.no_grad():
        value = build()
    if key is not None:
        per_conv[variant] = _Entry(key, value)
    return value


def clear() -> None:
    """Drop every cached fold (they are rebuilt on demand)."""
    _CACHE.clear()


def folded(conv: nn.Conv2d, bn: nn.Module, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """The cached fold: weight in `dtype`, channels_last; bias fp32 (or wider)."""
    def build():
        w, b = fold_conv_bn(conv, bn)
        return w.to(device=device, dtype=dtype).contiguous(memory_format=torch.channels_last), b.to(device)
    return cached(conv, bn, ("folded", device, dtype), build)
