"""Packed (padding-free) micro-batches for `use_remove_padding=true`, and their SP slices.

The samples of a micro-batch are concatenated into one row `[1, T]`; `position_ids` restart
at 0 for every sample and `cu_seq_lens` (cumulative lengths) tell the varlen attention where
samples start, so attention never crosses a sample boundary and no padding is computed on.
Targets are shifted inside each sample, so the last token of one sample never learns the
first token of the next. With sequence parallelism of size k the row is padded to a multiple
of k (a padding segment of its own) and each rank of the SP group keeps one contiguous slice.
"""

from __future__ import annotations

import torch

from sft.data.batch import labels_from_loss_mask


def packed_micro_batch(items: list[dict[str, torch.Tensor]], pad_id: int, multiple_of: int = 1) -> dict:
    """Unpadded items -> one packed row; T is rounded up to `multiple_of` with a padding segment."""
    ids = [it["input_ids"] for it in items]
    labels = [labels_from_loss_mask(it["input_ids"][None], it["loss_mask"][None])[0] for it in items]
    lengths = [len(x) for x in ids]
    real = sum(lengths)
    pad = -real % multiple_of
    if pad:
        ids.append(torch.full((pad,), pad_id, dtype=torch.long))
        labels.append(torch.full((pad,), -100, dtype=torch.long))
        lengths.append(pad)
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(lengths, dtype=torch.int32), 0)
    return {
        "input_ids": torch.cat(ids)[None],  # [1, T]
        "position_ids": torch.cat([torch.arange(n) for n in lengths])[None],
        "labels": torch.cat(labels)[None],
        "real_mask": (torch.arange(int(cu[-1])) < real).long()[None],
        "cu_seq_lens": cu,
        "max_length": max(lengths),
        "sample_lens": lengths[: len(items)],  # real samples only (for the useful-FLOPs count)
    }


def sp_slice(batch: dict, sp_rank: int, sp_size: int) -> dict:
    """This SP rank's contiguous 1/sp of the row: [1, T] -> [1, T/sp]; cu_seq_lens stay global."""
    if sp_size == 1:
        return batch
    t = batch["input_ids"].shape[1]
    assert t % sp_size == 0, "packed_micro_batch pads T to a multiple of sp"
    lo, hi = sp_rank * t // sp_size, (sp_rank + 1) * t // sp_size
    out = dict(batch)
    for key in ("input_ids", "position_ids", "labels", "real_mask"):
        out[key] = batch[key][:, lo:hi]
    return out


def empty_packed_batch(pad_id: int, sp_size: int) -> dict:
    """A padding-only row with no target, for a rank with nothing left to run."""
    n = sp_size
    return {
        "input_ids": torch.full((1, n), pad_id, dtype=torch.long),
        "position_ids": torch.arange(n)[None],
        "labels": torch.full((1, n), -100, dtype=torch.long),
        "real_mask": torch.zeros(1, n, dtype=torch.long),
        "cu_seq_lens": torch.tensor([0, n], dtype=torch.int32),
        "max_length": n,
    }
