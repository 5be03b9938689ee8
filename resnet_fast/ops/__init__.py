"""Fused ops: one file per op (Triton kernels, extension wrappers, the eval-mode dispatcher)."""
