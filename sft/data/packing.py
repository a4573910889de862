"""Packed (padding-free) micro-batches for `use_remove_padding=true`, and their SP slices.

The samples of a micro-batch are concatenated into one row `[1, T]`; `position_ids` restart
at 0 for every sample and `cu_seq_lens_q/k` (cumulative lengths) tell the varlen attention where
samples start, so attention never crosses a sample boundary and no padding is computed on.
Targets are shifted inside each sample, so the last token of one sample never learns the
first token of the next. With sequence parallelism of size k the row is padded to a multiple
of k (a padding segment of its own) and each rank of the SP group keeps one contiguous slice.
"""

from __future__ import annotations

import torch

from sft.data.batch import MicroBatch, labels_from_loss_mask


def _packed(
    ids: torch.Tensor,
    positions: torch.Tensor,
    labels: torch.Tensor,
    real: torch.Tensor,
    cu: torch.Tensor,
    sample_lens: list[int],
) -> MicroBatch:
    # The varlen attention takes query and key boundaries apart; in self-attention they are one tensor.
    max_len = int((cu[1:] - cu[:-1]).max())
    inputs = {
        "input_ids": ids,
        "position_ids": positions,
        "labels": labels,
        "cu_seq_lens_q": cu,
        "cu_seq_lens_k": cu,
        "max_length_q": max_len,
        "max_length_k": max_len,
    }
    return MicroBatch(inputs, real_mask=real, sample_lens=sample_lens)


def packed_micro_batch(items: list[dict[str, torch.Tensor]], pad_id: int, multiple_of: int = 1) -> MicroBatch:
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
    positions = [it["position_ids"] for it in items]  # [n] each, or [3, n] (multimodal rotary positions)
    if pad:
        positions.append(torch.arange(pad).expand(*positions[0].shape[:-1], pad))
    return _packed(
        torch.cat(ids)[None],  # [1, T]
        torch.cat(positions, dim=-1).unsqueeze(-2),  # [1, T] or [3, 1, T]
        torch.cat(labels)[None],
        (torch.arange(int(cu[-1])) < real).long()[None],
        cu,
        lengths[: len(items)],  # real samples only (for the useful-FLOPs count)
    )


def sp_slice(mb: MicroBatch, sp_rank: int, sp_size: int) -> MicroBatch:
    """This SP rank's contiguous 1/sp of the row: [1, T] -> [1, T/sp]; cu_seq_lens stay global."""
    if sp_size == 1:
        return mb
    t = mb.inputs["input_ids"].shape[1]
    assert t % sp_size == 0, "packed_micro_batch pads T to a multiple of sp"
    lo, hi = sp_rank * t // sp_size, (sp_rank + 1) * t // sp_size
    inputs = dict(mb.inputs)
    for key in ("input_ids", "position_ids", "labels"):
        inputs[key] = mb.inputs[key][..., lo:hi]
    return MicroBatch(inputs, real_mask=mb.real_mask[:, lo:hi], sample_lens=mb.sample_lens)


def empty_packed_batch(pad_id: int, n: int) -> MicroBatch:
    """A padding-only row of `n` tokens (a multiple of sp) with no target, for a rank with nothing left to run."""
    return _packed(
        torch.full((1, n), pad_id, dtype=torch.long),
        torch.arange(n)[None],
        torch.full((1, n), -100, dtype=torch.long),
        torch.zeros(1, n, dtype=torch.long),
        torch.tensor([0, n], dtype=torch.int32),
        [],
    )
