"""resnet_fast: a drop-in, faster replacement for torchvision's ResNet family.

    import resnet_fast
    model = resnet_fast.resnet50(weights=...)          # same API and state_dict as torchvision
    fast = resnet_fast.from_torchvision(tv_model)      # or convert an existing model
    with resnet_fast.use_backend("triton"): ...        # auto | triton | ext | torch
    graphed = resnet_fast.cuda_graphed(model, example)  # small-batch inference as one CUDA-graph replay
    qmodel = resnet_fast.quantize(model, calibration)   # int8 CPU inference (resnet_fast/quant)
    resnet_fast.invalidate_caches(model)               # after writing weights through .data in eval()
"""
from .backend import BACKENDS, get_backend, use_backend
from .cuda_graph import cuda_graphed
from .fold import invalidate_caches
from .models import *  # noqa: F401,F403
from .models import ARCHS, BasicBlock, Bottleneck, ResNet, from_torchvision
from .ops.dispatch import availability
from .quant import QuantizedResNet, load_quantized, quantize

__version__ = "0.1.0"  # the single source: pyproject.toml reads it (tool.setuptools.dynamic)

__all__ = ["BACKENDS", "availability", "get_backend", "use_backend", "cuda_graphed", "invalidate_caches",
           "BasicBlock", "Bottleneck", "ResNet", "from_torchvision", "ARCHS", "quantize", "load_quantized",
           "QuantizedResNet", *ARCHS]
