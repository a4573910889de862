"""Turn dataset items into the model's micro-batches (`MicroBatch`).

A micro-batch is what one forward/backward sees: the model's keyword arguments (`input_ids`,
`position_ids`, `attention_mask` or the packed row's varlen lengths, `labels`, `target_index`), where
`labels[t]` is the token the model must predict at position t (`input_ids[t+1]` when
`loss_mask[t+1] == 1`, else -100), and the host-only counts of the step. Shifting here, once,
before any split, keeps the targets right however the sequence is cut later.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch


def labels_from_loss_mask(input_ids: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """[b, s] -> [b, s]: next-token targets where the next token is trained, else -100."""
    labels = torch.full_like(input_ids, -100)
    nxt = loss_mask[:, 1:].bool()
    labels[:, :-1] = torch.where(nxt, input_ids[:, 1:], labels[:, :-1])
    return labels


@dataclass
class MicroBatch:
    """One forward's input, built on the host (by the prefetch thread during training).

    `inputs` are the model's keyword arguments, moved to the device and passed as they are: `input_ids`,
    `position_ids`, `labels`, `target_index`, and `attention_mask` for padded rows or `cu_seq_lens_q/k`
    and `max_length_q/k` for a packed row (pinned on CUDA, so the copies do not block the host). The
    other fields never leave the host: `real_mask` is 1 on the real tokens of this rank's rows,
    `sample_lens` the real lengths of the samples (whole samples, for the useful-FLOPs count), and
    `targets` / `real_tokens` the counts a step sums (set by `with_counts`).
    """

    inputs: dict[str, Any]
    real_mask: torch.Tensor  # [b, s] padded (the attention mask), [1, T/sp] packed
    sample_lens: list[int]
    targets: int = 0
    real_tokens: int = 0

    @property
    def slots(self) -> int:
        """Token positions this rank runs, padding included."""
        return self.real_mask.numel()

    @property
    def cu_seq_lens(self) -> torch.Tensor | None:
        """A packed row's sample boundaries (the whole row's, on every SP rank); None for padded rows."""
        return self.inputs.get("cu_seq_lens_q")


def padded_micro_batch(items: list[dict[str, torch.Tensor]], multiple_of: int = 1) -> MicroBatch:
    """Stack right-padded items and cut the columns that are padding in every row; the width kept is rounded up
    to `multiple_of` (columns past the items' length are added as padding: id 0, mask 0, no target)."""
    input_ids = torch.stack([it["input_ids"] for it in items])
    attention_mask = torch.stack([it["attention_mask"] for it in items])
    # [b, s]; multimodal rotary positions [3, s] per item -> [3, b, s], the layout of Qwen-VL models
    position_ids = torch.stack([it["position_ids"] for it in items], dim=-2)
    loss_mask = torch.stack([it["loss_mask"] for it in items])
    width = -(-max(int(attention_mask.sum(dim=1).max()), 1) // multiple_of) * multiple_of
    extra = max(0, width - input_ids.shape[1])
    input_ids, attention_mask, position_ids, loss_mask = (
        torch.nn.functional.pad(t[..., :width], (0, extra))
        for t in (input_ids, attention_mask, position_ids, loss_mask)
    )
    inputs = {
        "input_ids": input_ids,
        "position_ids": position_ids,
        "attention_mask": attention_mask,
        "labels": labels_from_loss_mask(input_ids, loss_mask * attention_mask),
    }
    return MicroBatch(inputs, real_mask=attention_mask, sample_lens=attention_mask.sum(1).tolist())


def empty_micro_batch(pad_id: int, width: int = 1) -> MicroBatch:
    """A one-row batch of `width` tokens with no target, for a rank that has run out of validation samples
    (every rank must run the same number of forwards: FSDP's collectives are matched)."""
    one = torch.ones(1, width, dtype=torch.long)
    mask = torch.zeros_like(one)
    mask[0, 0] = 1  # one real token; the rest (FP8's multiple of 16, sft/ops/fp8.py) is padding
    inputs = {"input_ids": one * pad_id, "position_ids": one * 0, "attention_mask": mask, "labels": one * -100}
    return MicroBatch(inputs, real_mask=mask, sample_lens=[1])


def with_counts(mb: MicroBatch) -> MicroBatch:
    """Add `target_index` (flat positions whose label is a target) and the step's counts, found on the
    host: the loss then sizes its work from a shape, and the step sums plain integers."""
    target_index = (mb.inputs["labels"].reshape(-1) != -100).nonzero().squeeze(1)
    return replace(
        mb,
        inputs=dict(mb.inputs, target_index=target_index),
        targets=target_index.numel(),
        real_tokens=int(mb.real_mask.sum()),
    )


def _map_tensors(batch: dict[str, Any], fn) -> dict[str, Any]:
    # A tensor under two keys (a packed row's cu_seq_lens_q and _k) is moved once and stays shared.
    done: dict[int, torch.Tensor] = {}
    out = {}
    for k, v in batch.items():
        if torch.is_tensor(v):
            if id(v) not in done:
                done[id(v)] = fn(v)
            v = done[id(v)]
        elif hasattr(v, "map_tensors"):  # a structure of tensors (image blocks, sft/models/attention/image_blocks.py)
            v = v.map_tensors(fn)
        out[k] = v
    return out


def to_device(inputs: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Copy a micro-batch's model inputs; from pinned host memory (`pin`) the copies do not block the host."""
    return _map_tensors(inputs, lambda t: t.to(device, non_blocking=True))


def tensor_to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """One host tensor to the device without blocking the host (pinned first on CUDA)."""
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t.to(device)


def pin(mb: MicroBatch) -> MicroBatch:
    """The micro-batch with its model inputs in page-locked host memory, so `to_device` copies asynchronously."""
    return replace(mb, inputs=_map_tensors(mb.inputs, lambda t: t.pin_memory()))
