"""Turning dataset items into micro-batches.

`collate_padded` stacks items that are already padded to `data.max_length` (padded mode,
`use_remove_padding=false`) into `[batch, max_length]` tensors. Packing of unpadded items
for remove-padding (one `[1, total]` row with restarting position_ids) belongs here too.
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
