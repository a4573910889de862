"""The vision test fixtures hold together: tests/vision_models.py folders and tests/vision_data.py rows.

For each fixture family (Qwen-VL, Gemma 3, Gemma 4): a verl-layout row, turned into content parts with its decoded images and
rendered by the folder's processor, has exactly the image tokens the image processor's output implies, in
place, one run per image; the model's forward takes those inputs, gives finite logits, and its images matter (new
pixels change the logits after the first image, never before). The three data layouts hold the same chats.
"""

from __future__ import annotations

import io
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoTokenizer
from transformers.vision_utils import get_vision_window_index
from vision_data import COLOURS, LAYOUTS, PLACEHOLDER, write_vision_rows
from vision_models import GEMMA_TOKENS, MERGE, QWEN_TOKENS, VISION_TYPES, write_vision_model

from sft.data.images import image_refs, load_image
from sft.data.processor import load_processor

ROWS = 6
SEED = 3


@pytest.fixture(scope="module")
def folders(demo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vision_models")
    return {t: write_vision_model(demo_dir / "model", root / t, t) for t in VISION_TYPES}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vision_rows")
    return {layout: write_vision_rows(root, ROWS, SEED, layout) for layout in LAYOUTS}


def as_parts(messages: list[dict]) -> list[dict]:
    """verl's string contents with `<image>` placeholders -> content lists with image parts in their place."""
    out = []
    for m in messages:
        pieces = m["content"].split(PLACEHOLDER)
        parts = [{"type": "text", "text": pieces[0]}] if pieces[0] else []
        for text in pieces[1:]:
            parts.append({"type": "image"})
            if text:
                parts.append({"type": "text", "text": text})
        out.append({"role": m["role"], "content": parts})
    return out


def row_inputs(processor, path: Path, index: int) -> tuple[dict, list[Image.Image]]:
    row = pq.read_table(path).to_pylist()[index]
    images = [load_image(r, "row") for r in image_refs(row["images"], f"{path} row {index}", "images", path.parent)]
    text = processor.apply_chat_template(as_parts(row["messages"]), tokenize=False)
    return processor(text=[text], images=[images], return_tensors="pt"), images


def runs(ids: list[int], token: int) -> list[int]:
    """Lengths of the maximal runs of `token` in `ids`, in order."""
    lengths, current = [], 0
    for t in [*ids, None]:
        if t == token:
            current += 1
        elif current:
            lengths, current = [*lengths, current], 0
    return lengths


def test_layouts_hold_the_same_chats(data):
    rows = {layout: pq.read_table(path).to_pylist() for layout, path in data.items()}
    assert len(rows["verl"]) == ROWS
    for i in range(ROWS):
        verl, parts, paths = rows["verl"][i], rows["parts"][i], rows["paths"][i]
        assert verl["messages"] == paths["messages"]
        n_images = sum(m["content"].count(PLACEHOLDER) for m in verl["messages"])
        assert 1 <= n_images <= 3 and n_images == len(verl["images"]) == len(paths["images"])
        assert [m["role"] for m in parts["messages"]] == [m["role"] for m in verl["messages"]]
        assert sum(p["type"] == "image" for m in parts["messages"] for p in m["content"]) == n_images
        stored = [Path(data["paths"].parent, p).read_bytes() for p in paths["images"]]
        assert stored == [im["bytes"] for im in verl["images"]] == [im["bytes"] for im in parts["images"]]
        for png in stored:
            width, height = Image.open(io.BytesIO(png)).size
            assert 20 <= width <= 120 and 20 <= height <= 120
        for m in verl["messages"]:
            if m["role"] == "assistant":
                assert set(m["content"].split(", ")) <= set(COLOURS)


@pytest.mark.parametrize("model_type", VISION_TYPES)
def test_processor_and_model(folders, data, model_type):
    folder = folders[model_type]
    processor = load_processor(str(folder), AutoTokenizer.from_pretrained(folder))
    tok = processor.tokenizer
    # The first row with several images, so the order of the image runs is checked too.
    index = next(i for i, r in enumerate(pq.read_table(data["verl"]).to_pylist()) if len(r["images"]) > 1)
    inputs, images = row_inputs(processor, data["verl"], index)
    ids = inputs["input_ids"][0].tolist()
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32)
    if model_type == "gemma3":
        image_id = tok.convert_tokens_to_ids("<image_soft_token>")
        assert model.config.image_token_id == image_id
        assert ids.count(tok.convert_tokens_to_ids("<start_of_image>")) == len(images)
        assert runs(ids, image_id) == [GEMMA_TOKENS] * len(images) == [model.config.mm_tokens_per_image] * len(images)
        assert inputs["pixel_values"].shape[0] == len(images)
    elif model_type == "gemma4":
        image_id = tok.convert_tokens_to_ids("<|image|>")
        assert model.config.image_token_id == image_id
        assert ids.count(model.config.boi_token_id) == ids.count(model.config.eoi_token_id) == len(images)
        # One token per 3x3 real (not padding) patches of each image.
        real = (inputs["image_position_ids"] != -1).all(-1).sum(-1)
        assert runs(ids, image_id) == [int(n) // 9 for n in real] and inputs["pixel_values"].shape[0] == len(images)
    else:
        image_id = tok.convert_tokens_to_ids(QWEN_TOKENS["image_token"])
        assert model.config.image_token_id == image_id
        assert model.config.vision_start_token_id == tok.convert_tokens_to_ids(QWEN_TOKENS["vision_start_token"])
        grid = inputs["image_grid_thw"]
        assert grid.shape == (len(images), 3) and (grid[:, 0] == 1).all()
        assert runs(ids, image_id) == [int(g.prod()) // MERGE**2 for g in grid]
        assert ids.count(model.config.vision_start_token_id) == len(images)
        assert inputs["pixel_values"].shape[0] == int(grid.prod(dim=1).sum())
    model.eval()
    with torch.no_grad():
        logits = model(**inputs).logits
        moved = model(**{**inputs, "pixel_values": inputs["pixel_values"] + 0.5}).logits
    assert logits.shape == (1, len(ids), model.config.get_text_config().vocab_size)
    assert torch.isfinite(logits).all()
    first = ids.index(image_id)
    torch.testing.assert_close(moved[0, :first], logits[0, :first])  # causal: text before the images is blind to them
    assert (moved[0, first:] - logits[0, first:]).abs().max() > 1e-3


def test_qwen2_5_vl_runs_window_and_full_attention(folders):
    model = AutoModelForImageTextToText.from_pretrained(folders["qwen2_5_vl"], dtype=torch.float32)
    visual = model.model.visual
    assert list(visual.fullatt_block_indexes) == [1] and visual.config.depth == 2
    # The largest image (112 px, 8x8 patches) spans 2x2 windows of 2x2 merged tokens; block 0 attends within them.
    _, cu_windows = get_vision_window_index(
        torch.tensor([[1, 8, 8]]), visual.spatial_merge_size, visual.window_size, visual.patch_size
    )
    assert len(torch.unique_consecutive(torch.as_tensor(cu_windows))) - 1 == 4
