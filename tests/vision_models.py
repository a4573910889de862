"""Tiny random vision-language checkpoints that see images: Qwen2.5-VL, Qwen3-VL(-MoE), Qwen3.5(-MoE), Gemma 3 and
Gemma 4, as HF model folders.

Each folder holds the demo tokenizer with the family's image tokens added as special tokens, our own chat template
in the family's style, a 2-layer text model of tests/multimodal_models.py's widths under a 2-layer vision tower,
and the processor files (`save_pretrained`) with image sizes so small that an image is a handful of tokens.
Weights are re-drawn with std 0.2 in fp32, seeded: the default init hides wrong positions and masks.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from family_models import EXTRA
from multimodal_models import TEXT
from transformers import (
    AutoConfig,
    AutoModelForImageTextToText,
    AutoTokenizer,
    Gemma3ImageProcessorPil,
    Gemma3Processor,
    Gemma4ImageProcessorPil,
    Gemma4Processor,
    Qwen2_5_VLProcessor,
    Qwen2VLImageProcessorPil,
    Qwen3VLProcessor,
)

from sft.data.processor import image_only

VISION_TYPES = ("qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe", "gemma3", "gemma4")
PATCH = 14
MERGE = 2
# Qwen's image processor resizes to a multiple of PATCH * MERGE within these pixel counts: 1 to 16 merged tokens.
MIN_PIXELS, MAX_PIXELS = 28 * 28, 112 * 112
# Gemma 3 squashes every image to GEMMA_SIZE^2 (2x2 patches) and pools it into GEMMA_TOKENS soft tokens.
GEMMA_SIZE, GEMMA_TOKENS = 28, 4

QWEN_TOKENS = {
    "vision_start_token": "<|vision_start|>",
    "vision_end_token": "<|vision_end|>",
    "image_token": "<|image_pad|>",
    "video_token": "<|video_pad|>",
}
# Gemma 3's processor reads tokenizer.boi_token / eoi_token / image_token (and their ids), so they are named tokens;
# the turn markers are plain special tokens, and <end_of_turn> ends a reply as in the released tokenizer.
GEMMA_TOKENS_NAMED = {
    "boi_token": "<start_of_image>",
    "eoi_token": "<end_of_image>",
    "image_token": "<image_soft_token>",
}
GEMMA_TURN = ["<start_of_turn>", "<end_of_turn>"]
# Gemma 4: the template writes the image token, which the processor turns into <|image>, n soft tokens, <image|>.
# Its processor also reads the audio tokens' names (it refuses to run without them).
GEMMA4_TOKENS_NAMED = {
    "boi_token": "<|image>",
    "eoi_token": "<image|>",
    "image_token": "<|image|>",
    "boa_token": "<|audio>",
    "eoa_token": "<audio|>",
    "audio_token": "<|audio|>",
}
GEMMA4_TURN = ["<|turn>", "<turn|>"]
GEMMA4_VIDEO = "<|video|>"  # the processor adds it to the tokenizer itself; added here first, so the model has its id
# Gemma 4's image processor keeps the aspect ratio within GEMMA4_SOFT_TOKENS * 3^2 patches of 16 px (70 is its
# smallest setting), so each image is about 64-70 tokens, each pooled from 3x3 patches.
GEMMA4_SOFT_TOKENS = 70

# ChatML with images in place; the released Qwen2.5-VL template opens with a default system turn, Qwen3-VL's does not.
_QWEN_TEMPLATE = r"""
{%- for m in messages -%}
  {%- if loop.first and m.role != 'system' and DEFAULT_SYSTEM -%}
    {{- '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' -}}
  {%- endif -%}
  {{- '<|im_start|>' + m.role + '\n' -}}
  {%- if m.content is string -%}
    {{- m.content -}}
  {%- elif m.content is not none -%}
    {%- for part in m.content -%}
      {%- if part.type == 'image' or part.type == 'image_url' -%}
        {{- '<|vision_start|><|image_pad|><|vision_end|>' -}}
      {%- elif part.type == 'text' -%}
        {{- part.text -}}
      {%- endif -%}
    {%- endfor -%}
  {%- endif -%}
  {{- '<|im_end|>\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}
""".strip()

# Gemma 3 style: no system turn (its text opens the first user turn), `model` for the assistant, trimmed text,
# an image part as <start_of_image> (the processor expands it into the soft tokens).
GEMMA_TEMPLATE = r"""
{%- if bos_token -%}{{- bos_token -}}{%- endif -%}
{%- if messages and messages[0].role == 'system' -%}
  {%- set first = messages[0].content if messages[0].content is string else messages[0].content[0].text -%}
  {%- set first = first + '\n\n' -%}{%- set rest = messages[1:] -%}
{%- else -%}
  {%- set first = '' -%}{%- set rest = messages -%}
{%- endif -%}
{%- for m in rest -%}
  {{- '<start_of_turn>' + ('model' if m.role == 'assistant' else m.role) + '\n' + (first if loop.first else '') -}}
  {%- if m.content is string -%}
    {{- m.content | trim -}}
  {%- elif m.content is not none -%}
    {%- for part in m.content -%}
      {%- if part.type == 'image' or part.type == 'image_url' -%}
        {{- '<start_of_image>' -}}
      {%- elif part.type == 'text' -%}
        {{- part.text | trim -}}
      {%- endif -%}
    {%- endfor -%}
  {%- endif -%}
  {{- '<end_of_turn>\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<start_of_turn>model\n' -}}{%- endif -%}
""".strip()

# Gemma 4 style: <|turn>role ... <turn|>, `model` for the assistant, the system text as its own turn.
GEMMA4_TEMPLATE = r"""
{%- for m in messages -%}
  {{- '<|turn>' + ('model' if m.role == 'assistant' else m.role) + '\n' -}}
  {%- if m.content is string -%}
    {{- m.content | trim -}}
  {%- elif m.content is not none -%}
    {%- for part in m.content -%}
      {%- if part.type == 'image' or part.type == 'image_url' -%}
        {{- '<|image|>' -}}
      {%- elif part.type == 'text' -%}
        {{- part.text | trim -}}
      {%- endif -%}
    {%- endfor -%}
  {%- endif -%}
  {{- '<turn|>\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|turn>model\n' -}}{%- endif -%}
""".strip()

CHAT_TEMPLATES = {
    "qwen2_5_vl": _QWEN_TEMPLATE.replace("DEFAULT_SYSTEM", "true"),
    "qwen3_vl": _QWEN_TEMPLATE.replace("DEFAULT_SYSTEM", "false"),
    "qwen3_vl_moe": _QWEN_TEMPLATE.replace("DEFAULT_SYSTEM", "false"),
    "qwen3_5": _QWEN_TEMPLATE.replace("DEFAULT_SYSTEM", "false"),
    "qwen3_5_moe": _QWEN_TEMPLATE.replace("DEFAULT_SYSTEM", "false"),
    "gemma3": GEMMA_TEMPLATE,
    "gemma4": GEMMA4_TEMPLATE,
}


PROCESSOR_FILE = "processor_config.json"
_VIDEO = dict(
    patch_size=PATCH,
    temporal_patch_size=2,
    merge_size=MERGE,
    size={"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS},
)
VIDEO_PROCESSOR = {
    "qwen2_5_vl": dict(_VIDEO, video_processor_type="Qwen2VLVideoProcessor"),
    "qwen3_vl": dict(_VIDEO, video_processor_type="Qwen3VLVideoProcessor"),
    "qwen3_vl_moe": dict(_VIDEO, video_processor_type="Qwen3VLVideoProcessor"),
    "qwen3_5": dict(_VIDEO, video_processor_type="Qwen3VLVideoProcessor"),
    "qwen3_5_moe": dict(_VIDEO, video_processor_type="Qwen3VLVideoProcessor"),
}


# Multimodal rotary sections (temporal, height, width) split head_dim / 2 = 4 frequencies.
QWEN_ROPE = dict(rope_type="default", rope_theta=10000.0, mrope_section=[2, 1, 1])


# Qwen3-VL-MoE: every text layer an MoE block; Qwen3.5: Gated DeltaNet layers around a full-attention one
# (tests/hybrid_models.py's widths), its 3-D rotary on half of each head.
TEXT_EXTRA: dict[str, dict] = {
    "qwen3_vl_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, decoder_sparse_step=1),
    "qwen3_5": dict(
        num_hidden_layers=3,
        layer_types=["linear_attention", "full_attention", "linear_attention"],
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        linear_key_head_dim=8,
        linear_value_head_dim=8,
        linear_conv_kernel_dim=4,
        head_dim=16,
        rope_parameters=dict(QWEN_ROPE, partial_rotary_factor=0.5, mrope_interleaved=True),
    ),
}
# Qwen3.5-MoE: Qwen3.5's layers with an MoE block and a shared expert in each.
TEXT_EXTRA["qwen3_5_moe"] = dict(
    TEXT_EXTRA["qwen3_5"],
    num_experts=4,
    num_experts_per_tok=2,
    moe_intermediate_size=16,
    shared_expert_intermediate_size=16,
)

VISION_CONFIGS: dict[str, dict] = {
    # Window attention in block 0 (windows of 56 px = 2x2 merged tokens, so larger images get several windows and
    # a padded edge window), full attention in block 1.
    "qwen2_5_vl": dict(
        model_type="qwen2_5_vl",
        depth=2,
        hidden_size=16,
        intermediate_size=32,
        num_heads=2,
        patch_size=PATCH,
        spatial_merge_size=MERGE,
        temporal_patch_size=2,
        window_size=56,
        fullatt_block_indexes=[1],
        out_hidden_size=TEXT["hidden_size"],
    ),
    # Qwen3-VL: learned position embeddings interpolated to the grid, a deepstack merger feeding text layer 0.
    "qwen3_vl": dict(
        model_type="qwen3_vl_vision",
        depth=2,
        hidden_size=16,
        intermediate_size=32,
        num_heads=2,
        patch_size=PATCH,
        spatial_merge_size=MERGE,
        temporal_patch_size=2,
        num_position_embeddings=64,
        deepstack_visual_indexes=[0],
        out_hidden_size=TEXT["hidden_size"],
    ),
    "gemma3": dict(
        model_type="siglip_vision_model",
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=GEMMA_SIZE,
        patch_size=PATCH,
    ),
}
VISION_CONFIGS["gemma4"] = dict(
    model_type="gemma4_vision",
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=2,
    head_dim=8,
    patch_size=16,
    pooling_kernel_size=3,
    position_embedding_size=64,
)
VISION_CONFIGS["qwen3_vl_moe"] = dict(VISION_CONFIGS["qwen3_vl"], model_type="qwen3_vl_moe_vision")
VISION_CONFIGS["qwen3_5_moe"] = {
    k: v for k, v in VISION_CONFIGS["qwen3_vl"].items() if k != "deepstack_visual_indexes"
} | dict(model_type="qwen3_5_moe_vision")
VISION_CONFIGS["qwen3_5"] = {
    k: v for k, v in VISION_CONFIGS["qwen3_vl"].items() if k != "deepstack_visual_indexes"
} | dict(model_type="qwen3_5_vision")


def _tokenizer(demo_model: Path, model_type: str):
    """The demo tokenizer plus the family's image (and, for Gemma, turn) tokens, all special."""
    if model_type in ("gemma3", "gemma4"):
        named, turn = (GEMMA_TOKENS_NAMED, GEMMA_TURN) if model_type == "gemma3" else (GEMMA4_TOKENS_NAMED, GEMMA4_TURN)
        # Named model-specific tokens are declared at load time; adding them below puts them in the vocabulary.
        tok = AutoTokenizer.from_pretrained(demo_model, extra_special_tokens=dict(named))
        extra = [*named.values(), *turn] + ([GEMMA4_VIDEO] if model_type == "gemma4" else [])
        tok.add_special_tokens({"extra_special_tokens": extra}, replace_extra_special_tokens=False)
        tok.eos_token = turn[1]
    else:
        tok = AutoTokenizer.from_pretrained(demo_model)
        tok.add_special_tokens({"extra_special_tokens": list(QWEN_TOKENS.values())}, replace_extra_special_tokens=False)
    tok.chat_template = CHAT_TEMPLATES[model_type]
    return tok


def _config(tok, model_type: str):
    """The family's config: TEXT widths in 2 layers, the vision tower above, token ids from `tok`."""
    vocab = -(-len(tok) // 64) * 64
    text = dict(
        TEXT,
        num_hidden_layers=2,
        vocab_size=vocab,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    vision = dict(VISION_CONFIGS[model_type])
    if model_type == "gemma3":
        text.update(
            model_type="gemma3_text",
            layer_types=["sliding_attention", "full_attention"],
            sliding_window=8,
            query_pre_attn_scalar=8,
        )
        return AutoConfig.for_model(
            model_type,
            text_config=text,
            vision_config=vision,
            mm_tokens_per_image=GEMMA_TOKENS,
            boi_token_index=tok.convert_tokens_to_ids(GEMMA_TOKENS_NAMED["boi_token"]),
            eoi_token_index=tok.convert_tokens_to_ids(GEMMA_TOKENS_NAMED["eoi_token"]),
            image_token_index=tok.convert_tokens_to_ids(GEMMA_TOKENS_NAMED["image_token"]),
            pad_token_id=tok.pad_token_id,
            tie_word_embeddings=True,
        )
    if model_type == "gemma4":
        # Every Gemma 4 text feature of tests/family_models.py (per-layer embeddings, shared KV, an MoE block, final
        # soft-capping), and image tokens that see each other both ways in the sliding layers ("vision").
        text.update(EXTRA["gemma4_text"], model_type="gemma4_text", vocab_size_per_layer_input=vocab, pad_token_id=0)
        # A full layer feeds a later sliding one (the last layer reads an earlier layer's keys and values, so what
        # its image rows compute reaches no target): a both-ways block in a full layer would show in the loss.
        text.update(
            use_bidirectional_attention="vision",
            num_hidden_layers=4,
            layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        )
        ids = {name: tok.convert_tokens_to_ids(t) for name, t in GEMMA4_TOKENS_NAMED.items()}
        return AutoConfig.for_model(
            model_type,
            text_config=text,
            vision_config=vision,
            audio_config=None,
            image_token_id=ids["image_token"],
            boi_token_id=ids["boi_token"],
            eoi_token_id=ids["eoi_token"],
            audio_token_id=ids["audio_token"],
            boa_token_id=ids["boa_token"],
            eoa_token_index=ids["eoa_token"],
            video_token_id=tok.convert_tokens_to_ids(GEMMA4_VIDEO),
            tie_word_embeddings=True,
        )
    ids = {name: tok.convert_tokens_to_ids(t) for name, t in QWEN_TOKENS.items()}
    text.update({"model_type": f"{model_type}_text", "rope_parameters": QWEN_ROPE, **TEXT_EXTRA.get(model_type, {})})
    return AutoConfig.for_model(
        model_type,
        text_config=text,
        vision_config=vision,
        image_token_id=ids["image_token"],
        video_token_id=ids["video_token"],
        vision_start_token_id=ids["vision_start_token"],
        vision_end_token_id=ids["vision_end_token"],
        tie_word_embeddings=False,
    )


def _processor(tok, model_type: str):
    """The family's processor around `tok`, with images small enough to be a few tokens each."""
    template = CHAT_TEMPLATES[model_type]
    if model_type == "gemma3":
        images = Gemma3ImageProcessorPil(size={"height": GEMMA_SIZE, "width": GEMMA_SIZE}, do_pan_and_scan=False)
        return Gemma3Processor(images, tok, chat_template=template, image_seq_length=GEMMA_TOKENS)
    if model_type == "gemma4":
        images = Gemma4ImageProcessorPil(patch_size=16, max_soft_tokens=GEMMA4_SOFT_TOKENS, pooling_kernel_size=3)
        # No video processor (torchvision) and no audio feature extractor: images only.
        return image_only(Gemma4Processor)(
            image_processor=images, tokenizer=tok, chat_template=template, image_seq_length=GEMMA4_SOFT_TOKENS
        )
    images = Qwen2VLImageProcessorPil(
        min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS, patch_size=PATCH, merge_size=MERGE, temporal_patch_size=2
    )
    cls = Qwen2_5_VLProcessor if model_type == "qwen2_5_vl" else Qwen3VLProcessor  # Qwen3.5 uses Qwen3-VL's
    # No video processor: it needs torchvision, which the CPU machines lack; the files name the full class.
    return image_only(cls)(image_processor=images, tokenizer=tok, chat_template=template)


def write_vision_model(demo_model: Path, out: Path, model_type: str) -> Path:
    """A folder with tokenizer, chat template, processor files and a random `model_type` checkpoint (seeded)."""
    if model_type not in VISION_TYPES:
        raise ValueError(f"write_vision_model: model_type {model_type!r} is not one of {VISION_TYPES}")
    out.mkdir(parents=True, exist_ok=True)
    tok = _tokenizer(demo_model, model_type)
    cfg = _config(tok, model_type)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForImageTextToText.from_config(cfg, dtype=torch.float32)
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0.0, 0.2)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    _processor(tok, model_type).save_pretrained(out)
    if model_type in VIDEO_PROCESSOR:
        # What a released Qwen-VL folder also holds: hosts with torchvision load the full processor from it.
        video = dict(
            VIDEO_PROCESSOR[model_type],
            processor_class=json.loads((out / PROCESSOR_FILE).read_text())["processor_class"],
        )
        (out / "video_preprocessor_config.json").write_text(json.dumps(video, indent=2))
    return out
