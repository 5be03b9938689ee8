"""Whether this CPU multiplies int8 exactly, and the weight range that follows from it.

oneDNN's u8 x s8 convolution needs VNNI (AVX512-VNNI or AVX-VNNI) or AMX for exact int32 accumulation.
Without them (plain AVX2/AVX-512 x86) it multiplies with vpmaddubsw, which adds each pair of u8*s8
products in int16 with saturation: 2 * 255 * 127 = 64770 overflows int16. Weights limited to 7 bits
(|w| <= 63: 2 * 255 * 63 = 32130) keep every pair exact, at the cost of one bit of weight precision
(twice the weight rounding error). quantize() chooses that on such CPUs and warns; a model quantized with
8-bit weights is refused there (it would saturate silently).
"""
from __future__ import annotations

import platform
from typing import Mapping, Optional

import torch

FULL_WEIGHT_QMAX = 127
REDUCED_WEIGHT_QMAX = 63


def cpu_capabilities() -> dict:
    """The CPU feature flags torch reports (torch >= 2.12: get_capabilities; torch 2.11: VNNI-512 only)."""
    get = getattr(torch.cpu, "get_capabilities", None)
    if get is not None:
        return dict(get())
    return {"avx512_vnni": bool(torch.cpu._is_vnni_supported())}


def has_exact_int8(caps: Mapping[str, bool], machine: Optional[str] = None) -> bool:
    """Whether oneDNN's u8 x s8 products accumulate exactly on a CPU with these flags."""
    machine = (machine or platform.machine()).lower()
    if machine not in ("x86_64", "amd64", "i686", "x86"):
        return False  # oneDNN's int8 convolution is only used here on x86
    return any(caps.get(f, False) for f in ("avx512_vnni", "avx_vnni", "amx_int8"))


def weight_qmax(caps: Optional[Mapping[str, bool]] = None, machine: Optional[str] = None) -> int:
    """The largest |int8 weight| to quantize to on this CPU (see the module docstring)."""
    return FULL_WEIGHT_QMAX if has_exact_int8(cpu_capabilities() if caps is None else caps, machine) \
        else REDUCED_WEIGHT_QMAX


def isa_name(caps: Optional[Mapping[str, bool]] = None) -> str:
    caps = cpu_capabilities() if caps is None else caps
    for flag in ("amx_int8", "avx512_vnni", "avx_vnni"):
        if caps.get(flag, False):
            return flag.upper()
    return "no VNNI (7-bit weights)"
