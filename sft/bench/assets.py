"""Assets of `python -m sft.bench`: Qwen2.5- and Qwen3-shaped models with random weights, synthetic chats.

Nothing is downloaded. The model folder holds random bf16 weights for the published Qwen2.5 / Qwen3
dimensions and the demo's ChatML tokenizer (its ids are valid ids of the big vocabulary).
The training parquet holds multi-turn conversations whose TOKEN lengths (rendered with the
chat template, as the trainer's dataset does) follow a log-normal fitted to a realistic SFT
distribution. Every output is a pure function of its arguments and the seed.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from sft.demo.assets import LOOKUP_KEYS, SYSTEM_PROMPTS, WORDS, build_model_config, build_tokenizer

# Published Qwen2.5 and Qwen3 dimensions (model_type qwen2 unless named); rope_theta 1e6 and 32k positions for all.
SHAPES: dict[str, dict[str, Any]] = {
    "qwen2.5-0.5b": dict(
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        vocab_size=151936,
        tie_word_embeddings=True,
    ),
    "qwen2.5-1.5b": dict(
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        vocab_size=151936,
        tie_word_embeddings=True,
    ),
    "qwen2.5-7b": dict(
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        vocab_size=152064,
        tie_word_embeddings=False,
    ),
    # Qwen3-8B's widths with 16 of its 36 layers: 4.3B parameters, so bf16 weights, gradients and AdamW state
    # (35 GB) leave room for activations on one 80 GB GPU.
    "qwen3-8b-short": dict(
        model_type="qwen3",
        hidden_size=4096,
        intermediate_size=12288,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        vocab_size=151936,
        tie_word_embeddings=False,
    ),
    # A Qwen3.5-shaped hybrid (Gated DeltaNet layers, every fourth layer gated full attention) of about 1.7B
    # parameters, and a dense Qwen3 of the same widths and depth (1.5B), to time the recurrent layers against
    # attention on the same samples.
    "qwen3.5-2b-hybrid": dict(
        model_type="qwen3_5_text",
        hidden_size=2048,
        intermediate_size=6144,
        num_hidden_layers=24,
        layer_types=(["linear_attention"] * 3 + ["full_attention"]) * 6,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=256,
        linear_num_key_heads=16,
        linear_num_value_heads=16,
        linear_key_head_dim=128,
        linear_value_head_dim=128,
        linear_conv_kernel_dim=4,
        vocab_size=151936,
        tie_word_embeddings=True,
    ),
    "qwen3-2b": dict(
        model_type="qwen3",
        hidden_size=2048,
        intermediate_size=6144,
        num_hidden_layers=24,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=128,
        vocab_size=151936,
        tie_word_embeddings=True,
    ),
}
SHAPE_NAMES = ("tiny", *SHAPES)

# Target token-length quantiles of the synthetic SFT set (before the data.max_length cap).
LENGTH_TARGETS = {"median": 800, "p90": 1800, "p99": 3600}
MIN_LENGTH = 64
TURN_WEIGHTS = (0.5, 0.3, 0.2)  # P(1, 2, 3 user/assistant turns)
USER_SHARE = (0.05, 0.3)  # fraction of a turn's tokens that the user writes: assistant-heavy
MARKER = "bench_assets.json"


def model_config(shape: str, tokenizer: PreTrainedTokenizerBase) -> PretrainedConfig:
    if shape == "tiny":
        return build_model_config(tokenizer)
    if shape not in SHAPES:
        raise ValueError(f"--shape {shape!r}: choose one of {', '.join(SHAPE_NAMES)}")
    dims = dict(SHAPES[shape])
    return AutoConfig.for_model(
        dims.pop("model_type", "qwen2"),
        **dims,
        max_position_embeddings=32768,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
        rms_norm_eps=1e-6,
        bos_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        use_cache=False,
    )


@torch.no_grad()
def _random_model(config: PretrainedConfig, seed: int) -> PreTrainedModel:
    """bf16 weights ~ N(0, 0.02), norms 1, biases 0; built in place (no fp32 copy of a 7B model).

    The random numbers are drawn on the GPU when there is one (seconds instead of minutes for 7B).
    """
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    model.to_empty(device="cpu")
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, p in model.named_parameters():  # shared (tied) parameters are listed once
        if p.ndim == 1:
            p.fill_(1.0 if "norm" in name else 0.0)
        else:
            p.copy_(torch.empty(p.shape, dtype=p.dtype, device=device).normal_(0.0, 0.02, generator=gen))
    model.tie_weights()
    return model


def write_model(shape: str, out_dir: Path, seed: int = 0) -> Path:
    """`out_dir` <- config, random bf16 safetensors and the demo ChatML tokenizer."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(seed=0)
    tokenizer.model_max_length = 131072  # long synthetic rows are intended: no length warning
    model = _random_model(model_config(shape, tokenizer), seed)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


# ---------------------------------------------------------------- synthetic conversations


def lognormal_params(median: float, p90: float, p99: float) -> tuple[float, float]:
    """(mu, sigma) of the log-normal with this median whose p90/p99 fit best (least squares in log space)."""
    z = [statistics.NormalDist().inv_cdf(q) for q in (0.9, 0.99)]
    r = [math.log(p90 / median), math.log(p99 / median)]
    sigma = sum(zi * ri for zi, ri in zip(z, r)) / sum(zi * zi for zi in z)
    return math.log(median), sigma


def target_lengths(n: int, seed: int, max_length: int, **targets: float) -> np.ndarray:
    """Token lengths ~ log-normal(targets), clipped to [MIN_LENGTH, max_length]."""
    q = {**LENGTH_TARGETS, **targets}
    mu, sigma = lognormal_params(q["median"], q["p90"], q["p99"])
    raw = np.random.default_rng(seed).lognormal(mu, sigma, n)
    return np.clip(np.rint(raw), min(MIN_LENGTH, max_length), max_length).astype(np.int64)


def _n_tokens(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]) -> int:
    # Exactly how the trainer's multi-turn dataset counts: render, then tokenize without specials.
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def single_token_words(tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """Words that are one token alone and after a space, so a message of k words is k tokens."""
    words = [
        w
        for w in (*WORDS, *LOOKUP_KEYS)
        if len(tokenizer.encode(w, add_special_tokens=False)) == 1
        and len(tokenizer.encode(" " + w, add_special_tokens=False)) == 1
    ]
    if len(words) < 8:
        raise ValueError(f"the tokenizer has only {len(words)} single-token demo words; use the demo tokenizer")
    return words


def _skeleton(system: str | None, n_turns: int) -> list[dict[str, str]]:
    msgs = [{"role": "system", "content": system}] if system else []
    for _ in range(n_turns):
        msgs += [{"role": "user", "content": ""}, {"role": "assistant", "content": ""}]
    return msgs


def synthetic_conversations(
    n: int, seed: int, tokenizer: PreTrainedTokenizerBase, max_length: int, **targets: float
) -> tuple[list[dict[str, Any]], np.ndarray]:
    """`n` rows `{"messages": [...]}` and the token length each one renders to.

    The template's own tokens (role headers, end-of-turn markers, system prompt) are measured
    once per conversation layout; the rest of a row's target length is filled with
    single-token words, split over 1-3 turns with most tokens in the assistant replies.
    """
    lengths = target_lengths(n, seed, max_length, **targets)
    rng = np.random.default_rng(seed + 1)
    words = np.asarray(single_token_words(tokenizer))
    overhead: dict[tuple[str | None, int], int] = {}
    rows = []
    for length in lengths.tolist():
        system = str(rng.choice(SYSTEM_PROMPTS)) if rng.random() < 0.3 else None
        n_turns = int(rng.choice([1, 2, 3], p=TURN_WEIGHTS))
        while True:
            key = (system, n_turns)
            if key not in overhead:
                overhead[key] = _n_tokens(tokenizer, _skeleton(system, n_turns))
            budget = length - overhead[key]
            if budget >= 2 * n_turns or n_turns == 1:
                break
            n_turns -= 1
        assert budget >= 2, f"MIN_LENGTH={MIN_LENGTH} leaves no room for a turn ({overhead[key]} template tokens)"
        per_turn = 2 + rng.multinomial(budget - 2 * n_turns, rng.dirichlet(np.ones(n_turns)))
        messages = _skeleton(system, 0)
        for turn in per_turn.tolist():
            user = min(turn - 1, max(1, round(turn * rng.uniform(*USER_SHARE))))
            for role, k in (("user", user), ("assistant", turn - user)):
                messages.append({"role": role, "content": " ".join(rng.choice(words, k).tolist())})
        rows.append({"messages": messages})
    return rows, lengths


MESSAGES_SCHEMA = pa.schema([("messages", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())])))])


def write_parquet(rows: list[dict[str, Any]], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=MESSAGES_SCHEMA), path)
    return path


def asset_paths(
    workdir: Path, shape: str, n_rows: int, max_length: int, seed: int, sample_length: int | None = None
) -> tuple[Path, Path]:
    """(model folder, train parquet) of this spec under `workdir`."""
    fixed = f"-len{sample_length}" if sample_length else ""
    return workdir / f"model-{shape}", workdir / f"train-{n_rows}x{max_length}{fixed}-seed{seed}.parquet"


def ensure_assets(
    workdir: Path, shape: str, n_rows: int, max_length: int, seed: int, sample_length: int | None = None
) -> tuple[Path, Path]:
    """Write the model folder and the train parquet unless a previous run wrote the same spec.

    `sample_length`: every conversation renders to this many tokens (long-context runs)
    instead of following the default length distribution.
    """
    model_dir, parquet = asset_paths(workdir, shape, n_rows, max_length, seed, sample_length)
    spec = {"shape": shape, "seed": seed}
    marker = model_dir / MARKER
    if not (marker.exists() and json.loads(marker.read_text()) == spec):
        write_model(shape, model_dir, seed)
        marker.write_text(json.dumps(spec))
    if not parquet.exists():
        tokenizer = build_tokenizer(seed=0)
        fixed = {q: sample_length for q in LENGTH_TARGETS} if sample_length else {}
        rows, _ = synthetic_conversations(n_rows, seed, tokenizer, max_length, **fixed)
        tmp = parquet.with_suffix(".tmp")
        write_parquet(rows, tmp)
        tmp.replace(parquet)  # atomic: a killed run never leaves a half-written parquet to reuse
    return model_dir, parquet


# The demo's ChatML layout for system/user/assistant messages (what the synthetic rows hold),
# with `{% generation %}` around each assistant reply and its end-of-turn token, which TRL's
# `assistant_only_loss` needs. It renders the same text as the demo template, and marks the
# same tokens as the trainer's loss mask.
TRL_CHAT_TEMPLATE = r"""
{%- if messages and messages[0].role == 'system' -%}
  {%- set system = messages[0].content or '' -%}{%- set rest = messages[1:] -%}
{%- else -%}
  {%- set system = 'You are a helpful assistant.' -%}{%- set rest = messages -%}
{%- endif -%}
{{- '<|im_start|>system\n' + system + '<|im_end|>\n' -}}
{%- for m in rest -%}
  {%- if m.role == 'assistant' -%}
    {{- '<|im_start|>assistant\n' -}}
    {%- generation -%}{{- (m.content or '') + '<|im_end|>' -}}{%- endgeneration -%}
    {{- '\n' -}}
  {%- else -%}
    {{- '<|im_start|>' + m.role + '\n' + (m.content or '') + '<|im_end|>\n' -}}
  {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}
""".strip()
