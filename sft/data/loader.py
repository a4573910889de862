"""The training data loader: one item per optimizer step, holding this rank's micro-batches.

The sampler yields a step's plan (micro-batches as lists of dataset indices); `StepFetcher`
turns it into `MicroBatch`es (the model's keyword arguments and the host-side counts), padded
(`use_remove_padding=false`) or packed and sliced for this sequence-parallel rank (`true`).
torchdata's StatefulDataLoader drives it, so worker processes can be added without changing the trainer.
"""

from __future__ import annotations

from torch.utils.data import Dataset
from torchdata.stateful_dataloader import StatefulDataLoader

from sft.data.batch import MicroBatch, empty_micro_batch, padded_micro_batch, pin, with_counts
from sft.data.packing import empty_packed_batch, packed_micro_batch, sp_slice
from sft.data.sampler import StepBatchSampler
from sft.data.vision_batch import VisionInputs


class MicroBatchBuilder:
    """Dataset indices -> one micro-batch for this rank (an empty list -> a batch with no target).

    Each batch carries its `target_index` and its counts (found here, on the host); with `pin_memory`
    its model inputs are page-locked, so the trainer's copies to the GPU never block the host.
    `token_multiple`: each rank's token count is padded to a multiple of it (FP8 GEMMs want 16, sft/ops/fp8.py).
    """

    def __init__(
        self,
        dataset: Dataset,
        packed: bool,
        pad_id: int,
        sp_rank: int,
        sp_size: int,
        pin_memory: bool = False,
        token_multiple: int = 1,
        vision: VisionInputs | None = None,
    ) -> None:
        self.dataset, self.packed, self.pad_id = dataset, packed, pad_id
        self.sp_rank, self.sp_size = sp_rank, sp_size
        self.pin_memory = pin_memory
        self.token_multiple = token_multiple
        self.vision = vision  # images in the data: pixels and multimodal positions (sft/data/vision_batch.py)

    def __call__(self, indices: list[int]) -> MicroBatch:
        mb = with_counts(self._build(indices))
        return pin(mb) if self.pin_memory else mb

    def _build(self, indices: list[int]) -> MicroBatch:
        items = [self.dataset[i] for i in indices]
        pixels = None
        if self.vision is not None and items:
            items, pixels = self.vision.prepare(items)
        if self.packed:
            row_multiple = self.sp_size * self.token_multiple  # each SP rank's slice: a multiple of token_multiple
            if not items:
                row = empty_packed_batch(self.pad_id, row_multiple)
            else:
                row = packed_micro_batch(items, self.pad_id, row_multiple)
            mb = sp_slice(row, self.sp_rank, self.sp_size)
            if self.vision is not None:
                t = row.inputs["input_ids"].shape[1]
                lo, hi = self.sp_rank * t // self.sp_size, (self.sp_rank + 1) * t // self.sp_size
                mb = self.vision.attach(mb, row.inputs["input_ids"], pixels, lo, hi)
            return mb
        mb = (
            padded_micro_batch(items, self.token_multiple)
            if items
            else empty_micro_batch(self.pad_id, self.token_multiple)
        )
        if self.vision is not None:
            ids = mb.inputs["input_ids"]
            mb = self.vision.attach(mb, ids, pixels, 0, ids.shape[-1])
        return mb


class StepFetcher(Dataset):
    """A map-style view whose keys are step plans (list of micro-batches of indices)."""

    def __init__(self, build: MicroBatchBuilder) -> None:
        self.build = build

    def __len__(self) -> int:
        return len(self.build.dataset)

    def __getitem__(self, plan: list[list[int]]) -> list[MicroBatch]:
        return [self.build(mb) for mb in plan]


def _as_is(step: list[MicroBatch]) -> list[MicroBatch]:
    return step


def build_train_loader(sampler: StepBatchSampler, build: MicroBatchBuilder) -> StatefulDataLoader:
    # batch_size=None: each sampler item (a step plan) is fetched whole; no default collation.
    return StatefulDataLoader(StepFetcher(build), sampler=sampler, batch_size=None, collate_fn=_as_is)
