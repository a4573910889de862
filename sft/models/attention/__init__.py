"""Packed (varlen) attention: one row of concatenated samples, each attending only to itself.

`varlen.py` registers the attention function with transformers and reads the packed lengths; `kernels.py`
is the table of CUDA kernels (FA4, flash-attn, PyTorch) and how `auto` picks one; `reference.py` is the
exact masked-softmax reference that CPU runs and tests compare against.
"""
