"""Demo assets: tokenizer tokens and ChatML rendering, conversation data, written model and parquet."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from sft.demo.__main__ import main
from sft.demo.assets import (
    LOOKUP_TOOL,
    PARQUET_SCHEMA,
    build_model_config,
    build_tokenizer,
    check_answer,
    make_conversations,
    reference_answer,
    write_demo,
)
from sft.demo.train import evaluate, format_report, generate_answers, task_name

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
DEFAULT_SYSTEM_TURN = f"{IM_START}system\nYou are a helpful assistant.{IM_END}\n"
TOOL_JSON = (
    '{"type": "function", "function": {"name": "lookup", "description": "Number stored for a key.", '
    '"parameters": {"type": "object", "properties": {"key": {"type": "string"}}, "required": ["key"]}}}'
)


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_demo(tmp_path_factory.mktemp("demo"), n_train=64, n_val=16, seed=0)


def render(tok, messages, tools=None, gen: bool = False) -> str:
    return tok.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=gen)


def tools_of(row: dict) -> list | None:
    return json.loads(row["tools"]) if row["tools"] else None


def test_special_tokens(tok):
    assert tok.eos_token == IM_END and tok.pad_token == "<|endoftext|>"
    assert tok.convert_tokens_to_ids(["<|endoftext|>", IM_START, IM_END]) == [0, 1, 2]
    assert (tok.pad_token_id, tok.eos_token_id) == (0, 2)
    assert IM_START in tok.all_special_tokens
    for name in ("<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"):
        ids = tok(name)["input_ids"]
        assert len(ids) == 1 and name not in tok.all_special_tokens
        # Not special, so it survives decoding that drops special tokens.
        assert tok.decode(ids, skip_special_tokens=True) == name
    assert tok.tokenize(" apple pear") == ["Ġapple", "Ġpear"]  # task words are single tokens


def test_default_system_prompt(tok):
    messages = [{"role": "user", "content": "Repeat: apple pear"}, {"role": "assistant", "content": "apple pear"}]
    expected = (
        DEFAULT_SYSTEM_TURN + f"{IM_START}user\nRepeat: apple pear{IM_END}\n{IM_START}assistant\napple pear{IM_END}\n"
    )
    assert render(tok, messages) == expected


def test_explicit_system_and_generation_prompt(tok):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Sort: 3 1 2"}]
    expected = f"{IM_START}system\nBe brief.{IM_END}\n{IM_START}user\nSort: 3 1 2{IM_END}\n{IM_START}assistant\n"
    assert render(tok, messages, gen=True) == expected
    assert render(tok, messages) == expected[: -len(f"{IM_START}assistant\n")]


def test_tools_tool_calls_and_merged_responses(tok):
    kiwi = {"type": "function", "function": {"name": "lookup", "arguments": '{"key": "kiwi"}'}}
    fig = {"type": "function", "function": {"name": "lookup", "arguments": {"key": "fig"}}}  # a mapping
    messages = [
        {"role": "user", "content": "Look up kiwi and fig."},
        {"role": "assistant", "content": None, "tool_calls": [kiwi, fig]},
        {"role": "tool", "content": "kiwi: 57"},
        {"role": "tool", "content": "fig: 22"},
        {"role": "assistant", "content": "Once more.", "tool_calls": [kiwi]},
        {"role": "tool", "content": "kiwi: 57"},
        {"role": "assistant", "content": "kiwi: 57, fig: 22"},
    ]
    expected = (
        f"{IM_START}system\nYou are a helpful assistant.\n\nTools:\n<tools>\n{TOOL_JSON}\n</tools>{IM_END}\n"
        f"{IM_START}user\nLook up kiwi and fig.{IM_END}\n"
        f"{IM_START}assistant\n"
        '<tool_call>\n{"name": "lookup", "arguments": {"key": "kiwi"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "lookup", "arguments": {"key": "fig"}}\n</tool_call>'
        f"{IM_END}\n"
        f"{IM_START}user\n<tool_response>\nkiwi: 57\n</tool_response>\n<tool_response>\nfig: 22\n</tool_response>"
        f"{IM_END}\n"
        f"{IM_START}assistant\nOnce more.\n"
        '<tool_call>\n{"name": "lookup", "arguments": {"key": "kiwi"}}\n</tool_call>'
        f"{IM_END}\n"
        f"{IM_START}user\n<tool_response>\nkiwi: 57\n</tool_response>{IM_END}\n"
        f"{IM_START}assistant\nkiwi: 57, fig: 22{IM_END}\n"
    )
    assert render(tok, messages, tools=[LOOKUP_TOOL]) == expected
    assert json.dumps(LOOKUP_TOOL) == TOOL_JSON


def assert_prefix_property(tok, rows: list[dict]) -> int:
    checked = 0
    for row in rows:
        messages, tools = row["messages"], tools_of(row)
        full = render(tok, messages, tools)
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompt = render(tok, messages[:i], tools, gen=True)
            upto = render(tok, messages[: i + 1], tools)
            assert prompt.endswith(f"{IM_START}assistant\n")
            assert upto.startswith(prompt) and full.startswith(upto), (i, full)
            checked += 1
    return checked


def test_prefix_property_over_generated_rows(tok):
    assert assert_prefix_property(tok, make_conversations(200, 0)) > 300


def test_prefix_property_over_parquet_rows(tok, demo):
    # Parquet gives back `tool_calls=None` and `content=""` fillers: they must render the same.
    rows = pq.read_table(demo / "train.parquet").to_pylist()
    assert assert_prefix_property(tok, rows) > 0
    fresh = make_conversations(64, 0)
    assert [render(tok, r["messages"], tools_of(r)) for r in rows] == [
        render(tok, r["messages"], tools_of(r)) for r in fresh
    ]


def test_conversation_mix_and_length(tok):
    rows = make_conversations(200, 0)
    roles = [[m["role"] for m in r["messages"]] for r in rows]
    with_tools = [r for r in rows if r["tools"] is not None]
    assert 0.08 < len(with_tools) / len(rows) < 0.25
    assert all("tool" in roles[rows.index(r)] for r in with_tools)
    assert 0.15 < sum(rs[0] == "system" for rs in roles) / len(rows) < 0.45
    assert {sum(role == "assistant" for role in rs) for rs, r in zip(roles, rows) if r["tools"] is None} == {1, 2, 3}
    lengths = sorted(len(tok(render(tok, r["messages"], tools_of(r)))["input_ids"]) for r in rows)
    assert lengths[len(lengths) * 3 // 4] < 120


def test_check_answer():
    def row(*turns: str) -> dict:
        messages = [{"role": role, "content": c} for role, c in zip(["user", "assistant"] * 3, turns)]
        return {"messages": messages, "tools": None}

    assert check_answer(row("Reverse: apple moon tiger"), "tiger moon apple<|im_end|>")
    assert not check_answer(row("Reverse: apple moon tiger"), "apple moon tiger")
    assert check_answer(row("Sort: 3 1 2"), " 1 2 3\n")
    assert not check_answer(row("Sort: 3 1 2"), "1 2 3 4")
    assert check_answer(row("Uppercase: zebra"), "ZEBRA")
    assert check_answer(row("Repeat: moon smile", "moon smile", "Reverse that."), "smile moon")
    assert not check_answer(row("Repeat: moon smile", "moon smile", "Reverse that."), "moon smile")
    rows = make_conversations(200, 1)
    assert any(r["tools"] for r in rows)
    for r in rows:
        answer = r["messages"][-1]["content"]
        assert check_answer(r, answer + IM_END), r
        assert not check_answer(r, answer + " apple")


def test_model_config(tok):
    config = build_model_config(tok, tie_word_embeddings=False)
    assert config.vocab_size % 64 == 0 and len(tok) <= config.vocab_size < len(tok) + 64
    assert (config.hidden_size, config.num_hidden_layers, config.intermediate_size) == (64, 2, 128)
    assert (config.num_attention_heads, config.num_key_value_heads) == (4, 2)
    assert (config.eos_token_id, config.pad_token_id, config.bos_token_id) == (2, 0, 0)
    assert config.tie_word_embeddings is False and config.use_cache is False
    assert config.max_position_embeddings == 2048
    assert config.rope_parameters["rope_theta"] == 10000.0


def test_written_model_loads_and_runs(tok, demo):
    model = AutoModelForCausalLM.from_pretrained(demo / "model")
    loaded = AutoTokenizer.from_pretrained(demo / "model")
    assert (loaded.eos_token, loaded.pad_token, len(loaded)) == (IM_END, "<|endoftext|>", len(tok))
    row = make_conversations(1, 3)[0]
    text = render(loaded, row["messages"], tools_of(row))
    assert text == render(tok, row["messages"], tools_of(row))
    ids = loaded(text, return_tensors="pt")["input_ids"]
    assert ids.tolist() == tok(text, return_tensors="pt")["input_ids"].tolist()
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], model.config.vocab_size)
    assert torch.isfinite(logits).all()
    generation = json.loads((demo / "model" / "generation_config.json").read_text())
    assert generation["eos_token_id"][0] == tok.eos_token_id


def test_parquet_schema(demo):
    for name, n in (("train", 64), ("val", 16)):
        table = pq.read_table(demo / f"{name}.parquet")
        assert table.column_names == ["messages", "tools"] and table.num_rows == n
        assert table.schema.equals(PARQUET_SCHEMA)
    train = pq.read_table(demo / "train.parquet").to_pylist()
    val = pq.read_table(demo / "val.parquet").to_pylist()
    assert train[0]["messages"] != val[0]["messages"]
    tool_rows = [r for r in train if r["tools"]]
    assert tool_rows and json.loads(tool_rows[0]["tools"]) == [LOOKUP_TOOL]


def test_same_seed_same_assets(demo, tmp_path):
    again = write_demo(tmp_path / "again", n_train=64, n_val=16, seed=0)
    for name in ("train.parquet", "val.parquet"):
        assert pq.read_table(demo / name).equals(pq.read_table(again / name))
    a, b = (load_file(str(d / "model" / "model.safetensors")) for d in (demo, again))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (demo / "model" / "tokenizer.json").read_text() == (again / "model" / "tokenizer.json").read_text()
    other = write_demo(tmp_path / "other", n_train=64, n_val=16, seed=1)
    c = load_file(str(other / "model" / "model.safetensors"))
    assert not torch.equal(a["model.embed_tokens.weight"], c["model.embed_tokens.weight"])
    assert not pq.read_table(demo / "train.parquet").equals(pq.read_table(other / "train.parquet"))


def test_cli(tmp_path, capsys):
    main([str(tmp_path / "cli"), "--n-train", "8", "--n-val", "4", "--seed", "2"])
    out = capsys.readouterr().out
    assert "parameters" in out and "(8 rows)" in out and "(4 rows)" in out
    assert pq.read_table(tmp_path / "cli" / "train.parquet").num_rows == 8


# ----- the training demo's grading (sft/demo/train.py); the multi-minute run itself is not a test -----


class _Oracle:
    """Stands in for a model: `generate` appends the right answer for even rows, a wrong one for odd rows."""

    def __init__(self, tok, rows: list[dict]) -> None:
        self.tok, self.rows, self.calls = tok, rows, 0

    def eval(self) -> None:
        pass

    def generate(self, input_ids, attention_mask, **kwargs):
        out = []
        for ids in input_ids:
            i = self.calls
            self.calls += 1
            answer = reference_answer(self.rows[i]["messages"]) + ("" if i % 2 == 0 else " apple")
            new = self.tok(answer + IM_END, add_special_tokens=False)["input_ids"]
            out.append(ids.tolist() + new)
        width = max(map(len, out))
        return torch.tensor([row + [self.tok.pad_token_id] * (width - len(row)) for row in out])


def test_evaluate_grades_new_tokens_per_task(tok):
    rows = make_conversations(12, 7)
    scores = evaluate(_Oracle(tok, rows), tok, rows)
    tasks = [task_name(r) for r in rows]
    assert scores["all"] == (6, 12)  # even rows right, odd rows wrong: the prompt is not graded
    for task in set(tasks):
        right = sum(1 for i, t in enumerate(tasks) if t == task and i % 2 == 0)
        assert scores[task] == (right, tasks.count(task))
    assert set(tasks) <= {"Repeat", "Reverse", "Sort", "Uppercase", "Follow-up", "Lookup"}
    report = format_report({"all": (0, 12)}, scores).splitlines()
    assert report[-1].split() == ["all", "12", "0.0%", "50.0%"]


def test_batched_generation_equals_one_by_one(demo):
    model, loaded = AutoModelForCausalLM.from_pretrained(demo / "model"), AutoTokenizer.from_pretrained(demo / "model")
    with torch.no_grad():  # larger weights: varied answers, so left padding has something to break
        for p in model.parameters():
            p.mul_(8)
    rows = make_conversations(6, 5)  # prompts of different lengths: padded in a batch
    batched = generate_answers(model, loaded, rows, batch_size=3, max_new_tokens=8)
    assert len(set(batched)) > 1
    assert batched == generate_answers(model, loaded, rows, batch_size=1, max_new_tokens=8)


def test_demo_train_pipeline(tmp_path, capsys):
    """`python -m sft.demo train` end to end, tiny: torchrun trainer -> export -> grading -> plot.

    Two steps cannot teach the model anything, so the demo reports that accuracy did not rise
    (exit status 1); the real run (README) takes a few minutes.
    """
    argv = ["train", "--work", str(tmp_path), "--steps", "2", "--batch", "8", "--n-train", "32", "--n-eval", "6"]
    assert main(argv) == 1
    out = capsys.readouterr().out
    export = tmp_path / "run" / "global_step_2" / "huggingface"
    assert f"(model: {export})" in out and (export / "model.safetensors").is_file()
    assert out.splitlines()[-3].split()[:2] == ["all", "6"]  # the report's last row: 6 graded rows
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train/loss" in r] == [1, 2] and any("val/loss" in r for r in rows)
