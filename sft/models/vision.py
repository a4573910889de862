"""Vision-language SFT on the model's own class: which families, what is frozen, and the image embedding step.

`VISION_FAMILIES` is the one declarative place for per-family behaviour: where the vision tower and its projector
are, how the tower is called (Qwen: all patches of all images with their grids, one varlen call; Gemma 3 and 4: a
batch of images through the model's `get_image_features`), whether the tower's intermediate features are added into
the first decoder layers (Qwen3-VL's deepstack), where an image's tokens attend to each other both ways (Gemma 3 and
4; sft/models/attention/image_blocks.py), and what else the decoder takes (Gemma 4's per-layer embeddings).
`embed_images` runs the tower on the images the micro-batch builder gave this rank (under SP, those its slice
shows) and writes their features over the image tokens of its slice. Every rank runs the tower on every
micro-batch (a stand-in image where it has none), so FSDP's collectives match and every vision weight gets its
gradient, zero or not.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

# What the vision tower takes of the image processor's output (and the micro-batch carries to the model).
PIXEL_KEYS = ("pixel_values", "image_grid_thw", "image_position_ids")


@dataclass(frozen=True)
class VisionFamily:
    tower: str  # module path of the vision tower in the ForConditionalGeneration class
    projector: tuple[str, ...]  # module paths of what projects into the text model (model.freeze_projector)
    deepstack: bool = False  # the tower's intermediate features are added to the first decoder layers' inputs
    # The tower takes every patch of the micro-batch with `grid_thw` and attends per image in one varlen call
    # (sft/models/attention/bidirectional.py); else it takes a batch of same-size images through the model's
    # `get_image_features` (tower and projector) with its own attention.
    grid: bool = True
    # Where the image tokens of one image attend to each other both ways (causal elsewhere): "all" layers (Gemma 3),
    # "sliding" window layers only (Gemma 4, when its text config's `use_bidirectional_attention` is "vision"), or "".
    bidirectional: str = ""
    # The keyword by which the model's own wrapper takes the image-token types (padded rows build their masks there).
    token_types: str = "token_type_ids"
    # The decoder takes per-layer token embeddings (Gemma 4's PLE), looked up with image tokens read as padding.
    per_layer_inputs: bool = False
    # Modules the images never reach (Gemma 4's audio tower): frozen, exported unchanged.
    unused: tuple[str, ...] = ()

    def blocks(self, hf_config: Any) -> str:
        """Where image blocks attend both ways for this checkpoint ("all", "sliding" or "")."""
        if self.bidirectional == "sliding":
            text = hf_config.get_text_config()
            return "sliding" if getattr(text, "use_bidirectional_attention", None) == "vision" else ""
        return self.bidirectional


_QWEN = VisionFamily("model.visual", ("model.visual.merger",))
_QWEN3 = VisionFamily("model.visual", ("model.visual.merger", "model.visual.deepstack_merger_list"), deepstack=True)
_GEMMA3 = VisionFamily("model.vision_tower", ("model.multi_modal_projector",), grid=False, bidirectional="all")
_GEMMA4 = VisionFamily(
    "model.vision_tower",
    ("model.embed_vision",),
    grid=False,
    bidirectional="sliding",
    token_types="mm_token_type_ids",
    per_layer_inputs=True,
    unused=("model.audio_tower", "model.embed_audio"),
)
VISION_FAMILIES: dict[str, VisionFamily] = {
    "qwen2_vl": _QWEN,
    "qwen2_5_vl": _QWEN,
    "qwen3_vl": _QWEN3,
    "qwen3_vl_moe": _QWEN3,
    "qwen3_5": _QWEN,  # Gated DeltaNet text layers (sft/models/recurrent/), Qwen3-VL's tower without deepstack
    "qwen3_5_moe": _QWEN,
    "gemma3": _GEMMA3,  # SigLIP tower, 1-D positions, sliding-window text layers (the family table's gemma3_text)
    "gemma4": _GEMMA4,  # aspect-preserving patches with 2-D positions, pooled 3x3; the family table's gemma4_text
}


def vision_reason(config: dict[str, Any]) -> str | None:
    """Why images cannot be trained for this checkpoint (None: they can)."""
    model_type = config.get("model_type")
    if model_type in VISION_FAMILIES:
        return None
    return (
        f"images in the data: vision-language SFT supports model types {', '.join(sorted(VISION_FAMILIES))}, "
        f"not {model_type!r}; train on text only (drop the data.image_key column) or use a supported model"
    )


def family(hf_config: Any) -> VisionFamily:
    return VISION_FAMILIES[hf_config.model_type]


def tower(lm: nn.Module, fam: VisionFamily) -> nn.Module:
    return lm.get_submodule(fam.tower)


def freeze(lm: nn.Module, fam: VisionFamily, tower_frozen: bool, projector_frozen: bool) -> tuple[int, int]:
    """`model.freeze_vision_tower` / `model.freeze_projector`: no gradient, so not in the optimizer. Returns the
    frozen tower and projector parameter counts."""
    projector_params = [p for name in fam.projector for p in lm.get_submodule(name).parameters()]
    projector = {id(p) for p in projector_params}
    params = {id(p): p for p in [*tower(lm, fam).parameters(), *projector_params]}  # Qwen's merger is in the tower
    for name in fam.unused:  # never in the graph with images: frozen, whatever the keys say
        if (part := _find(lm, name)) is not None:
            part.requires_grad_(False)
    counts = [0, 0]
    for p in params.values():
        is_projector = id(p) in projector
        if (projector_frozen if is_projector else tower_frozen) and p.requires_grad:
            p.requires_grad_(False)
            counts[is_projector] += p.numel()
    return counts[0], counts[1]


def _find(lm: nn.Module, name: str) -> nn.Module | None:
    try:
        return lm.get_submodule(name)
    except AttributeError:
        return None


def embed_images(
    lm: nn.Module,
    fam: VisionFamily,
    input_ids: torch.Tensor,
    pixels: dict[str, torch.Tensor],
    image_span: tuple[int, int],
    image_index: torch.Tensor,
    image_token_id: int,
) -> tuple[torch.Tensor, dict[str, Any], torch.Tensor]:
    """Token embeddings with this slice's image features written over its image tokens.

    input_ids [b, s] (this SP rank's slice); pixels: `pixel_values` of every image of the micro-batch, [patches, d]
    with `image_grid_thw` [images, 3] (Qwen), [images, 3, H, W] (Gemma 3) or [images, patches, d] with
    `image_position_ids` (Gemma 4); image_index [n] where this slice's image tokens sit in its flattened b*s tokens
    (written by index: masked_scatter's backward reads a count back from the GPU); features
    image_span[0]:image_span[1] of the flattened image tokens are this slice's. Returns the embeddings [b, s, h],
    the decoder's extra arguments (deepstack), and a zero that depends on every feature (added to the loss, so the
    tower's weights get their gradient on every rank, even where no image token is in the slice)."""
    mask = input_ids == image_token_id  # [b, s]
    extra: dict[str, Any] = {}
    if fam.per_layer_inputs and getattr(lm.config.get_text_config(), "hidden_size_per_layer_input", 0):
        # As the model's own wrapper: the per-layer lookup reads image tokens as padding.
        text_ids = input_ids.masked_fill(mask, lm.config.get_text_config().pad_token_id)
        extra["per_layer_inputs"] = lm.get_decoder().get_per_layer_inputs(text_ids, None)
    embeds = lm.get_input_embeddings()(input_ids)  # [b, s, h]
    visual = tower(lm, fam)
    pixels = dict(
        pixels, pixel_values=pixels["pixel_values"].to(visual.dtype if hasattr(visual, "dtype") else embeds.dtype)
    )
    if fam.grid:
        out = visual(pixels["pixel_values"], grid_thw=pixels["image_grid_thw"])
    else:  # tower + projector as the model composes them: [images, tokens per image, h] or one tensor per image
        out = lm.model.get_image_features(**pixels)
    features, layers = _tower_outputs(out)  # [image tokens of the micro-batch, h], deepstack levels of that shape
    lo, hi = image_span
    b, s, h = embeds.shape
    embeds = embeds.reshape(b * s, h).index_copy(0, image_index, features[lo:hi].to(embeds.dtype)).reshape(b, s, h)
    zero = features.sum() * 0.0
    if fam.deepstack:
        extra["visual_pos_masks"] = mask
        extra["deepstack_visual_embeds"] = [f[lo:hi].to(embeds.dtype) for f in layers]
        zero = zero + sum(f.sum() for f in layers) * 0.0
    return embeds, extra, zero


def _tower_outputs(out: Any) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(merged features [image tokens, h], deepstack features) from a vision tower's output, as transformers versions
    return it: an output object (pooler_output = merged, 5.x; per image for Gemma 4), a tensor, or a (merged,
    deepstack list) tuple (Qwen3-VL, 4.57)."""
    if hasattr(out, "pooler_output"):
        merged, layers = out.pooler_output, list(getattr(out, "deepstack_features", None) or [])
    elif isinstance(out, tuple):
        merged, layers = out[0], list(out[1] or [])
    else:
        merged, layers = out, []
    if isinstance(merged, (tuple, list)):  # one tensor per image (Gemma 4)
        merged = torch.cat(list(merged))
    return merged.reshape(-1, merged.shape[-1]), layers
