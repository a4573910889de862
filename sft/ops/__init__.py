"""Fused operators: Triton kernels and layers that replace slower pieces of a model on CUDA.

The fused cross-entropy (`fused_ce.py`, `ce_softmax.py`), RMSNorm backward, SwiGLU and the joined q/k/v
projection, each with a plain-torch fallback; `patch.py` decides per model family which ones (or Liger's)
are swapped into a model, without changing its parameters or checkpoints.
"""
