"""Vision-language SFT on the model's own class: which families, what is frozen, and the image embedding step.

`VISION_FAMILIES` is the one declarative place for per-family behaviour: where the vision tower and its projector
are, and whether the tower's intermediate features are added into the first decoder layers (Qwen3-VL's deepstack).
`embed_images` runs the tower on every image of the micro-batch and writes this rank's share of the image features
over the image tokens of its slice of the row (the whole row's features on every SP rank: a slice boundary may
fall inside an image). Every rank runs the tower on every micro-batch (a stand-in image where it has none), so
FSDP's collectives match and every vision weight gets its gradient, zero or not.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class VisionFamily:
    tower: str  # module path of the vision tower in the ForConditionalGeneration class
    projector: tuple[str, ...]  # its children that project into the text model (model.freeze_projector)
    deepstack: bool = False  # the tower's intermediate features are added to the first decoder layers' inputs


_QWEN = VisionFamily("model.visual", ("merger",))
_QWEN3 = VisionFamily("model.visual", ("merger", "deepstack_merger_list"), deepstack=True)
VISION_FAMILIES: dict[str, VisionFamily] = {
    "qwen2_vl": _QWEN,
    "qwen2_5_vl": _QWEN,
    "qwen3_vl": _QWEN3,
    "qwen3_vl_moe": _QWEN3,
    "qwen3_5": _QWEN,  # Gated DeltaNet text layers (sft/models/recurrent/), Qwen3-VL's tower without deepstack
    "qwen3_5_moe": _QWEN,
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
    visual = tower(lm, fam)
    projector = {id(p) for name in fam.projector for p in visual.get_submodule(name).parameters()}
    counts = [0, 0]
    for p in visual.parameters():
        is_projector = id(p) in projector
        if (projector_frozen if is_projector else tower_frozen) and p.requires_grad:
            p.requires_grad_(False)
            counts[is_projector] += p.numel()
    return counts[0], counts[1]


def embed_images(
    lm: nn.Module,
    fam: VisionFamily,
    input_ids: torch.Tensor,
    pixel_values: torch.Tensor,
    image_grid_thw: torch.Tensor,
    image_span: tuple[int, int],
    image_token_id: int,
) -> tuple[torch.Tensor, dict[str, Any], torch.Tensor]:
    """Token embeddings with this slice's image features written over its image tokens.

    input_ids [b, s] (this SP rank's slice); pixel_values [patches, d] of every image of the micro-batch; features
    image_span[0]:image_span[1] of the flattened image tokens are this slice's. Returns the embeddings [b, s, h],
    the decoder's extra arguments (deepstack), and a zero that depends on every feature (added to the loss, so the
    tower's weights get their gradient on every rank, even where no image token is in the slice)."""
    embeds = lm.get_input_embeddings()(input_ids)  # [b, s, h]
    visual = tower(lm, fam)
    out = visual(pixel_values.to(visual.dtype if hasattr(visual, "dtype") else embeds.dtype), grid_thw=image_grid_thw)
    features, layers = _tower_outputs(out)  # [image tokens of the micro-batch, h], deepstack levels of that shape
    lo, hi = image_span
    mask = input_ids == image_token_id  # [b, s]
    embeds = embeds.masked_scatter(mask[..., None], features[lo:hi].to(embeds.dtype))
    zero = features.sum() * 0.0
    extra: dict[str, Any] = {}
    if fam.deepstack:
        extra["visual_pos_masks"] = mask
        extra["deepstack_visual_embeds"] = [f[lo:hi].to(embeds.dtype) for f in layers]
        zero = zero + sum(f.sum() for f in layers) * 0.0
    return embeds, extra, zero


def _tower_outputs(out: Any) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(merged features, deepstack features) from a vision tower's output, as transformers versions return it: an
    output object (pooler_output = merged, 5.x), a tensor, or a (merged, deepstack list) tuple (Qwen3-VL, 4.57)."""
    if hasattr(out, "pooler_output"):
        return out.pooler_output, list(getattr(out, "deepstack_features", None) or [])
    if isinstance(out, tuple):
        return out[0], list(out[1] or [])
    return out, []
