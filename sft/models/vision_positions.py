"""Multimodal rotary position ids (M-RoPE) of one sample, computed on the host by the data loader.

Qwen2-VL, Qwen2.5-VL, Qwen3-VL and Qwen3.5 (dense and MoE) rotate three position streams (temporal, height, width).
A text token has one position in all three; the tokens of an image or video carry their merged (t, h, w) grid
indices offset by the position where the media starts; text after it resumes at the largest position so far + 1.
Each sample starts at 0, so a packed row's ids are the concatenation of its samples' ids: no GPU work per step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

TEXT, IMAGE, VIDEO = 0, 1, 2
_NAMES = {IMAGE: "image", VIDEO: "video"}


@dataclass(frozen=True)
class _Family:
    """How a family lays out videos (images are the same in every family)."""

    # "grid": a video is one run of tokens over its (t, h, w) grid, temporal ids 0..t-1 (Qwen2-VL, Qwen2.5-VL).
    # "frames": each temporal grid step is its own run, wrapped in vision start/end and preceded by a text
    # timestamp ("<1.5 seconds>"), so every frame is positioned like an image with t = 1 (Qwen3-VL, Qwen3.5).
    video_layout: str
    # Temporal ids are int(i * tokens_per_second * second_per_grid_t) (Qwen2.5-VL's absolute time), not i.
    timed: bool = False


# Keyed by the multimodal config's model_type; the text model's own type (qwen3_vl_text, ...) has no vision.
_FAMILIES: dict[str, _Family] = {
    "qwen2_vl": _Family("grid"),
    "qwen2_5_vl": _Family("grid", timed=True),
    "qwen3_vl": _Family("frames"),
    "qwen3_vl_moe": _Family("frames"),
    "qwen3_5": _Family("frames"),
    "qwen3_5_moe": _Family("frames"),
}


@dataclass(frozen=True)
class MropeSpec:
    """What a family's 3-D positions need (read from the HF config)."""

    image_token_id: int
    video_token_id: int | None
    vision_start_token_id: int  # every image (or video frame) run must follow one: how the processors lay them out
    spatial_merge_size: int  # the vision merger joins merge x merge patches into one token
    tokens_per_second: float | None  # Qwen2.5-VL video time scaling; None where the family has none
    video_layout: str | None  # "grid" or "frames" (see _Family); None: videos are refused
    model_type: str

    @classmethod
    def from_config(cls, hf_config: Any) -> MropeSpec | None:
        """The spec of a multimodal config; None for a model without multimodal rotary positions. A model that has
        them in a family this module does not know raises, so its images never silently get 1-D positions."""
        model_type = getattr(hf_config, "model_type", None)
        family = _FAMILIES.get(model_type)
        if family is None:
            if _uses_mrope(hf_config):
                raise ValueError(
                    f"model_type={model_type!r} uses multimodal rotary positions (3-D position ids), which sft "
                    f"computes only for {sorted(_FAMILIES)}; train it on text only, or add its rule to "
                    "sft/models/vision_positions.py"
                )
            return None
        vision = hf_config.vision_config
        tokens_per_second = getattr(vision, "tokens_per_second", None) if family.timed else None
        if family.timed and tokens_per_second is None:
            raise ValueError(f"{model_type}: vision_config.tokens_per_second is missing; the config is incomplete")
        return cls(
            image_token_id=int(hf_config.image_token_id),
            video_token_id=None if hf_config.video_token_id is None else int(hf_config.video_token_id),
            vision_start_token_id=int(hf_config.vision_start_token_id),
            spatial_merge_size=int(vision.spatial_merge_size),
            tokens_per_second=None if tokens_per_second is None else float(tokens_per_second),
            video_layout=family.video_layout,
            model_type=model_type,
        )


def _uses_mrope(hf_config: Any) -> bool:
    """Whether transformers positions this vision model's tokens in 3-D: its base class has a rope index, or its
    text config splits the rotary frequencies into mrope sections. A text-only config (no vision_config) never
    needs them: its 1-D positions are the 3-D ones of a sample without images."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

    if getattr(hf_config, "vision_config", None) is None:
        return False
    text = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    for key in ("rope_parameters", "rope_scaling"):
        rope = getattr(text, key, None)
        if isinstance(rope, dict) and "mrope_section" in rope:
            return True
    name = MODEL_MAPPING_NAMES.get(getattr(hf_config, "model_type", None))
    return isinstance(name, str) and hasattr(getattr(transformers, name, None), "get_rope_index")


def _grids(grid_thw: Any, what: str) -> np.ndarray:
    """[n, 3] int64 (t, h, w) patches per item; [0, 3] for None."""
    if grid_thw is None:
        return np.zeros((0, 3), np.int64)
    arr = np.asarray(grid_thw.cpu() if isinstance(grid_thw, torch.Tensor) else grid_thw, dtype=np.int64)
    if arr.ndim != 2 or arr.shape[1] != 3:
        raise ValueError(f"{what} must be [n, 3] (t, h, w) per item, got shape {tuple(arr.shape)}")
    if (arr < 1).any():
        raise ValueError(f"{what} has a non-positive size: {arr.tolist()}")
    return arr


def _grid_positions(t: int, h: int, w: int, step: float | None) -> np.ndarray:
    """Positions of one merged grid relative to its start: [3, t*h*w] in the vision tower's token order (t, then h,
    then w, row-major). `step` scales temporal ids (float32, truncated, as the processor's float32 times give)."""
    pos = np.indices((t, h, w), dtype=np.int64).reshape(3, -1)  # [3, t*h*w]
    if step is not None and t > 1:
        temporal = (np.arange(t, dtype=np.float32) * np.float32(step)).astype(np.int64)  # [t]
        pos[0] = np.repeat(temporal, h * w)
    return pos


def _media_items(
    spec: MropeSpec, image_grid_thw: Any, video_grid_thw: Any, second_per_grid_ts: Any
) -> dict[int, list[tuple[int, int, int, float | None]]]:
    """Per kind, the items in order as (t, h, w, temporal step) with h and w merged; one item is one token run."""
    m = spec.spatial_merge_size
    images, videos = _grids(image_grid_thw, "image_grid_thw"), _grids(video_grid_thw, "video_grid_thw")
    for grid, what in ((images, "image_grid_thw"), (videos, "video_grid_thw")):
        if (grid[:, 1:] % m).any():
            raise ValueError(f"{what} {grid.tolist()}: h and w must be multiples of spatial_merge_size={m}")
    items: dict[int, list[tuple[int, int, int, float | None]]] = {
        IMAGE: [(int(t), int(h) // m, int(w) // m, None) for t, h, w in images],
        VIDEO: [],
    }
    if second_per_grid_ts is not None and spec.tokens_per_second is None:
        raise ValueError(
            f"second_per_grid_ts was given, but {spec.model_type} does not scale video time (only families with "
            "vision_config.tokens_per_second, Qwen2.5-VL, read it)"
        )
    if len(videos) == 0:
        return items
    if spec.video_layout is None:
        raise ValueError(f"videos are not supported for {spec.model_type}")
    if spec.video_layout == "frames":
        # One run per frame, each an image of t = 1: [n, 3] -> [sum(t), 3].
        frames = np.repeat(videos, videos[:, 0], axis=0)
        items[VIDEO] = [(1, int(h) // m, int(w) // m, None) for _, h, w in frames]
        return items
    step: Sequence[float | None] = [None] * len(videos)
    if spec.tokens_per_second is not None:
        seconds = np.ones(len(videos), np.float32)  # the model's default when the processor gave none
        if second_per_grid_ts is not None:
            given = second_per_grid_ts.cpu() if isinstance(second_per_grid_ts, torch.Tensor) else second_per_grid_ts
            seconds = np.asarray(given, dtype=np.float32).reshape(-1)
            if len(seconds) != len(videos):
                raise ValueError(f"second_per_grid_ts has {len(seconds)} values for {len(videos)} videos")
        # float32 products, as the model multiplies the processor's float32 tensor.
        step = [float(np.float32(spec.tokens_per_second) * s) for s in seconds]
    items[VIDEO] = [(int(t), int(h) // m, int(w) // m, s) for (t, h, w), s in zip(videos, step)]
    return items


def mrope_positions(
    input_ids: np.ndarray | torch.Tensor,
    spec: MropeSpec,
    image_grid_thw: torch.Tensor | None,
    video_grid_thw: torch.Tensor | None = None,
    second_per_grid_ts: torch.Tensor | Sequence[float] | None = None,
) -> torch.Tensor:
    """Position ids [3, s] int64 (temporal, height, width) of one unpadded sample `input_ids` [s].

    Grids are [n, 3] (t, h, w) in patches before the spatial merge, one row per image / video in order of
    appearance; `second_per_grid_ts` [n_videos] (Qwen2.5-VL) is the processor's seconds per temporal grid step.
    Each image (or video, or video frame for Qwen3-VL / Qwen3.5) must be one run of its tokens right after a
    vision-start token, with exactly t*h*w / merge^2 tokens; anything else raises ValueError.
    """
    ids = np.asarray(input_ids.cpu() if isinstance(input_ids, torch.Tensor) else input_ids)
    if ids.ndim != 1:
        raise ValueError(f"input_ids must be one unpadded sample [s], got shape {tuple(ids.shape)}")
    s = len(ids)
    kind = np.where(ids == spec.image_token_id, IMAGE, TEXT)  # [s]
    if spec.video_token_id is not None:
        kind = np.where(ids == spec.video_token_id, VIDEO, kind)
    if spec.video_layout is None and (kind == VIDEO).any():
        raise ValueError(f"videos are not supported for {spec.model_type}")
    items = _media_items(spec, image_grid_thw, video_grid_thw, second_per_grid_ts)

    # Maximal runs of one kind: [r] starts, ends (exclusive), kinds; text runs dropped.
    cut = np.flatnonzero(kind[1:] != kind[:-1]) + 1
    starts, ends = (np.r_[0, cut], np.r_[cut, s]) if s else (np.zeros(0, np.int64), np.zeros(0, np.int64))
    media = kind[starts] != TEXT
    starts, ends, kinds = starts[media], ends[media], kind[starts[media]]
    for k, name in _NAMES.items():
        runs = int((kinds == k).sum())
        if runs != len(items[k]):
            frames = k == VIDEO and spec.video_layout == "frames"
            raise ValueError(
                f"{spec.model_type}: the sample has {runs} runs of {name} tokens (id "
                f"{spec.image_token_id if k == IMAGE else spec.video_token_id}) but the grids give {len(items[k])} "
                f"{'video frames (one per temporal grid step)' if frames else name + 's'}; each is one unbroken "
                "run of its tokens after a vision-start token"
            )
    orphan = (starts == 0) | (ids[np.maximum(starts - 1, 0)] != spec.vision_start_token_id)
    if orphan.any():
        i = int(starts[orphan][0])
        raise ValueError(
            f"{spec.model_type}: the {_NAMES[int(kind[i])]} tokens at {i} do not follow a vision-start token "
            f"(id {spec.vision_start_token_id}); the processor's chat template wraps every image in one"
        )

    positions = np.empty((3, s), np.int64)  # [3, s]
    next_pos, done = 0, 0  # next free position id; tokens placed so far
    seen = {IMAGE: 0, VIDEO: 0}
    for start, end, k in zip(starts.tolist(), ends.tolist(), kinds.tolist()):
        positions[:, done:start] = np.arange(next_pos, next_pos + start - done)  # text before: [3, start-done]
        next_pos += start - done
        t, h, w, step = items[k][seen[k]]
        if end - start != t * h * w:
            m = spec.spatial_merge_size
            raise ValueError(
                f"{spec.model_type}: {_NAMES[k]} {seen[k]} (tokens {start}:{end}) has {end - start} tokens, but its "
                f"grid {(t, h * m, w * m)} merged by {m} gives {t}*{h}*{w} = {t * h * w}"
            )
        grid = _grid_positions(t, h, w, step)  # [3, t*h*w]
        positions[:, start:end] = grid + next_pos
        next_pos += int(grid.max()) + 1
        seen[k] += 1
        done = end
    positions[:, done:] = np.arange(next_pos, next_pos + s - done)  # text after the last media: [3, s-done]
    return torch.from_numpy(positions)
