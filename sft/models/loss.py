"""Token cross-entropy that never materialises the full `[tokens, vocab]` logits.

Only the positions that are targets (label != -100) go through the LM head, in chunks,
each under activation checkpointing so the backward recomputes a chunk's logits instead
of keeping them (or through sft's fused kernel on CUDA, sft/ops/fused_ce.py). Returns the fp32 *sum*
of token losses and the count of argmax hits (token accuracy): normalising by the global number
of target tokens is the trainer's job (that is what makes both split-invariant).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from sft.ops.fused_ce import fused_linear_cross_entropy


def _chunk_loss(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, softcap: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    logits = (hidden @ weight.t()).float()  # [c, h] @ [h, V] -> [c, V], CE in fp32
    if softcap is not None:  # final-logit soft-capping (Gemma 2/3), applied to this chunk only
        logits = softcap * torch.tanh(logits / softcap)
    # Token accuracy from the same chunk of logits (never the full [N, V]): argmax hits.
    return F.cross_entropy(logits, labels, reduction="sum"), (logits.argmax(-1) == labels).sum()


def target_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    index: torch.Tensor,
    chunk_size: int = 4096,
    fused: bool = False,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of CE(hidden @ weight.T, label), number of argmax hits) over the positions `index` (the
    targets). hidden [N, h], labels [N], index [n_t] on the same device.

    The index is computed on the host from the batch, so the number of targets (and the chunk
    loop) is known without waiting for the GPU. `fused` computes the gradients in the forward
    (sft/ops/fused_ce.py), so the backward recomputes nothing and nothing is read back from the GPU.
    `softcap` c caps each chunk's logits to c * tanh(logits / c) before the CE (sft/models/families.py
    says which models need it).
    """
    if index.numel() == 0:
        # Keep the head and the decoder in the graph so every rank's backward (and FSDP's
        # gradient reduction) sees the same parameters, contributing exactly zero.
        zero, _ = _chunk_loss(hidden[:1], weight, torch.zeros_like(labels[:1]))
        return zero * 0.0, torch.zeros((), dtype=torch.int64, device=hidden.device)
    h = hidden.index_select(0, index)  # [n_t, h]
    y = labels.index_select(0, index)
    if fused:
        return fused_linear_cross_entropy(h, weight, y, softcap=softcap)
    total = hidden.new_zeros((), dtype=torch.float32)
    correct = torch.zeros((), dtype=torch.int64, device=hidden.device)
    for start in range(0, h.shape[0], chunk_size):
        end = start + chunk_size
        if torch.is_grad_enabled():
            loss, right = checkpoint(_chunk_loss, h[start:end], weight, y[start:end], softcap, use_reentrant=False)
        else:
            loss, right = _chunk_loss(h[start:end], weight, y[start:end], softcap)
        total, correct = total + loss, correct + right
    return total, correct
