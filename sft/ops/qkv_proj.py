"""An attention's q, k and v projections as one autograd node: one input gradient, bias gradients as GEMVs.

transformers' attention calls q_proj, k_proj and v_proj one after the other on the same hidden states.
Autograd then sums their three input gradients with two bf16 adds over [tokens, hidden], and takes each
bias gradient with a column reduction. Here the k and v input-gradient GEMMs add into the q one's output
in their epilogue (`addmm_`, in fp32 before the one rounding), and each bias gradient is a GEMV against a
vector of ones; both are faster than autograd's way (benchmarks/grad_sum_bench.py, docs/PERFORMANCE.md).
The forward is the same three GEMMs, outputs contiguous as before.

How, without touching the model's code or its parameters: a forward pre-hook on the attention module
computes the three projections of the attention's input through `_QKV` and leaves each projection its
output; each projection, a subclass of nn.Linear, returns that output when it is called on that same tensor
(checked by identity and version), and computes itself otherwise. A forward hook drops leftovers.
Parameter names, checkpoints and the HF export are unchanged; LoRA-wrapped projections are left alone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

PROJECTIONS = ("q_proj", "k_proj", "v_proj")


class _QKV(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, wq, bq, wk, bk, wv, bv):
        ctx.save_for_backward(x, wq, wk, wv)
        ctx.biased = bq is not None
        return F.linear(x, wq, bq), F.linear(x, wk, bk), F.linear(x, wv, bv)

    @staticmethod
    def backward(ctx, dq, dk, dv):
        x, wq, wk, wv = ctx.saved_tensors
        x2 = x.reshape(-1, x.shape[-1])
        grads = [g.reshape(-1, g.shape[-1]) for g in (dq, dk, dv)]
        need = ctx.needs_input_grad
        dx = None
        if need[0]:
            dx = grads[0] @ wq  # the k and v gradients add into it in their GEMMs' epilogues
            dx.addmm_(grads[1], wk)
            dx.addmm_(grads[2], wv)
            dx = dx.view_as(x)
        dws = [g.t() @ x2 if need[i] else None for g, i in zip(grads, (1, 3, 5))]
        ones = x2.new_ones(x2.shape[0]) if ctx.biased else None
        dbs = [torch.mv(g.t(), ones) if ctx.biased and need[i] else None for g, i in zip(grads, (2, 4, 6))]
        return dx, dws[0], dbs[0], dws[1], dbs[1], dws[2], dbs[2]


class _StashLinear(nn.Linear):
    """nn.Linear that returns the output its attention's pre-hook computed for this very input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        stash = self.__dict__.pop("_sft_out", None)
        if stash is not None and stash[0] is x and stash[1] == x._version:
            return stash[2]
        return F.linear(x, self.weight, self.bias)


def _input(args: tuple, kwargs: dict) -> torch.Tensor | None:
    x = kwargs.get("hidden_states", args[0] if args else None)
    return x if isinstance(x, torch.Tensor) else None


def _project(attn: nn.Module, args: tuple, kwargs: dict) -> None:
    x = _input(args, kwargs)
    projs = [getattr(attn, n) for n in PROJECTIONS]
    # Autocast or mixed dtypes would give F.linear's own casting rules: each projection computes itself.
    if x is None or torch.is_autocast_enabled(x.device.type) or any(p.weight.dtype != x.dtype for p in projs):
        return
    outs = _QKV.apply(x, *(t for p in projs for t in (p.weight, p.bias)))
    for p, out in zip(projs, outs):
        p.__dict__["_sft_out"] = (x, x._version, out)


def _drop(attn: nn.Module, args: tuple, kwargs: dict, out: object) -> None:
    for n in PROJECTIONS:
        getattr(attn, n).__dict__.pop("_sft_out", None)


def _joinable(m: nn.Module) -> bool:
    projs = [getattr(m, n, None) for n in PROJECTIONS]
    if not all(type(p) is nn.Linear for p in projs):  # exactly nn.Linear: not LoRA's wrapper, not already joined
        return False
    same_input = len({p.in_features for p in projs}) == 1
    return same_input and len({p.bias is None for p in projs}) == 1 and len({p.weight.dtype for p in projs}) == 1


def join_qkv(lm: nn.Module) -> int:
    """Run q, k and v of every attention module of `lm` as one autograd node; returns how many modules."""
    n = 0
    for m in lm.modules():
        if _joinable(m):
            for name in PROJECTIONS:
                getattr(m, name).__class__ = _StashLinear
            m.register_forward_pre_hook(_project, with_kwargs=True)
            m.register_forward_hook(_drop, with_kwargs=True)
            n += 1
    return n
