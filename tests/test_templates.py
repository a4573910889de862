"""Exact masks for the behaviours of published chat templates (tests/chat_templates.py).

For every template, random conversations (tool calls, reasoning fields and inline <think>,
stray whitespace) are tokenised by the dataset; the ids must equal the template's own
tokenisation and the mask must equal an expectation built here by hand from the template's
known behaviour: per assistant message, the text it renders after its role header through
its end-of-turn token. Also on 2 processes; and a template that mixes user text into the
reply's turn is refused by the mask audit.
"""

from __future__ import annotations

import copy
import json
import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from chat_templates import TEMPLATES, TOKENS
from distributed_helper import run_ranks
from template_workers import build_shared

from sft.config.schema import DataConfig
from sft.data.build import build_dataset

WORDS = "apple pear kiwi fig plum lime sort the list count words reply add two nine seven".split()
TOOLS = [{"type": "function", "function": {"name": "lookup", "description": "Value of a key.", "parameters": {}}}]
FAMILIES = (
    "qwen3",
    "r1",
    "phi",
    "nemo",
    "harmony",
    "trim",
    "gemma",
    "llama",
    "mistral",
    "phi4",
    "r1tools",
    "sections",
    "xmlcalls",
    "thinkprompt",
    "blocks",
)
TOOL_FAMILIES = ("qwen3", "nemo", "harmony", "trim", "llama", "mistral", "r1tools", "sections", "xmlcalls", "blocks")
MULTI_CALL = ("sections", "xmlcalls", "blocks")  # turns with one or two calls
ROWS = 30


def tokenizer_for(demo_tokenizer, family: str):
    tok = copy.deepcopy(demo_tokenizer)
    for special in (False, True):
        names = [t for t, s in TOKENS[family] if s == special]
        if names:
            tok.add_tokens(names, special_tokens=special)
    tok.chat_template = TEMPLATES[family]
    return tok


# ----- random conversations ----------------------------------------------------------------


def say(rng: random.Random, lo: int = 2, hi: int = 7) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def padded(rng: random.Random, text: str) -> str:
    return rng.choice(["", " ", "\n", "  \n"]) + text + rng.choice(["", " ", "\n", "\n\n "])


def tool_call(rng: random.Random, mapping: bool = False) -> dict:
    cid = "".join(rng.choice("abcdefgh123") for _ in range(9))
    args = {"key": rng.choice(WORDS)}
    return {
        "id": cid,
        "type": "function",
        "function": {"name": "lookup", "arguments": args if mapping else json.dumps(args)},
    }


def conversation(rng: random.Random, family: str) -> dict:
    tools = family in TOOL_FAMILIES and rng.random() < 0.7
    thinking = rng.choice([True, False, None]) if family == "qwen3" else None
    messages: list[dict] = []
    if rng.random() < 0.5:
        messages.append({"role": "system", "content": say(rng)})
    turns = rng.randint(1, 3)
    for t in range(turns):
        messages.append({"role": "user", "content": padded(rng, say(rng))})
        if tools and rng.random() < 0.6:
            calls = [
                tool_call(rng, family == "xmlcalls") for _ in range(rng.randint(1, 2) if family in MULTI_CALL else 1)
            ]
            msg: dict = {"role": "assistant", "content": None, "tool_calls": calls}
            if family in ("qwen3", "llama", "mistral", "r1tools", *MULTI_CALL) and rng.random() < 0.4:
                msg["content"] = say(rng)
            if family in ("qwen3", "harmony", "blocks") and rng.random() < 0.5:
                msg["reasoning_content" if family == "qwen3" else "thinking"] = say(rng)
            messages.append(msg)
            messages.extend({"role": "tool", "content": say(rng), "tool_call_id": c["id"]} for c in calls)
        answer: dict = {"role": "assistant", "content": padded(rng, say(rng))}
        last = t == turns - 1
        if family == "qwen3" and not (last and thinking is False):
            style = rng.choice(["field", "inline", "none"])
            if style == "field":
                answer["reasoning_content"] = say(rng)
            elif style == "inline":
                answer["content"] = f"<think>\n{say(rng)}\n</think>\n\n{say(rng)}"
        if family in ("r1", "r1tools"):
            answer["content"] = f"<think>\n{say(rng)}\n</think>\n\n{say(rng)}"
        if family in ("harmony", "blocks"):
            answer["content"] = say(rng)
            if rng.random() < 0.6:
                answer["thinking"] = say(rng)
        if family == "thinkprompt":
            style = rng.choice(["field", "inline", "none"])
            answer["content"] = say(rng)
            if style == "field":
                answer["reasoning_content"] = say(rng)
            elif style == "inline":
                answer["content"] = f"<think>\n{say(rng)}\n</think>\n\n{say(rng)}"
        messages.append(answer)
    return {"messages": messages, "tools": json.dumps(TOOLS) if tools else None, "enable_thinking": thinking}


# ----- the expectation, by hand from each template's behaviour ----------------------------


def _calls_json(msg: dict, key: str = "arguments") -> list[str]:
    return [
        f'{{"name": "{c["function"]["name"]}", "{key}": {c["function"]["arguments"]}'
        for c in msg.get("tool_calls") or []
    ]


R1_CALL = "<｜tool▁call▁begin｜>function<｜tool▁sep｜>{name}\n```json\n{arguments}\n```<｜tool▁call▁end｜>"


def expected_turns(family: str, row: dict, eom: bool = False) -> list[tuple[str, str]]:
    """(text right before, trained text) of each assistant message, in order."""
    msgs = row["messages"]
    last_user = max(i for i, m in enumerate(msgs) if m["role"] == "user")
    out = []
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        content = m.get("content") or ""
        calls = m.get("tool_calls") or []
        is_last = i == len(msgs) - 1
        if family == "qwen3":
            thought = m.get("reasoning_content") or ""
            if "</think>" in content:
                thought = content.split("</think>")[0].split("<think>")[-1].strip("\n")
                content = content.split("</think>")[-1].lstrip("\n")
            lead, think = "<|im_start|>assistant\n", ""
            if i > last_user and (is_last or thought):
                think = f"<think>\n{thought.strip(chr(10))}\n</think>\n\n"
            if row["enable_thinking"] is False and think:
                # The generation prompt "<think>\n\n</think>\n\n" gives what the turn starts with:
                # all of it for an empty thought, else the opening "<think>\n".
                given = think if is_last and not thought else "<think>\n"
                lead, think = lead + given, think[len(given) :]
            tail = "".join(
                ("\n" if content or k else "") + f"<tool_call>\n{c}}}\n</tool_call>"
                for k, c in enumerate(_calls_json(m))
                if calls
            )
            out.append((lead, think + content + tail + "<|im_end|>"))
        elif family == "r1":
            out.append(("<｜Assistant｜>", content.split("</think>")[-1] + "<｜end▁of▁sentence｜>"))
        elif family == "phi":
            out.append(("<|assistant|>\n", content + "<|end|>"))
        elif family == "nemo":
            lead = "[/TOOL_RESULTS]" if msgs[i - 1]["role"] == "tool" else "[/INST]"
            if calls:
                body = ", ".join(f'{c}, "id": "{t["id"]}"}}' for c, t in zip(_calls_json(m), calls))
                out.append((lead, f"[TOOL_CALLS][{body}]</s>"))
            else:
                out.append((lead, content.strip() + "</s>"))
        elif family == "harmony":
            analysis = ""
            later_final = any(f["role"] == "assistant" and not f.get("tool_calls") for f in msgs[i + 1 :])
            if m.get("thinking") and (is_last or (calls and not later_final)):
                analysis = f"<|channel|>analysis<|message|>{m['thinking']}<|end|><|start|>assistant"
            if calls:
                call = calls[0]["function"]
                body = f" to=functions.{call['name']}<|channel|>commentary json<|message|>{call['arguments']}<|call|>"
            else:
                body = f"<|channel|>final<|message|>{content}" + ("<|return|>" if is_last else "<|end|>")
            out.append(("<|start|>assistant", analysis + body))
        elif family == "trim":
            body = _calls_json(m, "parameters")[0] + "}" if calls else content.strip()
            out.append(("assistant<|end_header_id|>\n\n", body + "<|eot_id|>"))
        elif family == "gemma":
            out.append(("<start_of_turn>model\n", content.strip() + "<end_of_turn>"))
        elif family == "llama":
            if calls:
                call = calls[0]["function"]
                body = f'{{"name": "{call["name"]}", "parameters": {json.dumps(call["arguments"])}}}'
                body += "<|eom_id|>" if eom else "<|eot_id|>"
            else:
                body = content.strip() + "<|eot_id|>"
            out.append(("assistant<|end_header_id|>\n\n", body))
        elif family == "mistral":
            lead = {"tool": "[/TOOL_RESULTS]", "assistant": ""}.get(msgs[i - 1]["role"], "[/INST]")
            body = "".join(f"[TOOL_CALLS]{c['function']['name']}[ARGS]{c['function']['arguments']}" for c in calls)
            out.append((lead, content + body + "</s>"))
        elif family == "phi4":
            out.append(("<|im_start|>assistant<|im_sep|>", content + "<|im_end|>"))
        elif family == "sections":
            section = "".join(
                f"<|call|>{c['function']['name']}:{k}<|args|>{c['function']['arguments']}<|/call|>"
                for k, c in enumerate(calls)
            )
            body = content + (f"<|calls|>{section}<|/calls|>" if calls else "")
            out.append(("<|turn|>assistant<|sep|>", body + "<|eot|>"))
        elif family == "xmlcalls":
            body = content
            for k, c in enumerate(calls):
                params = "".join(
                    f"<parameter={a}>\n{v}\n</parameter>\n" for a, v in sorted(c["function"]["arguments"].items())
                )
                body += ("\n" if content or k else "") + f"<tool_call>\n<function={c['function']['name']}>\n{params}"
                body += "</function>\n</tool_call>"
            out.append(("<|im_start|>assistant\n", body + ("\n" if calls else "") + "<|im_end|>"))
        elif family == "thinkprompt":
            if i < last_user:
                content = content.split("</think>")[-1].lstrip("\n")
            if m.get("reasoning_content") and i > last_user:
                content = f"<think>\n{m['reasoning_content']}\n</think>\n\n" + content
            # The generation prompt gives the opening "<think>\n", wherever the reasoning came from.
            given = "<think>\n" if content.startswith("<think>\n") else ""
            out.append(("<|im_start|>assistant\n" + given, content[len(given) :] + "<|im_end|>"))
        elif family == "blocks":
            thinking = m.get("thinking")
            body = f"{thinking}<|/think|>" if thinking else ""
            if calls:
                body += "<|plan|>" + "".join(f"{c['function']['name']} {c['function']['arguments']};" for c in calls)
                body += "<|/plan|>"
            body += f"<|answer|>{content}<|/answer|>" if content else ""
            out.append(("<|turn|>bot" + ("<|think|>" if thinking else ""), body + "<|eot|>"))
        elif family == "r1tools":
            if calls:
                body = "\n".join(R1_CALL.format(**c["function"]) for c in calls)
                piece = f"{content}<｜tool▁calls▁begin｜>{body}<｜tool▁calls▁end｜>"
                out.append(("<｜Assistant｜>", piece + "<｜end▁of▁sentence｜>"))
            elif msgs[i - 1]["role"] == "tool":
                out.append(("<｜tool▁outputs▁end｜>", content + "<｜end▁of▁sentence｜>"))
            else:
                out.append(("<｜Assistant｜>", content.split("</think>")[-1] + "<｜end▁of▁sentence｜>"))
    return out


def expected_mask(tok, family: str, row: dict, kwargs: dict, last_only: bool = False) -> tuple[list[int], np.ndarray]:
    text = tok.apply_chat_template(row["messages"], tokenize=False, **kwargs)
    spans, cursor = [], 0
    for lead, piece in expected_turns(family, row, eom="builtin_tools" in kwargs):
        at = text.index(lead + piece, cursor) + len(lead)
        spans.append((at, at + len(piece)))
        cursor = at + len(piece)
    spans = spans[-1:] if last_only else spans
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    starts = np.array([s for s, _ in enc["offset_mapping"]])
    mask = np.zeros(len(starts), dtype=np.uint8)
    for s, e in spans:
        mask[(starts >= s) & (starts < e)] = 1
    mask[0] = 0
    return enc["input_ids"], mask


def template_kwargs(row: dict) -> dict:
    kwargs = {}
    if row["tools"]:
        kwargs["tools"] = json.loads(row["tools"])
    if row["enable_thinking"] is not None:
        kwargs["enable_thinking"] = row["enable_thinking"]
    return kwargs


def chat_cfg() -> DataConfig:
    cfg = DataConfig(train_files="unused", max_length=4096, truncation="error")
    cfg.multiturn.enable = True
    return cfg


def write_rows(path, rows: list[dict]) -> str:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


@pytest.mark.parametrize("family", FAMILIES)
def test_template_masks_are_exact(demo_tokenizer, tmp_path, family):
    tok = tokenizer_for(demo_tokenizer, family)
    rng = random.Random(f"{family}-13")
    rows = [conversation(rng, family) for _ in range(ROWS)]
    ds = build_dataset(write_rows(tmp_path / "d.parquet", rows), tok, chat_cfg(), -1, pad_to_max_length=False)
    assert len(ds) == ROWS and ds.bad_rows.count == 0  # no valid row refused
    for r, row in enumerate(rows):
        kwargs = template_kwargs(row)
        ids, mask = ds.token_ids(r)
        ref_ids, ref_mask = expected_mask(tok, family, row, kwargs)
        reference = tok.apply_chat_template(row["messages"], tokenize=True, **kwargs)["input_ids"]
        assert ids.tolist() == list(reference) == ref_ids, f"row {r}"
        np.testing.assert_array_equal(mask, ref_mask, err_msg=f"{family} row {r}: {row}")


@pytest.mark.parametrize("family", ("qwen3", "harmony", "phi"))
def test_train_on_last(demo_tokenizer, tmp_path, family):
    tok = tokenizer_for(demo_tokenizer, family)
    rng = random.Random(f"{family}-last")
    rows = [conversation(rng, family) for _ in range(10)]
    cfg = chat_cfg()
    cfg.multiturn.train_on = "last"
    ds = build_dataset(write_rows(tmp_path / "d.parquet", rows), tok, cfg, -1, pad_to_max_length=False)
    for r, row in enumerate(rows):
        _, ref_mask = expected_mask(tok, family, row, template_kwargs(row), last_only=True)
        np.testing.assert_array_equal(ds.token_ids(r)[1], ref_mask, err_msg=f"{family} row {r}")


def test_loss_mask_overrides_with_reasoning(demo_tokenizer, tmp_path):
    tok = tokenizer_for(demo_tokenizer, "qwen3")
    messages = [
        {"role": "user", "content": "Sort: 3 1 2", "loss_mask": 1},
        {"role": "assistant", "content": "<think>\nsmall first\n</think>\n\n1 2 3", "loss_mask": 0},
        {"role": "user", "content": "Reverse it."},
        {"role": "assistant", "content": "3 2 1", "reasoning_content": "backwards"},
    ]
    ds = build_dataset(write_rows(tmp_path / "d.parquet", [{"messages": messages}]), tok, chat_cfg(), -1, False)
    ids, mask = ds.token_ids(0)
    trained = tok.decode(ids[mask.astype(bool)].tolist())
    assert trained == "Sort: 3 1 2<|im_end|><think>\nbackwards\n</think>\n\n3 2 1<|im_end|>"


def test_empty_answer_whose_reasoning_is_dropped(demo_tokenizer, tmp_path):
    # Changing only its reasoning changes nothing in the rendering: its place comes from its content.
    tok = tokenizer_for(demo_tokenizer, "harmony")
    messages = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "", "thinking": "nothing to say"},
        {"role": "user", "content": "b"},
        {"role": "assistant", "content": "ok"},
    ]
    ds = build_dataset(write_rows(tmp_path / "d.parquet", [{"messages": messages}]), tok, chat_cfg(), -1, False)
    ids, mask = ds.token_ids(0)
    trained = tok.decode(ids[mask.astype(bool)].tolist())
    assert trained == "<|channel|>final<|message|><|end|><|channel|>final<|message|>ok<|return|>"


def test_shared_over_two_processes_is_identical(demo_tokenizer, tmp_path):
    jobs = []
    for family in ("qwen3", "harmony"):
        folder = tmp_path / family
        tokenizer_for(demo_tokenizer, family).save_pretrained(folder)
        rng = random.Random(f"{family}-shared")
        rows = [conversation(rng, family) for _ in range(280)]  # two batches of 256 rows
        jobs.append((str(folder), write_rows(tmp_path / f"{family}.parquet", rows)))
    run_ranks(build_shared, 2, jobs, str(tmp_path / "out.pt"))
    results = torch.load(tmp_path / "out.pt", weights_only=False)
    for (folder, path), per_rank in zip(jobs, results):
        from transformers import AutoTokenizer

        ref = build_dataset(path, AutoTokenizer.from_pretrained(folder), chat_cfg(), -1, pad_to_max_length=False)
        assert len(ref) == 280
        for got in per_rank:
            for key in ("input_ids", "loss_mask", "lengths", "rows"):
                np.testing.assert_array_equal(got[key], getattr(ref, key), err_msg=f"{path} {key}")


def echo_rows() -> list[dict]:
    good = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello", "reasoning": "greet"}]
    return [{"messages": good}, {"messages": good}]


def test_audit_refuses_a_template_that_mixes_user_text_into_the_reply(demo_tokenizer, tmp_path):
    tok = tokenizer_for(demo_tokenizer, "echo")
    path = write_rows(tmp_path / "echo.parquet", echo_rows())
    with pytest.raises(
        ValueError, match=r"echo\.parquet row 0: mask audit: .*message 1 \(assistant\).*message 0 \(user\)"
    ):
        build_dataset(path, tok, chat_cfg(), -1, pad_to_max_length=False)
    cfg = chat_cfg()
    cfg.on_bad_sample = "skip"
    with pytest.raises(ValueError, match=r"no sample to train on .* 2 bad"):
        build_dataset(path, tok, cfg, -1, pad_to_max_length=False)


def test_audit_refuses_an_assistant_message_the_template_leaves_out(demo_tokenizer, tmp_path):
    tok = copy.deepcopy(demo_tokenizer)
    tok.chat_template = (
        "{%- for m in messages -%}{%- if m.role != 'assistant' or loop.last -%}"
        "{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' -}}{%- endif -%}{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
    )
    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    rows = [{"messages": msgs + [{"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]}]
    with pytest.raises(ValueError, match=r"row 0: mask audit: assistant message 1 has no place"):
        build_dataset(write_rows(tmp_path / "x.parquet", rows), tok, chat_cfg(), -1, pad_to_max_length=False)


# ----- edge conversations, over several templates -----------------------------------------

CALL = {"id": "abc123def", "type": "function", "function": {"name": "lookup", "arguments": '{"key": "fig"}'}}
EDGES = {
    "whitespace": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " \n "}],
    "empty": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}],
    "echo": [
        {"role": "system", "content": "say hi"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hi"},
        {"role": "user", "content": "say hi"},
        {"role": "assistant", "content": "say hi"},
    ],
    "header_text": [
        {"role": "user", "content": "assistant\n\nmodel\n"},
        {"role": "assistant", "content": "assistant\n\nmodel\nuser\n"},
    ],
    "two_replies": [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "one"},
        {"role": "assistant", "content": "two"},
    ],
    "ends_with_tool": [
        {"role": "user", "content": "look up fig"},
        {"role": "assistant", "content": None, "tool_calls": [CALL]},
        {"role": "tool", "content": "sweet", "tool_call_id": CALL["id"]},
    ],
}
EDGE_FAMILIES = ("qwen3", "phi4", "gemma", "llama", "mistral", "r1tools", "trim")


@pytest.mark.parametrize("family", EDGE_FAMILIES)
def test_edge_conversations(demo_tokenizer, tmp_path, family):
    tok = tokenizer_for(demo_tokenizer, family)
    cases = [
        (n, m)
        for n, m in EDGES.items()
        if not (family in ("gemma", "phi4") and n == "ends_with_tool")
        and not (family == "gemma" and n == "two_replies")
    ]
    rows = [{"messages": m, "tools": json.dumps(TOOLS), "enable_thinking": None} for _, m in cases]
    ds = build_dataset(write_rows(tmp_path / "d.parquet", rows), tok, chat_cfg(), -1, pad_to_max_length=False)
    assert len(ds) == len(rows)
    for r, ((name, _), row) in enumerate(zip(cases, rows)):
        ids, mask = ds.token_ids(r)
        ref_ids, ref_mask = expected_mask(tok, family, row, template_kwargs(row))
        assert ids.tolist() == ref_ids, name
        np.testing.assert_array_equal(mask, ref_mask, err_msg=f"{family} {name}")


def test_gemma_refuses_consecutive_replies_in_one_line(demo_tokenizer, tmp_path):
    tok = tokenizer_for(demo_tokenizer, "gemma")
    rows = [{"messages": EDGES["two_replies"]}, {"messages": EDGES["echo"]}]
    cfg = chat_cfg()
    cfg.on_bad_sample = "skip"
    ds = build_dataset(write_rows(tmp_path / "d.parquet", rows), tok, cfg, -1, pad_to_max_length=False)
    assert len(ds) == 1 and ds.bad_rows.count == 1


@pytest.mark.parametrize("kwargs", [{"builtin_tools": ["search"]}, {"tools_in_user_message": False}])
def test_llama_template_arguments(demo_tokenizer, tmp_path, kwargs):
    # <|eom_id|> closes a call when built-in tools are on; tools may go to the system turn instead.
    tok = tokenizer_for(demo_tokenizer, "llama")
    rng = random.Random("llama-kwargs")
    rows = [conversation(rng, "llama") for _ in range(8)]
    cfg = chat_cfg()
    cfg.apply_chat_template_kwargs = kwargs
    ds = build_dataset(write_rows(tmp_path / "d.parquet", rows), tok, cfg, -1, pad_to_max_length=False)
    for r, row in enumerate(rows):
        ids, mask = ds.token_ids(r)
        ref_ids, ref_mask = expected_mask(tok, "llama", row, {**template_kwargs(row), **kwargs})
        assert ids.tolist() == ref_ids
        np.testing.assert_array_equal(mask, ref_mask, err_msg=f"row {r}")


def test_r1_call_turn_without_a_closing_special_token(demo_tokenizer, tmp_path):
    # One call: the turn ends at the plain-text call marker; trained through it, not past it.
    tok = tokenizer_for(demo_tokenizer, "r1tools")
    messages = EDGES["ends_with_tool"] + [{"role": "assistant", "content": "fig is sweet"}]
    cfg = chat_cfg()
    cfg.apply_chat_template_kwargs = {"unclosed": True}
    ds = build_dataset(write_rows(tmp_path / "d.parquet", [{"messages": messages}]), tok, cfg, -1, False)
    ids, mask = ds.token_ids(0)
    trained = tok.decode(ids[mask.astype(bool)].tolist())
    call = R1_CALL.format(**CALL["function"])
    assert trained == f"<｜tool▁calls▁begin｜>{call}fig is sweet<｜end▁of▁sentence｜>"


# ----- tool-call tails, generation-prompt tokens, turn-dependent blocks --------------------


def test_reasoning_field_or_inline_gives_one_mask(demo_tokenizer, tmp_path):
    # The same rendered text gives the same mask whichever field the reasoning came in; the
    # "<think>\n" that the generation prompt gives is never trained.
    tok = tokenizer_for(demo_tokenizer, "thinkprompt")
    head = [{"role": "user", "content": "add two nine"}, {"role": "assistant", "content": "eleven"}]
    head.append({"role": "user", "content": "and seven"})
    field = {"role": "assistant", "content": "eighteen", "reasoning_content": "eleven plus seven"}
    inline = {"role": "assistant", "content": "<think>\neleven plus seven\n</think>\n\neighteen"}
    rows = [{"messages": head + [field]}, {"messages": head + [inline]}]
    ds = build_dataset(write_rows(tmp_path / "d.parquet", rows), tok, chat_cfg(), -1, pad_to_max_length=False)
    (ids_a, mask_a), (ids_b, mask_b) = ds.token_ids(0), ds.token_ids(1)
    assert ids_a.tolist() == ids_b.tolist()
    np.testing.assert_array_equal(mask_a, mask_b)
    trained = tok.decode(ids_a[mask_a.astype(bool)].tolist())
    assert trained == "eleven<|im_end|>eleven plus seven\n</think>\n\neighteen<|im_end|>"


def test_audit_refuses_a_span_that_stops_before_its_end_of_turn(demo_tokenizer, tmp_path, monkeypatch):
    # The old end rule (the first special token after the calls) leaves "<|/calls|><|eot|>"
    # untrained; the audit, which knows the end-of-turn token, refuses the row.
    import sft.data.multiturn as multiturn

    real = multiturn.trained_spans

    def first_special_end_rule(messages, overrides, text, windows, starts, closers, *rest):
        return real(messages, overrides, text, windows, starts, None, *rest)

    monkeypatch.setattr(multiturn, "trained_spans", first_special_end_rule)
    tok = tokenizer_for(demo_tokenizer, "sections")
    messages = EDGES["ends_with_tool"] + [{"role": "assistant", "content": "fig is sweet"}]
    path = write_rows(tmp_path / "d.parquet", [{"messages": messages, "tools": json.dumps(TOOLS)}])
    with pytest.raises(ValueError, match=r"d\.parquet row 0: mask audit: .*message 1 .*stops before .*'<\|eot\|>'"):
        build_dataset(path, tok, chat_cfg(), -1, pad_to_max_length=False)
