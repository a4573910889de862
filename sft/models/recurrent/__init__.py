"""Recurrent token mixers of hybrid models (Gated DeltaNet, Mamba-2, short convolutions) on packed rows.

Their state and their causal convolution restart at every sample boundary of a packed row, and under
Ulysses SP each rank's slice of heads sees the whole sequence (`mixers.py`); exact per-sample torch
reference on CPU (`reference.py`), flash-linear-attention's varlen kernels on CUDA (`kernels.py`).
"""
