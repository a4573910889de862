"""Rank function for the vision-language tests: tiny VLMs trained in one spawned process group."""

from __future__ import annotations

import torch
from family_workers import train_recorded

from sft.data.vision_batch import VisionInputs
from sft.models.attention.image_blocks import ImageBlocks
from sft.parallel.distributed import init_distributed, teardown


def _shift_later_images(prepare, image_token_id: int):
    """A planted bug: the image tokens of each sample after the first get their positions offset by the length of
    the samples before it (the image grid placed from the row's start, not the sample's). Shifting a whole sample
    would change nothing, exactly: rotary attention sees relative positions only, and a packed sample attends only
    to itself."""

    def shifted(self, items):
        items, pixels = prepare(self, items)
        at = 0
        for it in items:
            real = int(it["attention_mask"].sum())
            image = it["input_ids"][:real] == image_token_id
            it["position_ids"][..., :real][..., image] += at  # [3, s] (multimodal rotary) or [s]
            at += real
        return items, pixels

    return shifted


def train_jobs(jobs: list[tuple[list[str], str]], sp: int, plant: str | None = None) -> None:
    """For each (overrides, out_file): train; rank 0 saves the full trained weights, the logged metrics, and the
    names of the parameters the optimizer holds. `plant`: "positions" (see `_shift_later_images`) or "causal" (a
    packed row carries no image blocks, so image tokens attend causally only)."""
    if plant == "causal":
        ImageBlocks.find = classmethod(lambda cls, *args: None)
    if plant == "positions":
        init = VisionInputs.__init__

        def planted_init(self, processor, hf_config, image_token_id):
            init(self, processor, hf_config, image_token_id)
            self.prepare = _shift_later_images(VisionInputs.prepare, image_token_id).__get__(self)

        VisionInputs.__init__ = planted_init
    ctx = init_distributed("cpu", sp)
    try:
        for overrides, out_file in jobs:
            trainer, result = train_recorded(ctx, overrides)
            names = {id(p): n for n, p in trainer.model.named_parameters()}
            if ctx.rank == 0:
                result["optimized"] = [names[id(p)] for g in trainer.optimizer.param_groups for p in g["params"]]
                torch.save(result, out_file)
    finally:
        teardown()
