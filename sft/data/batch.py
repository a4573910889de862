"""Turn dataset items into the model's micro-batches.

A micro-batch is what one forward/backward sees: `input_ids`, `position_ids`,
`attention_mask` and `labels`, where `labels[t]` is the token the model must predict at
position t (`input_ids[t+1]` when `loss_mask[t+1] == 1`, else -100). Shifting here, once,
before any split, keeps the targets right however the sequence is cut later.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

KEYS = ("input_ids", "attention_mask", "position_ids", "loss_mask")


def collate_padded(items: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack padded items: each key becomes a `[len(items), max_length]` tensor."""
    if not items:
        raise ValueError("collate_padded got no items")
    lengths = {int(item["input_ids"].shape[0]) for item in items}
    if len(lengths) != 1:
        raise ValueError(
            f"collate_padded got items of lengths {sorted(lengths)}; build the dataset with pad_to_max_length=True"
        )
    return {key: torch.stack([item[key] for item in items]) for key in KEYS}


def labels_from_loss_mask(input_ids: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """[b, s] -> [b, s]: next-token targets where the next token is trained, else -100."""
    labels = torch.full_like(input_ids, -100)
    nxt = loss_mask[:, 1:].bool()
    labels[:, :-1] = torch.where(nxt, input_ids[:, 1:], labels[:, :-1])
    return labels


def padded_micro_batch(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack right-padded items and cut the columns that are padding in every row."""
    input_ids = torch.stack([it["input_ids"] for it in items])
    attention_mask = torch.stack([it["attention_mask"] for it in items])
    position_ids = torch.stack([it["position_ids"] for it in items])
    loss_mask = torch.stack([it["loss_mask"] for it in items])
    width = max(int(attention_mask.sum(dim=1).max()), 1)
    input_ids, attention_mask = input_ids[:, :width], attention_mask[:, :width]
    position_ids, loss_mask = position_ids[:, :width], loss_mask[:, :width]
    return {
        "input_ids": input_ids,
        "position_ids": position_ids,
        "attention_mask": attention_mask,
        "labels": labels_from_loss_mask(input_ids, loss_mask * attention_mask),
    }


def empty_micro_batch(pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """A one-token batch with no target, for a rank that has run out of validation samples
    (every rank must run the same number of forwards: FSDP's collectives are matched)."""
    one = torch.ones(1, 1, dtype=torch.long, device=device)
    return {
        "input_ids": one * pad_id,
        "position_ids": one * 0,
        "attention_mask": one,
        "labels": one * -100,
    }


def to_device(batch: dict, device: torch.device) -> dict:
    """Copy a batch's tensors; from pinned host memory (`pin`) the copies do not block the host."""
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def tensor_to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """One host tensor to the device without blocking the host (pinned first on CUDA)."""
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t.to(device)


def pin(batch: dict) -> dict:
    """The batch's tensors in page-locked host memory, so `to_device` copies asynchronously."""
    return {k: v.pin_memory() if torch.is_tensor(v) else v for k, v in batch.items()}


def with_target_index(batch: dict) -> dict:
    """Add `target_index` (flat positions whose label is a target), found on the host: the loss
    then sizes its work from a shape, without reading anything back from the GPU."""
    return dict(batch, target_index=(batch["labels"].reshape(-1) != -100).nonzero().squeeze(1))
