"""The images of one micro-batch, as the loader builds it in the background: pixels, grids, positions, SP share.

`VisionInputs.prepare` decodes the micro-batch's images (its samples' in order), runs the processor's image
part on them, and gives each sample its multimodal rotary positions ([3, s], sft/models/vision_positions.py),
computed for that sample alone so a packed row restarts them at every sample (families with 1-D positions keep the
text positions). `attach` adds the pixels (and grids) to the model inputs with `image_span`: which of the row's
image tokens fall in this SP rank's slice, and `image_index`: where they sit in it. Under SP each rank runs the
tower on the images its slice shows (one cut by a slice boundary on both ranks). A packed row of a family whose
image tokens attend both ways (Gemma) also gets its `image_blocks` (sft/models/attention/image_blocks.py). A
micro-batch or slice without images carries a blank stand-in image whose features are used by no token (every
rank must run the vision tower: its weights are sharded and gathered by all ranks together).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from PIL import Image

from sft.data.batch import MicroBatch
from sft.data.images import load_image
from sft.models.attention.image_blocks import ImageBlocks, runs
from sft.models.vision import PIXEL_KEYS, family
from sft.models.vision_positions import MropeSpec, mrope_positions


class VisionInputs:
    """Images of micro-batches for one model: its processor, rotary layout and image token."""

    def __init__(self, processor: Any, hf_config: Any, image_token_id: int) -> None:
        self.image_processor = processor.image_processor
        self.spec = MropeSpec.from_config(hf_config)  # None: 1-D positions (Gemma 3)
        self.blocks = family(hf_config).blocks(hf_config)  # where image tokens attend both ways ("": nowhere)
        self.image_token_id = image_token_id
        ip = self.image_processor
        side = 2 * getattr(ip, "patch_size", 14) * getattr(ip, "merge_size", 2)
        self.blank = self._pixels([Image.new("RGB", (side, side))])

    def _pixels(self, images: list[Image.Image]) -> dict[str, torch.Tensor]:
        out = self.image_processor(images=images, return_tensors="pt")
        return {k: out[k] for k in PIXEL_KEYS if k in out}

    def prepare(self, items: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, torch.Tensor] | None]:
        """The items with their multimodal positions, and the micro-batch's pixels (None: no image in it)."""
        images = [load_image(ref, it["where"]) for it in items for ref in it["images"]]
        pixels = self._pixels(images) if images else None
        if self.spec is None:
            return items, pixels
        grids = pixels["image_grid_thw"] if pixels is not None else torch.zeros(0, 3, dtype=torch.long)
        out, at = [], 0
        for it in items:
            n = len(it["images"])
            real = int(it["attention_mask"].sum())
            positions = torch.zeros(3, len(it["input_ids"]), dtype=torch.long)  # padding keeps position 0
            positions[:, :real] = mrope_positions(it["input_ids"][:real], self.spec, grids[at : at + n])
            out.append(dict(it, position_ids=positions))
            at += n
        return out, pixels

    def _share(
        self, pixels: dict[str, torch.Tensor], is_image: torch.Tensor, lo: int, hi: int
    ) -> tuple[dict[str, torch.Tensor] | None, int]:
        """The pixels of the images whose tokens fall in [lo, hi) of the row (None: no such image), and the count of
        image tokens before the first of them. An image cut by a slice boundary runs on both ranks, the others on
        one. Each image is one run of image tokens; where runs and images do not pair up (two images' tokens
        adjacent), every image stays."""
        flags = is_image.tolist()
        images = runs(flags, 0, len(flags))  # one run of image tokens per image, in order
        grids = pixels.get("image_grid_thw")
        n_images = len(grids) if grids is not None else len(pixels["pixel_values"])
        if len(images) != n_images:
            return pixels, 0
        shown = [i for i, (a, b) in enumerate(images) if a < hi and b > lo]
        if not shown:
            return None, 0
        i0, i1 = shown[0], shown[-1] + 1
        before = sum(b - a for a, b in images[:i0])
        if grids is None:  # one entry per image in every tensor
            return {k: v[i0:i1] for k, v in pixels.items()}, before
        ends = grids.prod(-1).cumsum(0).tolist()  # Qwen: the images' patches, one after another
        starts = [0, *ends[:-1]]
        return {
            "pixel_values": pixels["pixel_values"][starts[i0] : ends[i1 - 1]],
            "image_grid_thw": grids[i0:i1],
        }, before

    def attach(
        self, mb: MicroBatch, row_ids: torch.Tensor, pixels: dict[str, torch.Tensor] | None, lo: int, hi: int
    ) -> MicroBatch:
        """Model inputs plus the pixels and `image_span`: the image tokens of row_ids[..., lo:hi] (this rank's
        slice of the whole row) as a range of the row's image tokens in order."""
        is_image = row_ids == self.image_token_id  # [b, s]: padded rows (lo=0, hi=s) or the whole packed row
        first, count = int(is_image[..., :lo].sum()), int(is_image[..., lo:hi].sum())
        if pixels is None:
            assert count == 0, "image tokens without images"
        elif hi - lo < is_image.shape[-1]:  # a sequence-parallel slice: only the images it shows
            pixels, before = self._share(pixels, is_image.reshape(-1), lo, hi)
            first -= before
        if pixels is None or count == 0:
            pixels, first = self.blank, 0
        # Where this slice's image tokens sit in its flattened [b * s] tokens, found here so the model writes the
        # features by index (masked_scatter's backward would read a count back from the GPU).
        index = is_image[..., lo:hi].reshape(-1).nonzero().squeeze(1)
        inputs = dict(mb.inputs, **pixels, image_span=(first, first + count), image_index=index)
        if self.blocks and "cu_seq_lens_q" in inputs:  # packed: padded rows use the model's own masks
            blocks = ImageBlocks.find(is_image.reshape(-1), inputs["cu_seq_lens_q"].tolist(), self.blocks == "sliding")
            if blocks is not None:
                inputs["image_blocks"] = blocks
        return replace(mb, inputs=inputs)
