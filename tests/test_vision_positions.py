"""Host-side M-RoPE position ids (sft/models/vision_positions.py) against each family's own rope index.

Every Qwen vision family transformers has is built tiny (one text layer, one vision block) only to call its
`get_rope_index` on the same sample, batch of one, no padding: text only, one image, three images of different
grids with text around them, videos (whole grids or per-frame with timestamps), packing, and malformed samples.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import pytest
import torch
import transformers
from transformers import Qwen2Config

from sft.models.vision_positions import MropeSpec, mrope_positions

IMG, VID, VS, VE = 60, 61, 62, 63  # image pad, video pad, vision start, vision end (tiny vocabulary of 64)
MERGE = 2
TOKENS_PER_SECOND = 2  # Qwen2.5-VL's released value

TEXT = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    bos_token_id=0,
    eos_token_id=1,
)
MROPE = dict(rope_type="default", rope_theta=10000.0, mrope_section=[2, 1, 1])
VISION = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32, spatial_merge_size=MERGE)
GDN = dict(
    layer_types=["full_attention"],
    linear_num_key_heads=2,
    linear_num_value_heads=2,
    linear_key_head_dim=8,
    linear_value_head_dim=8,
)
MOE = dict(num_experts=2, num_experts_per_tok=1, moe_intermediate_size=16)
# model_type -> (config class, model class, text config, vision config)
FAMILIES = {
    "qwen2_vl": (
        "Qwen2VLConfig",
        "Qwen2VLModel",
        dict(TEXT, rope_parameters=MROPE),
        dict(depth=1, embed_dim=16, hidden_size=32, num_heads=2, mlp_ratio=2, spatial_merge_size=MERGE),
    ),
    "qwen2_5_vl": (
        "Qwen2_5_VLConfig",
        "Qwen2_5_VLModel",
        dict(TEXT, rope_parameters=MROPE),
        dict(VISION, tokens_per_second=TOKENS_PER_SECOND),
    ),
    "qwen3_vl": (
        "Qwen3VLConfig",
        "Qwen3VLModel",
        dict(TEXT, rope_parameters=dict(MROPE, mrope_interleaved=True)),
        dict(VISION, deepstack_visual_indexes=[0], num_position_embeddings=16),
    ),
    "qwen3_vl_moe": (
        "Qwen3VLMoeConfig",
        "Qwen3VLMoeModel",
        dict(TEXT, **MOE, rope_parameters=dict(MROPE, mrope_interleaved=True)),
        dict(VISION, deepstack_visual_indexes=[0], num_position_embeddings=16),
    ),
    "qwen3_5": ("Qwen3_5Config", "Qwen3_5Model", dict(TEXT, **GDN), dict(VISION, num_position_embeddings=16)),
    "qwen3_5_moe": (
        "Qwen3_5MoeConfig",
        "Qwen3_5MoeModel",
        dict(TEXT, **GDN, **MOE, shared_expert_intermediate_size=16),
        dict(VISION, num_position_embeddings=16),
    ),
}
FAMILIES = {k: v for k, v in FAMILIES.items() if hasattr(transformers, v[0])}
GRID_VIDEO = ("qwen2_vl", "qwen2_5_vl")  # one token run per video; the others: one run per frame


@functools.cache
def family(model_type: str):
    """(config, model) of a tiny random model; the model is only asked for its rope index."""
    config_cls, model_cls, text, vision = FAMILIES[model_type]
    cfg = getattr(transformers, config_cls)(
        text_config=text, vision_config=vision, image_token_id=IMG, video_token_id=VID, vision_start_token_id=VS
    )
    torch.manual_seed(0)
    return cfg, getattr(transformers, model_cls)(cfg).eval()


def build(model_type: str, parts: list) -> tuple[torch.Tensor, list, list]:
    """A sample from parts: an int n is n text tokens, ("image" | "video", (t, h, w)) a wrapped image / video in
    the processor's layout. Returns (input_ids [s], image grids, video grids)."""
    rng = np.random.default_rng(len(parts))
    ids: list[int] = []
    images, videos = [], []
    for part in parts:
        if isinstance(part, int):
            ids += rng.integers(2, 59, part).tolist()
            continue
        what, (t, h, w) = part
        per_frame = h * w // MERGE**2
        if what == "image":
            images.append([t, h, w])
            ids += [VS] + [IMG] * (t * per_frame) + [VE]
        elif model_type in GRID_VIDEO:
            videos.append([t, h, w])
            ids += [VS] + [VID] * (t * per_frame) + [VE]
        else:  # "<0.5 seconds>" before each frame, then the frame wrapped in vision start / end
            videos.append([t, h, w])
            for _ in range(t):
                ids += rng.integers(2, 59, 3).tolist() + [VS] + [VID] * per_frame + [VE]
    return torch.tensor(ids), images, videos


def ours(model_type: str, ids, images, videos, seconds=None) -> torch.Tensor:
    spec = MropeSpec.from_config(family(model_type)[0])
    return mrope_positions(ids, spec, _grid(images), _grid(videos), seconds)


def _grid(rows: list) -> torch.Tensor | None:
    return torch.tensor(rows) if rows else None


def theirs(model_type: str, ids, images, videos, seconds=None) -> torch.Tensor:
    """The model's own rope index on the sample alone: [3, s]."""
    _, model = family(model_type)
    types = torch.where(ids == IMG, 1, torch.where(ids == VID, 2, 0))
    kw = {} if seconds is None else {"second_per_grid_ts": seconds}
    pos, _ = model.get_rope_index(
        ids[None],
        mm_token_type_ids=types[None],
        image_grid_thw=torch.tensor(images) if images else None,
        video_grid_thw=torch.tensor(videos) if videos else None,
        **kw,
    )
    return pos[:, 0]


IMAGE_SAMPLES = {
    "text only": [17],
    "one image": [5, ("image", (1, 4, 6)), 7],
    "image first": [("image", (1, 6, 2)), 4],
    "three images": [3, ("image", (1, 4, 6)), 5, ("image", (1, 2, 2)), 1, ("image", (1, 8, 4)), 9],
    "adjacent wrapped images": [2, ("image", (1, 4, 4)), ("image", (1, 2, 6))],
}
# Videos whose temporal ids stay below the merged height / width, where transformers and the original rule agree
# (see test_grid_video_text_resumes_after_the_last_temporal_id for where they part).
VIDEO_SAMPLES = {
    "one video": ([4, ("video", (3, 8, 8)), 5], [0.5]),
    "video between images": ([2, ("image", (1, 4, 6)), 3, ("video", (2, 4, 6)), 1, ("image", (1, 2, 2)), 3], [1.0]),
    "two videos, fractional time": ([1, ("video", (4, 8, 8)), 2, ("video", (2, 8, 6)), 2], [0.25, 0.75]),
}


@pytest.mark.parametrize("model_type", FAMILIES)
@pytest.mark.parametrize("sample", IMAGE_SAMPLES)
def test_images_match_the_models_rope_index(model_type, sample):
    ids, images, videos = build(model_type, IMAGE_SAMPLES[sample])
    got = ours(model_type, ids.numpy(), images, videos)  # numpy in, as the data loader has it
    assert got.dtype == torch.int64 and got.shape == (3, len(ids))
    assert torch.equal(got, theirs(model_type, ids, images, videos))


@pytest.mark.parametrize("model_type", FAMILIES)
@pytest.mark.parametrize("sample", VIDEO_SAMPLES)
def test_videos_match_the_models_rope_index(model_type, sample):
    parts, seconds = VIDEO_SAMPLES[sample]
    ids, images, videos = build(model_type, parts)
    secs = torch.tensor(seconds) if model_type == "qwen2_5_vl" else None
    got = ours(model_type, ids, images, videos, secs)
    assert torch.equal(got, theirs(model_type, ids, images, videos, secs))


def test_qwen2_5_video_time_scaling_by_value():
    """Temporal ids are int(i * tokens_per_second * second_per_grid_t) + start; h and w ignore time."""
    ids, images, videos = build("qwen2_5_vl", [2, ("video", (4, 8, 8)), 1])
    got = ours("qwen2_5_vl", ids, images, videos, torch.tensor([0.75]))  # step 1.5: 0, 1.5, 3, 4.5
    video = got[:, ids == VID]  # [3, 4 * 16]
    assert video[0].unique().tolist() == [3 + 0, 3 + 1, 3 + 3, 3 + 4]
    assert video[1].unique().tolist() == video[2].unique().tolist() == [3, 4, 5, 6]
    ids, images, videos = build("qwen2_5_vl", [2, ("video", (2, 8, 8)), 1])
    default = ours("qwen2_5_vl", ids, images, videos)  # no seconds: 1 s per grid step, as the model assumes
    assert default[0, ids == VID].unique().tolist() == [3, 3 + TOKENS_PER_SECOND]
    assert torch.equal(default, theirs("qwen2_5_vl", ids, images, videos))


@pytest.mark.parametrize("model_type", [t for t in GRID_VIDEO if t in FAMILIES])
def test_grid_video_text_resumes_after_the_last_temporal_id(model_type):
    """A video longer (in temporal ids) than it is tall or wide: text after it resumes at max + 1, as Qwen's own
    code and vLLM do. transformers 5.x resumes at start + max(h, w) / merge instead (text ids then repeat ids the
    video already used); everything before that point is the same."""
    ids, images, videos = build(model_type, [3, ("video", (6, 4, 4)), 4])  # merged 2 x 2, 6 temporal steps
    secs = torch.tensor([1.0]) if model_type == "qwen2_5_vl" else None
    got, ref = ours(model_type, ids, images, videos, secs), theirs(model_type, ids, images, videos, secs)
    start, end = 4, int(torch.nonzero(ids == VID).max()) + 1  # 3 text tokens and vision start, then the video
    resume = int(got[:, :end].max()) + 1
    assert resume == start + (5 * 2 if model_type == "qwen2_5_vl" else 5) + 1  # last temporal id + 1
    assert torch.equal(got[:, :end], ref[:, :end])
    assert got[:, end:].tolist() == [list(range(resume, resume + 5))] * 3  # vision end and 4 text tokens
    assert (got[:, end:] - ref[:, end:]).unique().tolist() == [resume - (start + 2)]


@pytest.mark.parametrize("model_type", FAMILIES)
def test_packed_row_is_the_concatenation_of_samples(model_type):
    first = build(model_type, [4, ("image", (1, 4, 6)), 3, ("image", (1, 2, 4)), 2])
    second = build(model_type, [1, ("video", (2, 8, 8)), 2, ("image", (1, 6, 6)), 5])
    secs = torch.tensor([1.0]) if model_type == "qwen2_5_vl" else None
    row = torch.cat([ours(model_type, *first), ours(model_type, *second, secs)], dim=1)
    ref = torch.cat([theirs(model_type, *first), theirs(model_type, *second, secs)], dim=1)
    assert torch.equal(row, ref)
    n = len(first[0])
    assert row[:, n].tolist() == [0, 0, 0]  # the second sample starts again at 0
    assert row[:, n - 1].min() > 0


@pytest.mark.parametrize("model_type", FAMILIES)
def test_token_count_that_disagrees_with_the_grids_raises(model_type):
    spec = MropeSpec.from_config(family(model_type)[0])
    ids, images, _ = build(model_type, [3, ("image", (1, 4, 6)), 2, ("image", (1, 2, 2)), 1])
    short = torch.cat([ids[:4], ids[5:]])  # image 0 loses a token: 5 of 6
    with pytest.raises(
        ValueError, match=r"image 0 \(tokens 4:9\) has 5 tokens, but its grid \(1, 4, 6\) merged by 2 gives 1\*2\*3 = 6"
    ):
        mrope_positions(short, spec, torch.tensor(images))
    with pytest.raises(ValueError, match="2 runs of image tokens .* but the grids give 1 images"):
        mrope_positions(ids, spec, torch.tensor(images[:1]))
    with pytest.raises(ValueError, match="2 runs of image tokens .* but the grids give 3 images"):
        mrope_positions(ids, spec, torch.tensor(images + images[:1]))
    with pytest.raises(ValueError, match="2 runs of image tokens .* but the grids give 0 images"):
        mrope_positions(ids, spec, None)
    bare = ids.clone()
    bare[3] = 5  # the first image's vision-start token replaced by text
    with pytest.raises(ValueError, match="image tokens at 4 do not follow a vision-start token"):
        mrope_positions(bare, spec, torch.tensor(images))
    with pytest.raises(ValueError, match="multiples of spatial_merge_size=2"):
        mrope_positions(ids, spec, torch.tensor([[1, 4, 6], [1, 3, 2]]))


def test_video_rules():
    spec = MropeSpec.from_config(family("qwen3_vl")[0])
    ids, _, videos = build("qwen3_vl", [2, ("video", (3, 4, 4)), 1])
    with pytest.raises(ValueError, match="3 runs of video tokens .* give 2 video frames"):
        mrope_positions(ids, spec, None, torch.tensor([[2, 4, 4]]))
    with pytest.raises(ValueError, match="qwen3_vl does not scale video time"):
        mrope_positions(ids, spec, None, torch.tensor(videos), torch.tensor([1.0]))
    with pytest.raises(ValueError, match="videos are not supported for qwen3_vl"):
        mrope_positions(ids, dataclasses.replace(spec, video_layout=None), None, torch.tensor(videos))
    q25 = MropeSpec.from_config(family("qwen2_5_vl")[0])
    ids, _, videos = build("qwen2_5_vl", [2, ("video", (3, 4, 4)), 1])
    with pytest.raises(ValueError, match="second_per_grid_ts has 2 values for 1 videos"):
        mrope_positions(ids, q25, None, torch.tensor(videos), [1.0, 2.0])


def test_spec_from_config():
    q25 = MropeSpec.from_config(family("qwen2_5_vl")[0])
    assert (q25.image_token_id, q25.video_token_id, q25.vision_start_token_id) == (IMG, VID, VS)
    assert (q25.spatial_merge_size, q25.tokens_per_second, q25.video_layout) == (MERGE, 2.0, "grid")
    assert MropeSpec.from_config(family("qwen2_vl")[0]).tokens_per_second is None
    for model_type in set(FAMILIES) - set(GRID_VIDEO):
        spec = MropeSpec.from_config(family(model_type)[0])
        assert (spec.video_layout, spec.tokens_per_second) == ("frames", None)
    assert MropeSpec.from_config(Qwen2Config()) is None  # text model: 1-D positions
    assert MropeSpec.from_config(family("qwen3_vl")[0].text_config) is None
    if hasattr(transformers, "Glm4vConfig"):  # 3-D positions by rules this module does not have: refused
        with pytest.raises(ValueError, match="glm4v.* uses multimodal rotary positions"):
            MropeSpec.from_config(transformers.Glm4vConfig())
