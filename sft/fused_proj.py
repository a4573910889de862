"""One GEMM for an attention's q, k and v projections, which read the same input.

transformers' attention calls q_proj, k_proj and v_proj one after the other on the same hidden states.
As three GEMMs, the k and v ones are narrow (256 columns at the Qwen2.5-1.5B shape), and autograd sums
the three input gradients with two extra bf16 passes over [tokens, hidden]. One GEMM over the
concatenated weights has a single input gradient, one bias reduction, and a wide output. On an H200
(scripts/proj_bench.py, 41k rows, forward + backward, 2026-12-03) that was 1.25 ms against 1.51 ms a
layer.

How, without touching the model's code or its parameters: a forward pre-hook on the attention module
computes the fused projection of the attention's input and leaves each projection its slice (a view);
each projection, a subclass of nn.Linear, returns its slice when it is called on that same tensor
(checked by identity and version), and computes itself otherwise. A forward hook drops leftovers.
Parameter names, checkpoints and the HF export are unchanged; LoRA-wrapped projections are left alone.
Used with remove-padding, whose attention (sft/attention.py) copies the v slice token-major: a saved
view would keep the whole fused output alive until the backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

PROJECTIONS = ("q_proj", "k_proj", "v_proj")


class _SliceLinear(nn.Linear):
    """nn.Linear that returns the slice its attention's pre-hook computed for this very input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        stash = self.__dict__.pop("_sft_slice", None)
        if stash is not None and stash[0] is x and stash[1] == x._version:
            return stash[2]
        return F.linear(x, self.weight, self.bias)


def _input(args: tuple, kwargs: dict) -> torch.Tensor | None:
    x = kwargs.get("hidden_states", args[0] if args else None)
    return x if isinstance(x, torch.Tensor) else None


def _fuse(attn: nn.Module, args: tuple, kwargs: dict) -> None:
    x = _input(args, kwargs)
    if x is None:
        return
    projs = [getattr(attn, n) for n in PROJECTIONS]
    weight = torch.cat([p.weight for p in projs])
    bias = torch.cat([p.bias for p in projs]) if projs[0].bias is not None else None
    # F.linear as each projection would call it: autocast and dtype rules apply to the one GEMM alike.
    pieces = F.linear(x, weight, bias).split([p.out_features for p in projs], dim=-1)
    for p, piece in zip(projs, pieces):
        p.__dict__["_sft_slice"] = (x, x._version, piece)


def _drop(attn: nn.Module, args: tuple, kwargs: dict, out: object) -> None:
    for n in PROJECTIONS:
        getattr(attn, n).__dict__.pop("_sft_slice", None)


def _fusable(m: nn.Module) -> bool:
    projs = [getattr(m, n, None) for n in PROJECTIONS]
    if not all(type(p) is nn.Linear for p in projs):  # exactly nn.Linear: not LoRA, not already fused
        return False
    same_input = len({p.in_features for p in projs}) == 1
    return same_input and len({p.bias is None for p in projs}) == 1 and len({p.weight.dtype for p in projs}) == 1


def fuse_qkv(lm: nn.Module) -> int:
    """Compute q, k and v of every attention module of `lm` with one GEMM; returns how many modules."""
    n = 0
    for m in lm.modules():
        if _fusable(m):
            for name in PROJECTIONS:
                getattr(m, name).__class__ = _SliceLinear
            m.register_forward_pre_hook(_fuse, with_kwargs=True)
            m.register_forward_hook(_drop, with_kwargs=True)
            n += 1
    return n
