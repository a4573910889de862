"""Tiny random multimodal checkpoints (a `text_config` inside), written as HF model folders with save_pretrained.

Each has the demo tokenizer, a 2-3 layer text model of hidden 32 (4 query / 2 KV heads), a one-layer vision
tower and its projector, and a processor file. Weights are re-drawn with std 0.2 (the default init leaves
Gemma 3's projector at zero and attention near uniform, which hides mistakes); the vision side is stored in
`VISION_DTYPE[model_type]`, so an export that casts it, or trains it, changes its bytes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from family_models import COMMON, EXTRA
from transformers import AutoConfig, AutoModelForImageTextToText

WINDOW = 8
# The family tests' text widths, with the multimodal classes' own init and tying.
TEXT = {k: v for k, v in COMMON.items() if k not in ("initializer_range", "tie_word_embeddings")}
VISION = dict(
    hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14
)
GEMMA4_TEXT = EXTRA.get("gemma4_text", {})
GLM_ROPE = dict(rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.5, mrope_section=[2, 1, 1])
GLM_VISION = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32, patch_size=14)
WRAPPERS: dict[str, dict] = {
    # Gemma 3: sliding and full layers; the files use the older layout (language_model.model.*, vision_tower.*).
    "gemma3": dict(
        text_config=dict(
            TEXT,
            model_type="gemma3_text",
            num_hidden_layers=3,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            sliding_window=WINDOW,
            query_pre_attn_scalar=8,
        ),
        vision_config=dict(VISION, model_type="siglip_vision_model"),
        mm_tokens_per_image=4,
        tie_word_embeddings=True,
    ),
    # Qwen3-VL: multimodal rotary positions (text-only rows use one position per token for all three sections).
    "qwen3_vl": dict(
        text_config=dict(
            TEXT,
            model_type="qwen3_vl_text",
            rope_parameters=dict(
                rope_type="default", rope_theta=10000.0, mrope_section=[2, 1, 1], mrope_interleaved=True
            ),
        ),
        vision_config=dict(
            model_type="qwen3_vl_vision",
            depth=1,
            hidden_size=16,
            intermediate_size=32,
            num_heads=2,
            out_hidden_size=32,
            patch_size=14,
            deepstack_visual_indexes=[0],
        ),
        tie_word_embeddings=False,
    ),
    # Mistral 3 (Mistral Small 3.x): a Mistral text model with a sliding window, Pixtral vision, patch merger.
    "mistral3": dict(
        text_config=dict(TEXT, model_type="mistral", sliding_window=WINDOW),
        vision_config=dict(VISION, model_type="pixtral", head_dim=8),
        tie_word_embeddings=False,
    ),
    # Gemma 4: the text model of tests/family_models.py (every Gemma 4 text feature: per-layer embeddings, shared KV,
    # an MoE block, final soft-capping, which Gemma 4's class applies) under a Gemma 4 vision tower.
    "gemma4": dict(
        text_config=dict(TEXT, model_type="gemma4_text", pad_token_id=0, **GEMMA4_TEXT),
        vision_config=dict(
            model_type="gemma4_vision",
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
            head_dim=8,
            position_embedding_size=64,
        ),
        tie_word_embeddings=True,
    ),
    # Kimi K2.5: a DeepSeek-V3 text model (MLA, routed and shared experts) under its own vision tower; its wrapper's
    # module does not declare the experts-implementation choice, so sft addresses the choice to the text model.
    "kimi_k25": dict(
        text_config=dict(TEXT, model_type="deepseek_v3", **EXTRA["deepseek_v3"]),
        vision_config=dict(
            model_type="kimi_k25_vision",
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            patch_size=14,
            pos_emb_height=4,
            pos_emb_width=4,
        ),
        projection_hidden_size=16,
        tie_word_embeddings=False,
    ),
    # DeepSeek-VL-Hybrid: a Llama text model under a SigLIP tower and a high-resolution SAM encoder, whose attention
    # class is looked up by the model's attention name (so sft's name must reach the text model only).
    "deepseek_vl_hybrid": dict(
        text_config=dict(TEXT, model_type="llama"),
        vision_config=dict(VISION, model_type="siglip_vision_model"),
        high_res_vision_config=dict(
            model_type="sam_vision_model",
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            mlp_dim=32,
            image_size=64,
            patch_size=16,
            output_channels=16,
            global_attn_indexes=[0],
            window_size=2,
        ),
        tie_word_embeddings=False,
    ),
    # GLM-4.1V / 4.6V-Flash: GLM-4 layers under multimodal RoPE over half of each 16-wide head (sections 2, 1, 1);
    # its attention takes the head width from hidden_size / heads, so 2 heads of 16 (and 2 KV heads).
    "glm4v": dict(
        text_config=dict(
            TEXT,
            model_type="glm4v_text",
            num_attention_heads=2,
            num_key_value_heads=2,
            head_dim=16,
            rope_parameters=GLM_ROPE,
        ),
        vision_config=dict(GLM_VISION, model_type="glm4v_vision"),
        tie_word_embeddings=False,
    ),
    # GLM-4.5V / 4.6V: GLM-4.5's routed layers under multimodal RoPE over half of each 16-wide head (sections 2, 1, 1).
    "glm4v_moe": dict(
        text_config=dict(
            TEXT,
            **EXTRA["glm4_moe"],
            model_type="glm4v_moe_text",
            head_dim=16,
            rope_parameters=GLM_ROPE,
        ),
        vision_config=dict(GLM_VISION, model_type="glm4v_moe_vision"),
        tie_word_embeddings=False,
    ),
}
VISION_DTYPE = {
    "glm4v": torch.bfloat16,
    "glm4v_moe": torch.bfloat16,
    "gemma3": torch.bfloat16,
    "qwen3_vl": torch.float32,
    "mistral3": torch.bfloat16,
    "gemma4": torch.bfloat16,
    "kimi_k25": torch.bfloat16,
    "deepseek_vl_hybrid": torch.bfloat16,
}
PROCESSOR_FILE = "preprocessor_config.json"


def write_multimodal_model(demo_model: Path, out: Path, model_type: str, **text_overrides) -> Path:
    """A folder with the demo tokenizer, a processor file and a random `model_type` checkpoint (seeded)."""
    out.mkdir(parents=True, exist_ok=True)
    for f in demo_model.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template", "generation_config")):
            shutil.copy(f, out / f.name)
    demo = AutoConfig.from_pretrained(demo_model)
    kw = json.loads(json.dumps(WRAPPERS[model_type]))
    kw["text_config"].update(
        vocab_size=demo.vocab_size, bos_token_id=demo.bos_token_id, eos_token_id=demo.eos_token_id, **text_overrides
    )
    if "vocab_size_per_layer_input" in kw["text_config"]:  # Gemma 4's per-layer embeddings: one row per token
        kw["text_config"]["vocab_size_per_layer_input"] = demo.vocab_size
    cfg = AutoConfig.for_model(model_type, **kw)
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(cfg, dtype=torch.float32)
    text = {id(p) for p in model.get_decoder().parameters()} | {id(model.get_output_embeddings().weight)}
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
            if id(p) not in text:
                p.data = p.data.to(VISION_DTYPE[model_type])
    model.save_pretrained(out)
    (out / PROCESSOR_FILE).write_text(json.dumps({"image_processor_type": "SiglipImageProcessor", "size": 28}))
    return out
