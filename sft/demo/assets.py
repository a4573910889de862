"""Demo assets: a tiny Qwen2-architecture model, a locally trained tokenizer and synthetic chats.

`python -m sft.demo DIR` writes `DIR/model/` (weights, config, generation config, tokenizer
with a ChatML chat template) and `DIR/train.parquet`, `DIR/val.parquet`. Nothing is
downloaded and every output is a pure function of the seed, so tests and smoke runs can
rely on it. `check_answer` grades a generated final answer for accuracy demos;
`python -m sft.demo train` (sft/demo/train.py) shows training raise that accuracy.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM, Qwen2Tokenizer

DEFAULT_SYSTEM = "You are a helpful assistant."
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TOOL_TOKENS = ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"]

# Jinja unescapes `\n` inside its string literals, so a raw string keeps this readable.
# The tool list is kept short: a tool row should not be mostly system prompt.
CHAT_TEMPLATE = r"""
{%- if messages and messages[0].role == 'system' -%}
  {%- set system = messages[0].content or '' -%}{%- set rest = messages[1:] -%}
{%- else -%}
  {%- set system = 'You are a helpful assistant.' -%}{%- set rest = messages -%}
{%- endif -%}
{{- '<|im_start|>system\n' + system -}}
{%- if tools -%}
  {{- '\n\nTools:\n<tools>' -}}
  {%- for tool in tools -%}{{- '\n' + (tool | tojson) -}}{%- endfor -%}
  {{- '\n</tools>' -}}
{%- endif -%}
{{- '<|im_end|>\n' -}}
{%- for m in rest -%}
  {%- if m.role == 'assistant' -%}
    {{- '<|im_start|>assistant\n' + (m.content or '') -}}
    {%- for tc in (m.tool_calls or []) -%}
      {%- set f = tc.function if tc.function is defined else tc -%}
      {%- if m.content or not loop.first -%}{{- '\n' -}}{%- endif -%}
      {{- '<tool_call>\n{"name": "' + f.name + '", "arguments": ' -}}
      {%- if f.arguments is string -%}{{- f.arguments -}}
      {%- else -%}{{- f.arguments | tojson -}}{%- endif -%}
      {{- '}\n</tool_call>' -}}
    {%- endfor -%}
    {{- '<|im_end|>\n' -}}
  {%- elif m.role == 'tool' -%}
    {#- Consecutive tool results share one user turn, opened by the first, closed by the last. -#}
    {%- if loop.first or rest[loop.index0 - 1].role != 'tool' -%}
      {{- '<|im_start|>user\n' -}}
    {%- else -%}
      {{- '\n' -}}
    {%- endif -%}
    {{- '<tool_response>\n' + (m.content or '') + '\n</tool_response>' -}}
    {%- if loop.last or rest[loop.index0 + 1].role != 'tool' -%}
      {{- '<|im_end|>\n' -}}
    {%- endif -%}
  {%- else -%}
    {{- '<|im_start|>' + m.role + '\n' + (m.content or '') + '<|im_end|>\n' -}}
  {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}
""".strip()

WORDS = "apple river stone cloud green tiger lemon piano moon bread chair smile ocean grape horse light paper storm candy house plant sugar wheel zebra".split()
LOOKUP_KEYS = ("kiwi", "plum", "pear", "fig", "lime", "mango", "peach", "melon")
SYSTEM_PROMPTS = (DEFAULT_SYSTEM, "Answer with the result only.", "You are a precise assistant.")
LOOKUP_TOOL = {
    "type": "function",
    "function": {
        "name": "lookup",
        "description": "Number stored for a key.",
        "parameters": {
            "type": "object",
            "properties": {"key": {"type": "string"}},
            "required": ["key"],
        },
    },
}
FOLLOW_UP = "Reverse that."


def _lookup_value(key: str) -> int:
    # A fixed, seed-independent table: the model must copy the tool response, not memorise it.
    return sum(map(ord, key)) % 90 + 10


def _solve(prompt: str, previous_answer: str | None) -> str:
    """The answer to one user prompt; `previous_answer` serves the follow-up task."""
    if prompt == FOLLOW_UP:
        assert previous_answer is not None, "follow-up without an earlier answer"
        return " ".join(reversed(previous_answer.split()))
    task, _, arg = prompt.partition(": ")
    items = arg.split()
    if task == "Repeat":
        return " ".join(items)
    if task == "Reverse":
        return " ".join(reversed(items))
    if task == "Sort":
        return " ".join(sorted(items))
    if task == "Uppercase":
        return arg.upper()
    raise ValueError(f"unknown demo task in prompt {prompt!r}")


def _random_prompt(rng: random.Random) -> str:
    kind = rng.choice(("Repeat", "Reverse", "Sort", "Uppercase"))
    if kind == "Sort":
        return "Sort: " + " ".join(str(rng.randrange(10)) for _ in range(rng.randint(3, 5)))
    if kind == "Uppercase":
        return "Uppercase: " + rng.choice(WORDS)
    n = rng.randint(2, 4) if kind == "Repeat" else rng.randint(3, 5)
    return f"{kind}: " + " ".join(rng.sample(WORDS, n))


def _tool_turns(rng: random.Random) -> list[dict[str, Any]]:
    keys = rng.sample(LOOKUP_KEYS, rng.randint(1, 2))
    calls = [{"type": "function", "function": {"name": "lookup", "arguments": json.dumps({"key": k})}} for k in keys]
    responses = [f"{k}: {_lookup_value(k)}" for k in keys]
    return [
        {"role": "user", "content": "Look up " + " and ".join(keys) + "."},
        {"role": "assistant", "content": "", "tool_calls": calls},
        *({"role": "tool", "content": r} for r in responses),
        {"role": "assistant", "content": ", ".join(responses)},
    ]


def make_conversations(n: int, seed: int) -> list[dict[str, Any]]:
    """`n` parquet rows `{"messages": [...], "tools": json-str | None}`, fixed by `seed`."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        messages: list[dict[str, Any]] = []
        if rng.random() < 0.3:
            messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
        with_tool = rng.random() < 0.15
        answer: str | None = None
        for _ in range(rng.randint(0, 1) if with_tool else rng.randint(1, 3)):
            # The follow-up makes later turns depend on earlier ones (true multi-turn).
            prompt = FOLLOW_UP if answer and rng.random() < 0.3 else _random_prompt(rng)
            answer = _solve(prompt, answer)
            messages += [
                {"role": "user", "content": prompt},
                {"role": "assistant", "content": answer},
            ]
        if with_tool:
            messages += _tool_turns(rng)
        rows.append({"messages": messages, "tools": json.dumps([LOOKUP_TOOL]) if with_tool else None})
    return rows


def reference_answer(messages: Sequence[dict[str, Any]]) -> str:
    """The correct final assistant answer, derived from the last user turn (and tool output)."""
    last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
    tool_outputs = [m["content"] for m in messages[last_user:] if m["role"] == "tool"]
    if tool_outputs:
        return ", ".join(tool_outputs)
    earlier = [m["content"] for m in messages[:last_user] if m["role"] == "assistant"]
    return _solve(messages[last_user]["content"], earlier[-1] if earlier else None)


def check_answer(task_row: dict[str, Any], generated_text: str) -> bool:
    """True when `generated_text` (up to `<|im_end|>`) is the row's correct final answer."""
    text = generated_text.split("<|im_end|>", 1)[0].strip()
    return text == reference_answer(task_row["messages"])


def _corpus(rows: list[dict[str, Any]]) -> Iterator[str]:
    # Train on the strings the template will emit so task words end up as single tokens.
    yield f"{DEFAULT_SYSTEM}\n\nTools:\n<tools>\n{json.dumps(LOOKUP_TOOL)}\n</tools>"
    for row in rows:
        for m in row["messages"]:
            yield f"{m['role']}\n{m['content']}"
            for call in m.get("tool_calls") or []:
                fn = call["function"]
                yield f'\n{{"name": "{fn["name"]}", "arguments": {fn["arguments"]}}}\n'


def build_tokenizer(vocab_size: int = 1024, seed: int = 0) -> PreTrainedTokenizerFast:
    """A byte-level BPE of at most `vocab_size` tokens, trained on demo conversations.

    The small demo corpus runs out of merges first, so `len(tokenizer)` is usually smaller.
    """
    # AutoTokenizer loads any `model_type=qwen2` folder as Qwen2Tokenizer, which rebuilds the
    # normalizer and pre-tokenizer from its own defaults. Training under that same pipeline
    # and returning that class makes the in-memory and the reloaded tokenizer identical.
    pipeline = Qwen2Tokenizer().backend_tokenizer
    tok = Tokenizer(models.BPE())
    tok.normalizer = pipeline.normalizer
    tok.pre_tokenizer = pipeline.pre_tokenizer
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(TOOL_TOKENS),  # the tool tokens are added after training
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(make_conversations(2000, seed)), trainer=trainer)
    bpe = json.loads(tok.to_str())["model"]
    hf = Qwen2Tokenizer(
        vocab=bpe["vocab"],
        merges=[tuple(m) for m in bpe["merges"]],
        unk_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=["<|im_start|>"],
        model_max_length=2048,
    )
    hf.add_tokens(TOOL_TOKENS, special_tokens=False)
    hf.chat_template = CHAT_TEMPLATE
    return hf


def build_model_config(tokenizer: PreTrainedTokenizerFast, tie_word_embeddings: bool = True) -> Qwen2Config:
    """A 2-layer, 64-wide Qwen2 config whose vocabulary covers `tokenizer`."""
    pad_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    bos_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else pad_id
    return Qwen2Config(
        vocab_size=-(-len(tokenizer) // 64) * 64,  # a multiple of 64 keeps matmuls aligned
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        max_position_embeddings=2048,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=bos_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        use_cache=False,
    )


def _message_type() -> pa.DataType:
    function = pa.struct([("name", pa.string()), ("arguments", pa.string())])
    call = pa.struct([("type", pa.string()), ("function", function)])
    return pa.struct([("role", pa.string()), ("content", pa.string()), ("tool_calls", pa.list_(call))])


PARQUET_SCHEMA = pa.schema([("messages", pa.list_(_message_type())), ("tools", pa.string())])


def _write_parquet(rows: list[dict[str, Any]], path: Path) -> None:
    pq.write_table(pa.Table.from_pylist(rows, schema=PARQUET_SCHEMA), path)


def write_demo(out_dir: str | Path, n_train: int = 2000, n_val: int = 200, seed: int = 0) -> Path:
    """Write `model/`, `train.parquet` and `val.parquet` under `out_dir`; return `out_dir`."""
    out = Path(out_dir)
    model_dir = out / "model"
    model_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(seed=seed)
    config = build_model_config(tokenizer)
    # fork_rng: seed the init without changing the caller's global RNG state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=[config.eos_token_id, config.pad_token_id],
        pad_token_id=config.pad_token_id,
        do_sample=False,
        max_new_tokens=64,
    )
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    _write_parquet(make_conversations(n_train, seed), out / "train.parquet")
    # A different stream for validation so it is not a copy of the first training rows.
    _write_parquet(make_conversations(n_val, seed + 1_000_003), out / "val.parquet")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(
        prog="python -m sft.demo", description=__doc__, epilog="`python -m sft.demo train --help`: the training demo"
    )
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--n-train", type=int, default=2000)
    parser.add_argument("--n-val", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    # The CLI prints its own summary; the per-shard save/load bars would only add noise.
    transformers.utils.logging.disable_progress_bar()
    out = write_demo(args.out_dir, args.n_train, args.n_val, args.seed)
    model = Qwen2ForCausalLM.from_pretrained(out / "model")
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model:  {out / 'model'} ({n_params:,} parameters, vocab {model.config.vocab_size})")
    print(f"train:  {out / 'train.parquet'} ({args.n_train} rows)")
    print(f"val:    {out / 'val.parquet'} ({args.n_val} rows)")
    return 0
