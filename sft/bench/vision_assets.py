"""Assets of `python -m sft.bench.vision`: a Qwen2.5-VL-shaped model with random weights, synthetic image chats.

`write_vision_model` writes the published Qwen2.5-VL-3B-Instruct dimensions (`layers` keeps fewer decoder layers)
with random bf16 weights, the demo tokenizer plus Qwen's vision tokens, our Qwen-style chat template (an image part
renders as <|vision_start|><|image_pad|><|vision_end|>) and a Qwen2.5-VL processor with the released image settings
(min_pixels 3136, max_pixels 12845056, patch 14, merge 2), saved without a video processor. `write_vision_rows`
writes verl-layout rows: 1-3 JPEG images of mixed sizes (224-1024 px sides: 64 to ~1,400 tokens each) and a few
hundred words of chat; images are numpy gradients and stripes with noise, made in parallel, seeded per row.
`python -m sft.bench.vision_assets DIR` writes both (run in its own process: the weights are drawn on the GPU).
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from sft.demo.assets import SYSTEM_PROMPTS, WORDS, build_tokenizer
from sft.demo.vision_assets import QWEN_CONTENT

IMAGE_TAG = "<image>"
# Named as the processor and config name them; all special, so they are never split or trained.
VISION_TOKENS = {
    "vision_start": "<|vision_start|>",
    "vision_end": "<|vision_end|>",
    "image": "<|image_pad|>",
    "video": "<|video_pad|>",
}
# Published dimensions (Qwen/Qwen2.5-VL-3B-Instruct config.json; the vision tower's unlisted values are
# Qwen2_5_VLVisionConfig's defaults, which the release relies on) and its preprocessor_config.json.
VISION_SHAPES: dict[str, dict[str, Any]] = {
    "qwen2.5-vl-3b": dict(
        text=dict(
            hidden_size=2048,
            intermediate_size=11008,
            num_hidden_layers=36,
            num_attention_heads=16,
            num_key_value_heads=2,
            vocab_size=151936,
            max_position_embeddings=128000,
            rms_norm_eps=1e-6,
            rope_parameters=dict(rope_type="default", rope_theta=1_000_000.0, mrope_section=[16, 24, 24]),
        ),
        vision=dict(
            depth=32,
            hidden_size=1280,
            intermediate_size=3420,
            num_heads=16,
            hidden_act="silu",
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=112,
            fullatt_block_indexes=[7, 15, 23, 31],
            out_hidden_size=2048,
            tokens_per_second=2,
        ),
        tie_word_embeddings=True,
        processor=dict(min_pixels=3136, max_pixels=12845056, patch_size=14, merge_size=2, temporal_patch_size=2),
    ),
}
MARKER = "bench_vision_assets.json"
# Row content: image sides, images per row, words (one demo token each) in user and assistant turns.
MIN_SIDE, MAX_SIDE = 224, 1024
IMAGES_PER_ROW = (1, 2, 3)
USER_WORDS, ASSISTANT_WORDS = (10, 60), (60, 320)
TWO_TURNS = 0.4  # share of rows with several images whose images are split over two user turns
SYSTEM_SHARE = 0.3
ROW_GROUP = 100  # rows per parquet row group, as HF datasets writes image columns
JPEG_QUALITY = 85

# ChatML with Qwen's image triple; a default system turn, as in released Qwen2.5-VL. Contents are strings or
# lists of parts (a system message of parts renders its texts joined).
_TEMPLATE = r"""
{%- if messages and messages[0].role == 'system' -%}
  {%- set system = messages[0].content -%}{%- set rest = messages[1:] -%}
{%- else -%}
  {%- set system = 'You are a helpful assistant.' -%}{%- set rest = messages -%}
{%- endif -%}
{{- '<|im_start|>system\n' + (system if system is string else system | map(attribute='text') | join) + '<|im_end|>\n' -}}
{%- for m in rest -%}
  {{- '<|im_start|>' + m.role + '\n' -}}
  {%- if m.role == 'assistant' -%}
    GEN_OPEN
    CONTENT
    {{- '<|im_end|>' -}}
    GEN_CLOSE
    {{- '\n' -}}
  {%- else -%}
    CONTENT
    {{- '<|im_end|>\n' -}}
  {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}
""".strip().replace("CONTENT", QWEN_CONTENT)
CHAT_TEMPLATE = _TEMPLATE.replace("GEN_OPEN", "").replace("GEN_CLOSE", "")
# The same rendering with `{% generation %}` around each reply and its end-of-turn token: TRL's assistant-only
# loss needs the markers, and they mark the tokens sft trains.
TRL_CHAT_TEMPLATE = _TEMPLATE.replace("GEN_OPEN", "{%- generation -%}").replace("GEN_CLOSE", "{%- endgeneration -%}")


def _check_shape(shape: str) -> dict[str, Any]:
    if shape not in VISION_SHAPES:
        raise ValueError(f"--shape {shape!r}: choose one of {', '.join(VISION_SHAPES)}")
    return VISION_SHAPES[shape]


def build_vision_tokenizer() -> Any:
    """The demo tokenizer (its ids are valid ids of the big vocabulary) with Qwen's vision tokens and our template."""
    tok = build_tokenizer(seed=0)
    tok.add_special_tokens({"extra_special_tokens": list(VISION_TOKENS.values())}, replace_extra_special_tokens=False)
    tok.chat_template = CHAT_TEMPLATE
    tok.model_max_length = 131072  # long rows are intended: no length warning
    return tok


def build_processor(tok: Any, shape: str) -> Any:
    """Qwen2.5-VL's processor around `tok` with the release's image settings, without a video processor."""
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessorPil

    from sft.data.processor import image_only

    images = Qwen2VLImageProcessorPil(**_check_shape(shape)["processor"])
    # The saved files name Qwen2_5_VLProcessor: a host with torchvision loads the full class from them.
    return image_only(Qwen2_5_VLProcessor)(image_processor=images, tokenizer=tok, chat_template=CHAT_TEMPLATE)


def vision_config(shape: str, tok: Any, layers: int | None = None, widths: dict[str, dict] | None = None) -> Any:
    """The shape's config with `layers` decoder layers (None: all); `widths` replaces text/vision values (tests)."""
    from transformers import AutoConfig

    spec = _check_shape(shape)
    text, vision = dict(spec["text"]), dict(spec["vision"])
    text.update((widths or {}).get("text", {}))
    vision.update((widths or {}).get("vision", {}))
    if layers is not None:
        if not 1 <= layers <= spec["text"]["num_hidden_layers"]:
            raise ValueError(f"--layers {layers}: between 1 and {spec['text']['num_hidden_layers']} for {shape}")
        text["num_hidden_layers"] = layers
    ids = {name: tok.convert_tokens_to_ids(t) for name, t in VISION_TOKENS.items()}
    text.update(
        model_type="qwen2_5_vl_text",
        bos_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        use_cache=False,
    )
    return AutoConfig.for_model(
        "qwen2_5_vl",
        text_config=text,
        vision_config=vision,
        image_token_id=ids["image"],
        video_token_id=ids["video"],
        vision_start_token_id=ids["vision_start"],
        vision_end_token_id=ids["vision_end"],
        tie_word_embeddings=spec["tie_word_embeddings"],
    )


def _random_model(config: Any, seed: int) -> Any:
    """bf16 weights ~ N(0, 0.02), norm weights 1, biases 0; built in place, drawn on the GPU where there is one."""
    import torch
    from transformers import AutoModelForImageTextToText

    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config).to(torch.bfloat16)
    model.to_empty(device="cpu")
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():  # tied parameters are listed once
            if p.ndim == 1:  # RMSNorm weights (norm1, ln_q, ...) and biases
                p.fill_(1.0 if name.endswith("weight") else 0.0)
            else:
                p.copy_(torch.empty(p.shape, dtype=p.dtype, device=device).normal_(0.0, 0.02, generator=gen))
    model.tie_weights()
    return model


def write_vision_model(
    out_dir: Path, shape: str = "qwen2.5-vl-3b", seed: int = 0, layers: int | None = None, widths: dict | None = None
) -> Path:
    """`out_dir` <- config, random bf16 safetensors, tokenizer, chat template and processor files."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = build_vision_tokenizer()
    model = _random_model(vision_config(shape, tok, layers, widths), seed)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    build_processor(tok, shape).save_pretrained(out_dir)
    return out_dir


# ---------------------------------------------------------------- synthetic image chats


def image_jpeg(rng: np.random.Generator, width: int, height: int) -> bytes:
    """A colour gradient with stripes and mild noise, JPEG-encoded: decodes like a photo of that size."""
    from PIL import Image

    y = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None, None]
    x = np.linspace(0.0, 1.0, width, dtype=np.float32)[None, :, None]
    base, dx, dy = (rng.uniform(lo, hi, 3).astype(np.float32) for lo, hi in ((40, 215), (-80, 80), (-80, 80)))
    fx, fy, phase = rng.uniform(2, 24), rng.uniform(2, 24), rng.uniform(0, 6.3)
    stripes = (30.0 * np.sin(2 * np.pi * (fx * x + fy * y) + phase)).astype(np.float32)
    noise = rng.integers(-8, 9, (height, width, 3), dtype=np.int16)
    pixels = np.clip(base + dx * x + dy * y + stripes + noise, 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def _text(rng: np.random.Generator, bounds: tuple[int, int]) -> str:
    return " ".join(rng.choice(WORDS, int(rng.integers(*bounds))).tolist())


def vision_row(seed: int, index: int, min_side: int = MIN_SIDE, max_side: int = MAX_SIDE) -> dict[str, Any]:
    """Row `index` of the set `seed` (the same whatever process makes it): verl layout, JPEG bytes in `images`."""
    rng = np.random.default_rng([seed, index])
    n_images = int(rng.choice(IMAGES_PER_ROW))
    sizes = rng.integers(min_side, max_side + 1, (n_images, 2)).tolist()
    images = [{"bytes": image_jpeg(rng, w, h), "path": None} for w, h in sizes]
    split = int(rng.integers(1, n_images)) if n_images > 1 and rng.random() < TWO_TURNS else n_images
    messages = [{"role": "system", "content": str(rng.choice(SYSTEM_PROMPTS))}] if rng.random() < SYSTEM_SHARE else []
    for group in (split, n_images - split):
        if group:
            messages.append({"role": "user", "content": IMAGE_TAG * group + _text(rng, USER_WORDS)})
            messages.append({"role": "assistant", "content": _text(rng, ASSISTANT_WORDS)})
    return {"messages": messages, "images": images}


_MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string())])
_IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])  # HF datasets' Image layout
ROWS_SCHEMA = pa.schema([("messages", pa.list_(_MESSAGE)), ("images", pa.list_(_IMAGE))])


def _rows_chunk(args: tuple[int, int, int, int, int]) -> list[dict[str, Any]]:
    seed, start, stop, min_side, max_side = args
    return [vision_row(seed, i, min_side, max_side) for i in range(start, stop)]


def write_vision_rows(
    path: Path,
    n: int,
    seed: int = 0,
    min_side: int = MIN_SIDE,
    max_side: int = MAX_SIDE,
    workers: int | None = None,
) -> Path:
    """`path` <- `n` image chats (deterministic by `seed`), made by `workers` processes (default: all cores)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    workers = max(1, min(workers or os.cpu_count() or 1, -(-n // 16)))
    step = -(-n // (workers * 4))
    chunks = [(seed, a, min(a + step, n), min_side, max_side) for a in range(0, n, step)]
    if workers == 1:
        parts = [_rows_chunk(c) for c in chunks]
    else:
        # fork: the children need only numpy and PIL; call this before the process touches a GPU.
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            parts = pool.map(_rows_chunk, chunks)
    rows = [row for part in parts for row in part]
    tmp = path.with_suffix(".tmp")
    pq.write_table(pa.Table.from_pylist(rows, schema=ROWS_SCHEMA), tmp, row_group_size=ROW_GROUP)
    tmp.replace(path)  # atomic: a killed run never leaves a half-written file to reuse
    return path


# ---------------------------------------------------------------- both, cached by spec


def asset_paths(workdir: Path, shape: str, layers: int | None, n_rows: int, seed: int) -> tuple[Path, Path]:
    """(model folder, train parquet) of this spec under `workdir`."""
    depth = f"-{layers}l" if layers else ""
    return Path(workdir) / f"model-{shape}{depth}", Path(workdir) / f"vision-{n_rows}-seed{seed}.parquet"


def ensure_vision_assets(
    workdir: Path, shape: str, layers: int | None, n_rows: int, seed: int = 0
) -> tuple[Path, Path]:
    """Write the rows, then the model folder, unless a previous call wrote the same spec. Rows first: their pool
    forks, which must happen before the weights are drawn on a GPU."""
    model_dir, parquet = asset_paths(workdir, shape, layers, n_rows, seed)
    if not parquet.exists():
        write_vision_rows(parquet, n_rows, seed)
    spec = {"shape": shape, "layers": layers, "seed": seed}
    marker = model_dir / MARKER
    if not (marker.exists() and json.loads(marker.read_text()) == spec):
        write_vision_model(model_dir, shape, seed, layers)
        marker.write_text(json.dumps(spec))
    return model_dir, parquet


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sft.bench.vision_assets", description=__doc__.splitlines()[0])
    p.add_argument("workdir", type=Path)
    p.add_argument("--shape", choices=list(VISION_SHAPES), default="qwen2.5-vl-3b")
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default: all of the shape's)")
    p.add_argument("--rows", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    try:
        model_dir, parquet = ensure_vision_assets(args.workdir, args.shape, args.layers, args.rows, args.seed)
    except ValueError as exc:
        print(f"sft.bench.vision_assets: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({"model": str(model_dir), "data": str(parquet)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
