"""conv + BatchNorm (+ residual add) (+ ReLU): the one op every ResNet block is made of.

eval() BN (running statistics): BN is folded into the conv and the whole thing
runs as one fused op on the selected backend:
  triton  implicit-GEMM conv with bias/residual/ReLU epilogue (resnet_fast.ops.triton_conv);
          grouped convs (ResNeXt) have no Triton kernel and run on cuDNN + epilogue
  ext     torch's conv on the original weights, then the extension's scale_bias_act
          (BN scale/shift + residual + ReLU in one pass)
  torch   torch's conv on the folded weights; on CPU oneDNN's fused conv+ReLU and
          conv+add+ReLU, elsewhere add_/relu_ in place
train() BN (batch statistics): torch's conv, then the fused bn_act op
(BN + add + ReLU forward/backward; resnet_fast.ops.bn_act).
Anything else (another norm layer, a custom conv) runs module by module.

Activations are kept in channels_last from the stem on: no hidden layout copies.
"""
from __future__ import annotations

import contextlib
import threading
from collections import Counter
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .. import backend as _backend
from .. import fold

# Which implementation ran, by name: lets tests prove a path was taken.
CALLS: Counter = Counter()

_CL = torch.channels_last

_local = threading.local()


@contextlib.contextmanager
def residuals_reusable(enabled: bool) -> Iterator[None]:
    """Inside, a residual may be overwritten by the conv that consumes it (its last use).

    Only ResNet.forward enables this, for its own activations, when no hook can
    observe them; a block called directly never overwrites its caller's tensor."""
    previous = getattr(_local, "reuse", False)
    _local.reuse = enabled
    try:
        yield
    finally:
        _local.reuse = previous


def _is_plain_conv(conv: nn.Module) -> bool:
    return (isinstance(conv, nn.Conv2d) and conv.padding_mode == "zeros"
            and not isinstance(conv.padding, str))


def _has_running_stats(bn: nn.Module) -> bool:
    # nn.BatchNorm2d / SyncBatchNorm in eval, or torchvision's FrozenBatchNorm2d.
    if isinstance(bn, _BatchNorm):
        return not bn.training and bn.running_mean is not None
    return type(bn).__name__ == "FrozenBatchNorm2d"


def _compute_dtype(x: Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def conv_bn_act(x: Tensor, conv: nn.Module, bn: nn.Module,
                residual: Optional[Tensor] = None, relu: bool = False) -> Tensor:
    """relu?(bn(conv(x)) + residual?), through the fastest path for bn's mode."""
    if _is_plain_conv(conv) and _has_running_stats(bn):
        return _eval(x, conv, bn, residual, relu)
    if isinstance(bn, nn.BatchNorm2d) and (relu or residual is not None):
        from .bn_act import bn_act
        CALLS["train_bn_act"] += 1
        return bn_act(conv(x), bn, residual=residual, relu=relu)
    CALLS["modules"] += 1
    out = bn(conv(x))
    if residual is not None:
        out = out + residual
    return F.relu(out) if relu else out


# --- eval ------------------------------------------------------------------

def _needs_autograd(x: Tensor, conv: nn.Module, bn: nn.Module, residual: Optional[Tensor]) -> bool:
    if not torch.is_grad_enabled():
        return False
    tensors = (x, residual, conv.weight, conv.bias, getattr(bn, "weight", None), getattr(bn, "bias", None))
    return any(t is not None and t.requires_grad for t in tensors)


def _eval(x, conv, bn, residual, relu):
    dtype = _compute_dtype(x)
    x = x.to(dtype).contiguous(memory_format=_CL)
    if residual is not None:
        residual = residual.to(dtype).contiguous(memory_format=_CL)
    impl = _pick(x, conv, dtype)
    if _needs_autograd(x, conv, bn, residual) or torch.compiler.is_compiling():
        # Fold on every call (differentiable, traceable; no version-keyed cache).
        w, b = fold.fold_conv_bn(conv, bn)
        if impl == "triton":  # the Triton op has autograd and a fake impl
            CALLS["triton"] += 1
            from . import triton_conv
            return triton_conv.conv_bias_act(x, w.to(dtype), b, residual, conv.stride, conv.padding,
                                             conv.dilation, relu)
        CALLS["eval_composite"] += 1
        out = F.conv2d(x, w.to(dtype), b.to(dtype), conv.stride, conv.padding, conv.dilation, conv.groups)
        if residual is not None:
            out = out + residual
        return F.relu(out) if relu else out
    return _IMPLS[impl](x, conv, bn, residual, relu, dtype)


def _pick(x: Tensor, conv: nn.Conv2d, dtype: torch.dtype) -> str:
    requested = _backend.get_backend()
    device = x.device
    if requested != "auto":
        _backend.require(requested, device)
        if requested == "triton" and conv.groups != 1:
            return "cudnn_ext" if _backend.ext_usable(device) else "torch"
        return requested
    if device.type == "cuda":
        if conv.groups == 1 and _backend.triton_usable(device):
            return "triton"
        return "cudnn_ext" if _backend.ext_usable(device) else "torch"
    return "torch"


def _folded(conv, bn, device, dtype, memory_format=_CL):
    def build():
        w, b = fold.fold_conv_bn(conv, bn)
        return w.to(device=device, dtype=dtype).contiguous(memory_format=memory_format), b.to(device)
    return fold.cached(conv, bn, ("folded", device, dtype), build)


def _scale_shift(conv, bn, device):
    def build():
        s, t = fold.bn_scale_shift(bn, conv.bias)
        return s.to(device), t.to(device)
    return fold.cached(conv, bn, ("scale_shift", device), build)


def _run_triton(x, conv, bn, residual, relu, dtype):
    from . import triton_conv
    w, b = _folded(conv, bn, x.device, dtype)
    CALLS["triton"] += 1
    return triton_conv.conv_bias_act(x, w, b, residual, conv.stride, conv.padding, conv.dilation, relu)


def _run_ext(x, conv, bn, residual, relu, dtype):
    from .bn_act import scale_bias_act
    s, t = _scale_shift(conv, bn, x.device)
    y = F.conv2d(x, conv.weight.to(dtype), None, conv.stride, conv.padding, conv.dilation, conv.groups)
    CALLS["ext"] += 1
    return scale_bias_act(y, s, t, residual, relu)


def _run_cudnn_ext(x, conv, bn, residual, relu, dtype):
    # Grouped convs under "triton"/"auto" on CUDA: cuDNN conv + the extension's fused epilogue.
    CALLS["cudnn_ext"] += 1
    with _backend.use_backend("ext"):
        return _run_ext(x, conv, bn, residual, relu, dtype)


_MKLDNN_DTYPES = (torch.float32, torch.bfloat16)


def _onednn_packed(conv, bn, dtype):
    # Folded weights reordered once into oneDNN's blocked layout: without this,
    # oneDNN reorders every weight on every call (~25% of ResNet-50 at batch 8).
    def build():
        w, b = fold.fold_conv_bn(conv, bn)
        packed = torch.ops.mkldnn._reorder_convolution_weight(
            w.to(dtype), list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups, None)
        return packed, b.to(dtype)
    return fold.cached(conv, bn, ("onednn", dtype), build)


def _run_torch(x, conv, bn, residual, relu, dtype):
    if x.device.type == "cpu" and dtype in _MKLDNN_DTYPES and torch.backends.mkldnn.is_available():
        # oneDNN's fused conv(+add)(+ReLU) on the folded weights: one pass per conv.
        CALLS["torch_onednn"] += 1
        w, b = _onednn_packed(conv, bn, dtype)
        args = (list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups)
        attr = "relu" if relu else "none"
        if residual is None:
            return torch.ops.mkldnn._convolution_pointwise(x, w, b, *args, attr, [], "")
        unary = attr if relu else None
        if getattr(_local, "reuse", False):  # write into the residual: no new buffer, one less stream
            return torch.ops.mkldnn._convolution_pointwise_.binary(
                residual, x, w, b, *args, "add", 1.0, unary, [None], "")
        return torch.ops.mkldnn._convolution_pointwise.binary(
            x, residual, w, b, *args, "add", 1.0, unary, [], "")
    CALLS["torch"] += 1
    w, b = _folded(conv, bn, x.device, dtype)
    out = F.conv2d(x, w, b.to(dtype), conv.stride, conv.padding, conv.dilation, conv.groups)
    if residual is not None:
        out.add_(residual)
    return out.relu_() if relu else out


_IMPLS = {"triton": _run_triton, "ext": _run_ext, "cudnn_ext": _run_cudnn_ext, "torch": _run_torch}
