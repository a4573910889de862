"""Vision demo assets: a tiny random Qwen2.5-VL checkpoint and "what colour is the shape?" image chats.

`write_vision_demo(out, ...)` writes `out/model/` (the demo tokenizer plus Qwen's vision tokens, a ChatML template
that renders image parts, a Qwen2.5-VL processor with images of 1 to 9 merged tokens, weights at their default
init) and `out/train.parquet`, `out/val.parquet` in verl's layout (`<image>` in the text, PNG bytes in `images`).
The question is the same in every row and the colours are balanced, so only the pixels tell the answer.
"""

from __future__ import annotations

import io
import random
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image, ImageDraw
from transformers import (
    AutoModelForImageTextToText,
    GenerationConfig,
    PreTrainedTokenizerBase,
    Qwen2_5_VLConfig,
    Qwen2_5_VLProcessor,
    Qwen2VLImageProcessorPil,
)

from sft.data.processor import image_only
from sft.demo.assets import build_tokenizer

COLOURS = {"red": (215, 40, 40), "green": (40, 160, 60), "blue": (45, 75, 215), "yellow": (230, 195, 30)}
SHAPES = ("square", "circle", "triangle")
QUESTION = "What colour is the shape? <image>"
# Qwen's vision tokens: the config stores their ids, the processor finds them by these strings. Special, so the
# tokenizer never splits them (and the trainer never trains them).
VISION_TOKENS = {
    "vision_start": "<|vision_start|>",
    "vision_end": "<|vision_end|>",
    "image": "<|image_pad|>",
    "video": "<|video_pad|>",
}
PATCH, MERGE = 14, 2
SIDE = PATCH * MERGE  # one merged image token covers SIDE x SIDE pixels
# Images of 28..84 px become 1x1 to 3x3 merged tokens: a handful of tokens, so a CPU step stays cheap.
MIN_PIXELS, MAX_PIXELS = SIDE * SIDE, (3 * SIDE) ** 2
TEXT_HIDDEN = 128

# ChatML; string contents as they are, content parts with each image as Qwen's start / pad / end triple (the
# processor expands the pad to the image's token count). No default system turn (as Qwen3-VL): it would only make
# every row longer.
# One message's content (`m`), Qwen style: a string as it is, parts with each image as the start / pad / end triple.
QWEN_CONTENT = r"""
  {%- if m.content is string -%}
    {{- m.content -}}
  {%- elif m.content is not none -%}
    {%- for part in m.content -%}
      {%- if part.type == 'image' -%}{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}
      {%- elif part.type == 'text' -%}{{- part.text -}}
      {%- endif -%}
    {%- endfor -%}
  {%- endif -%}
""".strip()
CHAT_TEMPLATE = r"""
{%- for m in messages -%}
  {{- '<|im_start|>' + m.role + '\n' -}}
  CONTENT
  {{- '<|im_end|>\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}
""".strip().replace("CONTENT", QWEN_CONTENT)

_MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string())])
_IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])  # HF datasets' Image layout
PARQUET_SCHEMA = pa.schema([("messages", pa.list_(_MESSAGE)), ("images", pa.list_(_IMAGE))])


def shape_image(rng: random.Random, colour: str) -> Image.Image:
    """One `colour` square, circle or triangle of random size and place on a plain light-grey background."""
    width, height = rng.randint(SIDE, 3 * SIDE), rng.randint(SIDE, 3 * SIDE)
    grey = rng.randint(200, 250)  # a varied, neutral background: no colour of its own
    im = Image.new("RGB", (width, height), (grey, grey, grey))
    # Most of the shorter side: smaller shapes leave most patches plain background and take longer to learn.
    side = min(width, height)
    size = rng.randint(3 * side // 4, side)
    x, y = rng.randint(0, width - size), rng.randint(0, height - size)
    box = (x, y, x + size - 1, y + size - 1)
    draw = ImageDraw.Draw(im)
    shape = rng.choice(SHAPES)
    if shape == "circle":
        draw.ellipse(box, fill=COLOURS[colour])
    elif shape == "triangle":
        draw.polygon([(x, y + size - 1), (x + size - 1, y + size - 1), (x + size // 2, y)], fill=COLOURS[colour])
    else:
        draw.rectangle(box, fill=COLOURS[colour])
    return im


def _png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def make_rows(n: int, seed: int) -> list[dict[str, Any]]:
    """`n` parquet rows (question with one image, the colour as the answer), colours balanced, fixed by `seed`."""
    rng = random.Random(seed)
    names = sorted(COLOURS)
    # Each colour equally often (up to one): a model that ignores the image scores chance, 1 / len(COLOURS).
    colours = [names[i % len(names)] for i in range(n)]
    rng.shuffle(colours)
    return [
        {
            "messages": [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": colour}],
            "images": [{"bytes": _png(shape_image(rng, colour)), "path": None}],
        }
        for colour in colours
    ]


def answer_of(row: dict[str, Any]) -> str:
    """The row's correct answer: its last (assistant) message."""
    return row["messages"][-1]["content"]


def build_vision_tokenizer(seed: int = 0) -> PreTrainedTokenizerBase:
    """The text demo's tokenizer with Qwen's vision tokens (special) and the image-aware chat template."""
    tok = build_tokenizer(seed=seed)
    tok.add_special_tokens({"extra_special_tokens": list(VISION_TOKENS.values())}, replace_extra_special_tokens=False)
    tok.chat_template = CHAT_TEMPLATE
    return tok


def build_processor(tok: PreTrainedTokenizerBase) -> Qwen2_5_VLProcessor:
    """Qwen2.5-VL's processor around `tok`, built without a video processor (it needs torchvision)."""
    images = Qwen2VLImageProcessorPil(
        min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS, patch_size=PATCH, merge_size=MERGE, temporal_patch_size=2
    )
    # The saved files name Qwen2_5_VLProcessor; sft's load_processor builds that class from them, with or without
    # its video processor.
    return image_only(Qwen2_5_VLProcessor)(image_processor=images, tokenizer=tok, chat_template=CHAT_TEMPLATE)


def build_model_config(tok: PreTrainedTokenizerBase) -> Qwen2_5_VLConfig:
    """A 2-layer, 128-wide text model under a 2-block, 64-wide vision tower: learns the task in minutes on a CPU."""
    ids = {name: tok.convert_tokens_to_ids(t) for name, t in VISION_TOKENS.items()}
    heads = 4
    # Multimodal rotary: the (temporal, height, width) sections split head_dim / 2 frequencies.
    half = TEXT_HIDDEN // heads // 2
    mrope_section = [half - 2 * (half // 3), half // 3, half // 3]
    text = dict(
        model_type="qwen2_5_vl_text",
        vocab_size=-(-len(tok) // 64) * 64,  # a multiple of 64 keeps matmuls aligned
        hidden_size=TEXT_HIDDEN,
        intermediate_size=2 * TEXT_HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=heads,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=mrope_section),
        bos_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        use_cache=False,
    )
    vision = dict(
        depth=2,
        hidden_size=64,
        intermediate_size=128,
        num_heads=4,
        patch_size=PATCH,
        spatial_merge_size=MERGE,
        temporal_patch_size=2,
        window_size=3 * SIDE,  # one window covers the largest image; block 1 attends fully anyway
        fullatt_block_indexes=[1],
        out_hidden_size=TEXT_HIDDEN,
    )
    return Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["image"],
        video_token_id=ids["video"],
        vision_start_token_id=ids["vision_start"],
        vision_end_token_id=ids["vision_end"],
        tie_word_embeddings=True,
    )


def write_vision_demo(out: Path, n_train: int = 2000, n_val: int = 200, seed: int = 0) -> dict[str, Path]:
    """Write `model/`, `train.parquet` and `val.parquet` under `out`; return their paths by those names."""
    out = Path(out)
    model_dir = out / "model"
    model_dir.mkdir(parents=True, exist_ok=True)
    tok = build_vision_tokenizer(seed)
    config = build_model_config(tok)
    # fork_rng: seed the init without changing the caller's global RNG state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    model.generation_config = GenerationConfig(
        eos_token_id=[tok.eos_token_id, tok.pad_token_id],
        pad_token_id=tok.pad_token_id,
        do_sample=False,
        max_new_tokens=8,
    )
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    build_processor(tok).save_pretrained(model_dir)
    paths = {"model": model_dir, "train": out / "train.parquet", "val": out / "val.parquet"}
    pq.write_table(pa.Table.from_pylist(make_rows(n_train, seed), schema=PARQUET_SCHEMA), paths["train"])
    # A different stream for validation, so its images are not the first training images again.
    pq.write_table(pa.Table.from_pylist(make_rows(n_val, seed + 1_000_003), schema=PARQUET_SCHEMA), paths["val"])
    return paths
