"""MultiTurnSFTDataset: ids equal the chat template's, and exactly the assistant turns are trained."""

from __future__ import annotations

import copy
import json

import numpy as np
import pyarrow as pa
import pytest

from sft.config.schema import DataConfig
from sft.data.build import build_dataset
from sft.data.multiturn import MultiTurnSFTDataset
from sft.demo.assets import PARQUET_SCHEMA

IM_END = "<|im_end|>"


def chat_cfg(**kwargs) -> DataConfig:
    cfg = DataConfig(train_files="unused", max_length=1024, truncation="error")
    cfg.multiturn.enable = True
    for key, value in kwargs.items():
        setattr(cfg, key, value)
    return cfg


def build(path: str, tokenizer, cfg: DataConfig | None = None) -> MultiTurnSFTDataset:
    ds = build_dataset(path, tokenizer, cfg or chat_cfg(), max_samples=-1, pad_to_max_length=False)
    assert isinstance(ds, MultiTurnSFTDataset)
    return ds


def trained_text(tokenizer, ds, index: int = 0) -> str:
    ids, mask = ds.token_ids(index)
    return tokenizer.decode(ids[mask.astype(bool)].tolist(), skip_special_tokens=False)


def reference_ids(tokenizer, messages, tools=None, **kwargs) -> list[int]:
    out = tokenizer.apply_chat_template(messages, tools=tools, tokenize=True, **kwargs)
    return list(out["input_ids"])


def call(key: str) -> dict:
    return {"type": "function", "function": {"name": "lookup", "arguments": json.dumps({"key": key})}}


def call_text(key: str) -> str:
    return f'<tool_call>\n{{"name": "lookup", "arguments": {{"key": "{key}"}}}}\n</tool_call>'


TWO_TURNS = [
    {"role": "user", "content": "Repeat: apple pear"},
    {"role": "assistant", "content": "apple pear"},
    {"role": "user", "content": "Sort: 3 1 2"},
    {"role": "assistant", "content": "1 2 3"},
]


@pytest.mark.parametrize("system", [None, "Answer with the result only."])
def test_assistant_turns_and_end_of_turn_are_trained(demo_tokenizer, write_parquet, system):
    messages = ([{"role": "system", "content": system}] if system else []) + TWO_TURNS
    ds = build(write_parquet([{"messages": messages}]), demo_tokenizer)
    ids, mask = ds.token_ids(0)
    assert ids.tolist() == reference_ids(demo_tokenizer, messages)
    assert trained_text(demo_tokenizer, ds) == f"apple pear{IM_END}1 2 3{IM_END}"
    full = demo_tokenizer.decode(ids.tolist())
    # Without a system message the template's default one is rendered, and never trained.
    assert ("You are a helpful assistant." in full) == (system is None)
    # The trained runs are exactly [content .. <|im_end|>]: the header's "\n" before and the
    # "\n" after <|im_end|> stay untrained.
    runs = np.flatnonzero(np.diff(np.concatenate([[0], mask, [0]])))
    starts, ends = runs[::2], runs[1::2]
    assert len(starts) == 2
    for s, e in zip(starts, ends):
        assert demo_tokenizer.decode(ids[s - 2 : s].tolist()) == "assistant\n"
        assert demo_tokenizer.convert_ids_to_tokens(int(ids[e - 1])) == IM_END
        assert demo_tokenizer.decode([int(ids[e])]) == "\n"


def test_tool_calls_and_merged_tool_responses(demo_tokenizer, write_parquet):
    messages = [
        {"role": "user", "content": "Look up kiwi and fig."},
        {"role": "assistant", "content": None, "tool_calls": [call("kiwi"), call("fig")]},
        {"role": "tool", "content": "kiwi: 57"},
        {"role": "tool", "content": "fig: 22"},
        {"role": "assistant", "content": "Checking plum.", "tool_calls": [call("plum")]},
        {"role": "tool", "content": "plum: 96"},
        {"role": "assistant", "content": "kiwi: 57, fig: 22, plum: 96"},
    ]
    tools = [
        {
            "type": "function",
            "function": {
                "name": "lookup",
                "description": "Number stored for a key.",
                "parameters": {"type": "object", "properties": {"key": {"type": "string"}}, "required": ["key"]},
            },
        }
    ]
    path = write_parquet([{"messages": messages, "tools": json.dumps(tools)}], schema=PARQUET_SCHEMA)
    ds = build(path, demo_tokenizer)
    ids, _ = ds.token_ids(0)
    assert ids.tolist() == reference_ids(demo_tokenizer, messages, tools=tools)
    full = demo_tokenizer.decode(ids.tolist())
    assert "<tool_response>\nkiwi: 57\n</tool_response>\n<tool_response>\nfig: 22" in full  # merged turn
    expected = (
        f"{call_text('kiwi')}\n{call_text('fig')}{IM_END}"
        f"Checking plum.\n{call_text('plum')}{IM_END}"
        f"kiwi: 57, fig: 22, plum: 96{IM_END}"
    )
    assert trained_text(demo_tokenizer, ds) == expected


def test_tools_as_structs_lose_parquet_null_fillers(demo_tokenizer, write_parquet):
    # Two tools with different properties: parquet stores the union of keys, null-filled.
    tools = [
        {"type": "function", "function": {"name": "a", "parameters": {"properties": {"x": {"type": "string"}}}}},
        {"type": "function", "function": {"name": "b", "parameters": {"properties": {"y": {"type": "integer"}}}}},
    ]
    messages = TWO_TURNS[:2]
    ds = build(write_parquet([{"messages": messages, "tools": tools}]), demo_tokenizer)
    ids, _ = ds.token_ids(0)
    assert "null" not in demo_tokenizer.decode(ids.tolist())
    assert ids.tolist() == reference_ids(demo_tokenizer, messages, tools=tools)


def test_per_message_loss_mask_overrides_both_ways(demo_tokenizer, write_parquet):
    messages = [
        {"role": "system", "content": "Be brief.", "loss_mask": 1},
        {"role": "user", "content": "Repeat: apple pear", "loss_mask": 1},
        {"role": "assistant", "content": "apple pear", "loss_mask": 0},
        {"role": "user", "content": "Sort: 3 1 2"},
        {"role": "assistant", "content": "1 2 3"},
    ]
    ds = build(write_parquet([{"messages": messages}]), demo_tokenizer)
    assert trained_text(demo_tokenizer, ds) == f"Be brief.{IM_END}Repeat: apple pear{IM_END}1 2 3{IM_END}"


def test_bad_loss_mask_value(demo_tokenizer, write_parquet):
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo", "loss_mask": 2}]
    with pytest.raises(ValueError, match=r"row 0.*loss_mask=2"):
        build(write_parquet([{"messages": messages}]), demo_tokenizer)


LLAMA_LIKE = (
    "{%- for m in messages -%}"
    "{{- '<|start_header_id|>' + m.role + '<|end_header_id|>\\n\\n' + m.content + '<|eot_id|>' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}{%- endif -%}"
)


def test_llama_like_template(demo_tokenizer, write_parquet):
    tok = copy.deepcopy(demo_tokenizer)
    tok.add_tokens(["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"], special_tokens=True)
    tok.chat_template = LLAMA_LIKE
    messages = [{"role": "system", "content": "Be brief."}] + TWO_TURNS
    ds = build(write_parquet([{"messages": messages}]), tok)
    ids, _ = ds.token_ids(0)
    assert ids.tolist() == reference_ids(tok, messages)
    assert trained_text(tok, ds) == "apple pear<|eot_id|>1 2 3<|eot_id|>"


# Renders an assistant's reasoning only after the last user turn, so rendering a shorter
# conversation shows reasoning that the full conversation drops (no prefix property);
# tool calls come before the content.
DROPS_REASONING = (
    "{%- set ns = namespace(last_user=-1) -%}"
    "{%- for m in messages -%}{%- if m.role == 'user' -%}{%- set ns.last_user = loop.index0 -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- for m in messages -%}"
    "{{- '<|im_start|>' + m.role + '\\n' -}}"
    "{%- if m.role == 'assistant' and m.reasoning and loop.index0 > ns.last_user -%}"
    "{{- '<think>' + m.reasoning + '</think>\\n' -}}"
    "{%- endif -%}"
    "{%- for tc in (m.tool_calls or []) -%}"
    "{{- '<|python_tag|>' + tc.function.name + '(' + tc.function.arguments + ')' -}}"
    "{%- endfor -%}"
    "{{- m.content or '' -}}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


def test_template_that_drops_earlier_reasoning(demo_tokenizer, write_parquet):
    tok = copy.deepcopy(demo_tokenizer)
    tok.chat_template = DROPS_REASONING
    messages = [
        {"role": "user", "content": "Repeat: apple pear"},
        {"role": "assistant", "content": "apple pear", "reasoning": "copy the words"},
        {"role": "user", "content": "Sort: 3 1 2"},
        {"role": "assistant", "content": "1 2 3", "reasoning": "ascending"},
    ]
    full = tok.apply_chat_template(messages, tokenize=False)
    first = tok.apply_chat_template(messages[:2], tokenize=False)
    assert not full.startswith(first)  # the case the fallback exists for
    ds = build(write_parquet([{"messages": messages}]), tok)
    ids, _ = ds.token_ids(0)
    assert ids.tolist() == reference_ids(tok, messages)
    assert trained_text(tok, ds) == f"apple pear{IM_END}<think>ascending</think>\n1 2 3{IM_END}"


def test_dropped_reasoning_with_tool_calls(demo_tokenizer, write_parquet):
    # Every turn but the last renders differently inside the whole conversation: the first
    # tool call (its own reasoning dropped) is found by its role header and closed at
    # <|im_end|> although it holds another special token; the second (earlier reasoning
    # dropped) by its own rendering, tool call first.
    tok = copy.deepcopy(demo_tokenizer)
    tok.add_tokens(["<|python_tag|>"], special_tokens=True)
    tok.chat_template = DROPS_REASONING
    messages = [
        {"role": "user", "content": "Look up kiwi and fig."},
        {"role": "assistant", "content": None, "tool_calls": [call("kiwi")], "reasoning": "need a lookup"},
        {"role": "tool", "content": "kiwi: 57"},
        {"role": "assistant", "content": "checking fig", "tool_calls": [call("fig")]},
        {"role": "tool", "content": "fig: 22"},
        {"role": "assistant", "content": "x"},
        {"role": "user", "content": "Again."},
        {"role": "assistant", "content": "kiwi: 57, fig: 22", "reasoning": "same"},
    ]
    ds = build(write_parquet([{"messages": messages}]), tok)
    ids, _ = ds.token_ids(0)
    assert ids.tolist() == reference_ids(tok, messages)
    expected = (
        f'<|python_tag|>lookup({{"key": "kiwi"}}){IM_END}'
        f'<|python_tag|>lookup({{"key": "fig"}})checking fig{IM_END}'
        f"x{IM_END}<think>same</think>\nkiwi: 57, fig: 22{IM_END}"
    )
    assert trained_text(tok, ds) == expected


def test_generation_prompt_unlike_rendered_turns(demo_tokenizer, write_parquet):
    # The generation prompt adds an empty think block that finished turns never show, so
    # no turn is a continuation of its prompt: each is found by its content, in order
    # ("apple pear" also occurs in the user turn before it).
    tok = copy.deepcopy(demo_tokenizer)
    tok.chat_template = (
        "{%- for m in messages -%}{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' -}}{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n<think></think>' -}}{%- endif -%}"
    )
    ds = build(write_parquet([{"messages": TWO_TURNS}]), tok)
    assert ds.token_ids(0)[0].tolist() == reference_ids(tok, TWO_TURNS)
    assert trained_text(tok, ds) == f"apple pear{IM_END}1 2 3{IM_END}"


THINKING_TEMPLATE = (
    "{%- if greeting is defined -%}{{- greeting + '\\n' -}}{%- endif -%}"
    "{%- if enable_thinking is defined -%}{{- 'thinking=' + (enable_thinking | string) + '\\n' -}}{%- endif -%}"
    "{%- for m in messages -%}{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' -}}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


def test_enable_thinking_column_and_template_kwargs(demo_tokenizer, write_parquet):
    tok = copy.deepcopy(demo_tokenizer)
    tok.chat_template = THINKING_TEMPLATE
    rows = [{"messages": TWO_TURNS[:2], "enable_thinking": v} for v in (True, False, None)]
    cfg = chat_cfg(apply_chat_template_kwargs={"greeting": "hello"})
    ds = build(write_parquet(rows), tok, cfg)
    texts = [tok.decode(ds.token_ids(i)[0].tolist()) for i in range(3)]
    assert texts[0].startswith("hello\nthinking=True\n")
    assert texts[1].startswith("hello\nthinking=False\n")
    assert texts[2].startswith("hello\n<|im_start|>user")
    assert ds.token_ids(0)[0].tolist() == reference_ids(tok, TWO_TURNS[:2], greeting="hello", enable_thinking=True)
    assert trained_text(tok, ds, 2) == f"apple pear{IM_END}"


def test_demo_rows_match_template_and_train_only_assistant_text(demo_tokenizer, demo_dir):
    ds = build(str(demo_dir / "train.parquet"), demo_tokenizer)
    table = pa.parquet.read_table(demo_dir / "train.parquet").to_pylist()
    for i in range(0, len(ds), 7):
        row = table[i]
        tools = json.loads(row["tools"]) if row["tools"] else None
        assert ds.token_ids(i)[0].tolist() == reference_ids(demo_tokenizer, row["messages"], tools=tools)
        answers = [m["content"] for m in row["messages"] if m["role"] == "assistant" and m["content"]]
        text = trained_text(demo_tokenizer, ds, i)
        assert text.count(IM_END) == sum(m["role"] == "assistant" for m in row["messages"])
        assert all(a in text for a in answers)


@pytest.mark.parametrize(
    ("messages", "pattern"),
    [
        ([{"role": "bot", "content": "hi"}, {"role": "assistant", "content": "x"}], r"messages\[0\] has role 'bot'"),
        (
            [{"role": "user", "content": None}, {"role": "assistant", "content": "x"}],
            r"messages\[0\] \(user\) has no content",
        ),
        (
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None}],
            r"messages\[1\] \(assistant\) has no content",
        ),
        ([{"role": "user", "content": "hi"}], r"no assistant message"),
    ],
)
def test_bad_rows_name_file_and_row(demo_tokenizer, write_parquet, messages, pattern):
    good = {"messages": TWO_TURNS}
    path = write_parquet([good, {"messages": messages}])
    with pytest.raises(ValueError, match=rf"data\.parquet row 1: .*{pattern}"):
        build(path, demo_tokenizer)


def test_missing_messages_column_lists_available(demo_tokenizer, write_parquet):
    path = write_parquet([{"conversation": TWO_TURNS, "id": 1}])
    with pytest.raises(ValueError, match=r"'messages'.*available columns: \['conversation', 'id'\]"):
        build(path, demo_tokenizer)
