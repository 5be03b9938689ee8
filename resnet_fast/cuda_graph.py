"""Inference as one CUDA-graph replay: resnet_fast.cuda_graphed(model, example).

At small batches a forward is bound by the host (Python, dispatch and ~60 kernel launches cost more than
the GPU's work). cuda_graphed warms the model up (tuning, compiling and folding BatchNorm happen there),
captures one eval forward into a CUDA graph, and returns a callable that copies its input into the
captured input buffer and replays the graph.

    fast = resnet_fast.resnet50(weights=...).cuda().eval().to(torch.bfloat16, memory_format=torch.channels_last)
    graphed = resnet_fast.cuda_graphed(fast, example_batch)
    logits = graphed(batch).clone()     # the output buffer is reused by the next call

Constraints (the checked ones raise a clear error):
- CUDA tensors, an eval() model, inference only (no autograd through the replay);
- every call takes an input of the example's shape, dtype, device and memory format (checked);
- the output is one buffer, overwritten by every call: clone what you keep;
- the weights, the backend and the kernels the tuner chose are those of the capture. A parameter or
  buffer changed since (in-place edit, load_state_dict, .to, a replaced tensor) makes the next call
  raise (checked): capture again;
- one stream: replays run on the current stream, in order with the work around them.

torch.compile(model, mode="reduce-overhead") is the other way: the resnet_fast ops are opaque custom ops
that CUDA graphs capture like any other (tests/test_cuda_graph.py runs every one of them that way).
"""
from __future__ import annotations

import itertools

import torch
from torch import Tensor, nn


def _weights_state(model: nn.Module) -> tuple:
    """Identity, storage and version of every parameter and buffer (None where untracked: inference tensors)."""
    state = []
    for t in itertools.chain(model.parameters(), model.buffers()):
        try:
            state.append((id(t), t.data_ptr(), t._version))
        except RuntimeError:  # created under inference_mode: no version counter
            state.append((id(t), t.data_ptr(), None))
    return tuple(state)


class GraphedModel:
    """A captured eval forward; call it like the model (see cuda_graphed)."""

    def __init__(self, model: nn.Module, graph: torch.cuda.CUDAGraph, static_input: Tensor, static_output: Tensor):
        self.model = model
        self._graph = graph
        self._input = static_input
        self._output = static_output
        self._weights = _weights_state(model)

    def __call__(self, x: Tensor) -> Tensor:
        want = self._input
        if not isinstance(x, Tensor) or (x.shape, x.dtype, x.device) != (want.shape, want.dtype, want.device):
            got = (tuple(x.shape), x.dtype, x.device) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"resnet_fast cuda_graphed: the graph was captured for input {tuple(want.shape)} "
                             f"{want.dtype} on {want.device}, got {got}; capture another graph for it")
        if _weights_state(self.model) != self._weights:
            raise RuntimeError("resnet_fast cuda_graphed: the model's parameters or buffers changed since the "
                               "capture (the graph would replay the old ones); call cuda_graphed again")
        self._input.copy_(x)
        self._graph.replay()
        return self._output


def cuda_graphed(model: nn.Module, example: Tensor, warmup: int = 3) -> GraphedModel:
    """Capture model(example) (eval, inference) into a CUDA graph; returns the replaying callable."""
    if model.training:
        raise ValueError("resnet_fast cuda_graphed: the model must be in eval() mode (inference only)")
    if not isinstance(example, Tensor) or not example.is_cuda:
        raise ValueError("resnet_fast cuda_graphed: example must be a CUDA tensor (CUDA graphs are CUDA-only), got "
                         f"{example.device if isinstance(example, Tensor) else type(example).__name__}")
    if warmup < 1:
        raise ValueError(f"resnet_fast cuda_graphed: warmup must be >= 1 (tuning and compiling happen there), "
                         f"got {warmup}")
    static_input = torch.empty_like(example).copy_(example)
    side = torch.cuda.Stream(example.device)
    side.wait_stream(torch.cuda.current_stream(example.device))
    with torch.inference_mode(), torch.cuda.device(example.device):
        with torch.cuda.stream(side):  # tune, compile and fold outside the capture
            for _ in range(warmup):
                model(static_input)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_output = model(static_input)
    return GraphedModel(model, graph, static_input, static_output)
