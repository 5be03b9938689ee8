"""The "triton" backend: Triton kernels for every fused op, each a torch.library custom op.

  conv      implicit-GEMM conv + bias (+ residual) (+ ReLU): the eval conv of every block
            (conv_tma: its TMA variants, sm_90 candidates)
  pool      stem max-pool, ResNet-D shortcut avg-pool, global avg-pool + fc
  tuner     picks each conv's and pool's kernel config per shape, validating every candidate first
  bn_act    BatchNorm (+ residual) (+ ReLU) forward/backward, scale_bias_act, running stats
  add_relu  relu(x + residual) and its backward

Importing the package imports triton (which reads TRITON_INTERPRET once, then) and registers every
op, with the fake kernels and autograd the Triton and C++ families share (resnet_fast.ops._op_meta).
"""
from .. import _op_meta
from . import add_relu, bn_act, conv, pool  # noqa: F401  defines the ops

_op_meta.register("triton_")
