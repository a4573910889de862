"""The micro-batch builder (sft/data/loader.py, packing.py, batch.py) hands over the model's keyword
arguments as they are, and keeps the host-only fields (real mask, sample lengths, counts) apart."""

from __future__ import annotations

import torch

from sft.data.batch import MicroBatch, pin, to_device
from sft.data.loader import MicroBatchBuilder

PAD = 0
PACKED_INPUTS = {
    "input_ids", "position_ids", "labels", "target_index", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q",
    "max_length_k",
}  # fmt: skip
PADDED_INPUTS = {"input_ids", "position_ids", "attention_mask", "labels", "target_index"}


def _items(lengths: list[int], width: int | None = None) -> list[dict[str, torch.Tensor]]:
    """Samples with ids 1..n and every token after the first trained; right-padded to `width` if given."""
    out = []
    for n in lengths:
        w = width or n
        ids = torch.zeros(w, dtype=torch.long)
        ids[:n] = torch.arange(1, n + 1)
        real = (torch.arange(w) < n).long()
        loss = real.clone()
        loss[0] = 0
        out.append(
            {"input_ids": ids, "attention_mask": real, "position_ids": torch.arange(w) * real, "loss_mask": loss}
        )
    return out


def test_packed_micro_batch_is_the_models_kwargs():
    build = MicroBatchBuilder(_items([3, 5]), packed=True, pad_id=PAD, sp_rank=0, sp_size=1)
    mb = build([0, 1])
    assert isinstance(mb, MicroBatch) and set(mb.inputs) == PACKED_INPUTS
    kw = mb.inputs
    assert kw["cu_seq_lens_q"] is kw["cu_seq_lens_k"] and kw["cu_seq_lens_q"].tolist() == [0, 3, 8]
    assert kw["max_length_q"] == kw["max_length_k"] == 5
    assert kw["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 3, 4]]
    # Targets shift inside each sample: the last token of sample 0 does not predict sample 1's first.
    assert kw["labels"].tolist() == [[2, 3, -100, 2, 3, 4, 5, -100]]
    assert kw["target_index"].tolist() == [0, 1, 3, 4, 5, 6]
    assert mb.sample_lens == [3, 5] and mb.real_mask.tolist() == [[1] * 8]
    assert (mb.targets, mb.real_tokens, mb.slots) == (6, 8, 8)
    assert mb.cu_seq_lens is kw["cu_seq_lens_q"]


def test_packed_sp_slices_keep_the_whole_rows_boundaries():
    items = _items([3, 4])  # 7 tokens: padded to 8 for sp=2, a padding segment of its own
    halves = [MicroBatchBuilder(items, True, PAD, r, 2)([0, 1]) for r in range(2)]
    for mb in halves:
        assert set(mb.inputs) == PACKED_INPUTS
        assert mb.inputs["input_ids"].shape == (1, 4) and mb.real_mask.shape == (1, 4)
        assert mb.inputs["cu_seq_lens_q"].tolist() == [0, 3, 7, 8]  # global on every SP rank
        assert mb.sample_lens == [3, 4]  # whole samples: each rank counts 1/sp of their FLOPs
    assert halves[0].real_tokens + halves[1].real_tokens == 7 and halves[1].real_mask.tolist() == [[1, 1, 1, 0]]
    assert halves[0].targets + halves[1].targets == 5


def test_padded_micro_batch_is_the_models_kwargs():
    mb = MicroBatchBuilder(_items([3, 5], width=8), packed=False, pad_id=PAD, sp_rank=0, sp_size=1)([0, 1])
    assert set(mb.inputs) == PADDED_INPUTS
    assert mb.inputs["input_ids"].shape == (2, 5)  # cut to the longest real row
    assert mb.real_mask is mb.inputs["attention_mask"] and mb.sample_lens == [3, 5]
    assert (mb.targets, mb.real_tokens, mb.slots) == (6, 8, 10) and mb.cu_seq_lens is None


def test_empty_micro_batches_carry_no_target():
    padded = MicroBatchBuilder(_items([3]), False, PAD, 0, 1)([])
    packed = MicroBatchBuilder(_items([3]), True, PAD, 1, 2)([])
    assert set(padded.inputs) == PADDED_INPUTS and set(packed.inputs) == PACKED_INPUTS
    assert padded.targets == packed.targets == 0 and packed.real_tokens == 0 and packed.sample_lens == []


def test_pin_and_to_device_move_a_shared_tensor_once():
    mb = MicroBatchBuilder(_items([2, 3]), True, PAD, 0, 1)([0, 1])
    moved = to_device(mb.inputs, torch.device("cpu"))
    assert moved["cu_seq_lens_q"] is moved["cu_seq_lens_k"] and moved["max_length_q"] == 3
    assert set(moved) == PACKED_INPUTS
    if torch.cuda.is_available():  # pinning needs an accelerator
        pinned = pin(mb)
        assert pinned.inputs["cu_seq_lens_q"] is pinned.inputs["cu_seq_lens_k"]
        assert all(t.is_pinned() for t in pinned.inputs.values() if torch.is_tensor(t))
