"""python -m sft.inspect_data: the rows as the trainer sees them, trained spans marked; images of vision rows as one
marker each (size and token count), their sizes and token counts in JSON lines."""

from __future__ import annotations

import copy
import io
import json
import re
import shutil
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from chat_templates import QWEN3
from PIL import Image
from vision_data import SCHEMAS, write_vision_rows
from vision_models import write_vision_model

from sft.config.schema import load_config
from sft.data.build import build_dataset
from sft.data.processor import load_processor
from sft.inspect_data import main
from sft.models.loading import load_tokenizer


def overrides(demo_dir) -> list[str]:
    return [
        f"data.train_files={demo_dir}/train.parquet",
        f"model.partial_pretrain={demo_dir}/model",
        "data.multiturn.enable=true",
        "data.max_length=256",
        "data.truncation=right",
    ]


def expected_dataset(demo_dir):
    cfg = load_config(overrides(demo_dir))
    tok = load_tokenizer(cfg)
    return tok, build_dataset(cfg.data.train_files, tok, cfg.data, -1, True)


def test_text_marks_exactly_the_assistant_turns(demo_dir, capsys):
    assert main(["--rows", "4", *overrides(demo_dir)]) == 0
    out = capsys.readouterr().out
    tok, ds = expected_dataset(demo_dir)
    rows = pq.read_table(demo_dir / "train.parquet").slice(0, 4).to_pylist()
    blocks = re.split(r"^=== row \d+ .*===$\n", out, flags=re.M)[1:]
    headers = re.findall(r"^=== row (\d+) \((.*)\) \| length (\d+) \| trained (\d+) ===$", out, flags=re.M)
    assert len(blocks) == len(headers) == 4
    checked = 0
    for i, (block, header, row) in enumerate(zip(blocks, headers, rows)):
        ids, mask = ds.token_ids(i)
        assert header == (str(i), f"{demo_dir}/train.parquet row {i}", str(len(ids)), str(int(mask.sum())))
        assert block.replace("[[", "").replace("]]", "").rstrip("\n") == tok.decode(ids.tolist()).rstrip("\n")
        if not any(m.get("tool_calls") for m in row["messages"]):
            answers = [m["content"] + "<|im_end|>" for m in row["messages"] if m["role"] == "assistant"]
            assert re.findall(r"\[\[(.*?)\]\]", block, flags=re.S) == answers
            checked += 1
    assert checked > 0


def test_colour_on_a_terminal(demo_dir, capsys, monkeypatch):
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    assert main(["--rows", "1", *overrides(demo_dir)]) == 0
    out = capsys.readouterr().out
    assert "\x1b[1;32m" in out and "[[" not in out


def test_jsonl_is_unpadded_ids_and_mask(demo_dir, capsys):
    assert main(["--format", "jsonl", "--rows", "3", *overrides(demo_dir)]) == 0
    lines = capsys.readouterr().out.splitlines()
    _, ds = expected_dataset(demo_dir)
    assert len(lines) == 3
    for i, line in enumerate(lines):
        obj = json.loads(line)
        ids, mask = ds.token_ids(i)
        assert obj == {"row": i, "input_ids": ids.tolist(), "loss_mask": mask.tolist()}


@pytest.mark.parametrize(
    ("extra", "code", "pattern"),
    [
        (["--split", "val"], 2, r"^sft: config error: data.val_files is not set"),
        (["data.no_such_key=1"], 2, r"^sft: config error: .*no_such_key"),
        (
            ["model.partial_pretrain=/no/such/dir"],
            2,
            r"^sft: config error: model.partial_pretrain=/no/such/dir: not a dir",
        ),
        (["data.multiturn.enable=false"], 3, r"^sft: data error: .*column 'prompt' \(data.prompt_key\) not found"),
    ],
)
def test_errors_are_one_line(demo_dir, capsys, extra, code, pattern):
    assert main([*overrides(demo_dir), *extra]) == code
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and re.match(pattern, err)


def test_trained_format_shows_what_happens_to_reasoning(demo_tokenizer, tmp_path, capsys):
    # Qwen3-style template: reasoning kept only after the last user turn.
    tok = copy.deepcopy(demo_tokenizer)
    tok.add_tokens(["<think>", "</think>"])
    tok.chat_template = QWEN3
    tok.save_pretrained(tmp_path / "model")
    messages = [
        {"role": "user", "content": "Sort: 3 1 2"},
        {"role": "assistant", "content": "<think>\nsmall first\n</think>\n\n1 2 3"},
        {"role": "user", "content": "Reverse it."},
        {"role": "assistant", "content": "3 2 1", "reasoning_content": "backwards"},
    ]
    pq.write_table(pa.Table.from_pylist([{"messages": messages}]), tmp_path / "r.parquet")
    argv = [
        "--format",
        "trained",
        f"data.train_files={tmp_path}/r.parquet",
        f"model.partial_pretrain={tmp_path}/model",
        "data.multiturn.enable=true",
        "data.max_length=256",
    ]
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert re.match(r"=== row 0 \(.*r\.parquet row 0\) \| length \d+ \| trained \d+ ===", lines[0])
    assert [json.loads(line[2:]) for line in lines[1:]] == [
        "1 2 3<|im_end|>",  # earlier reasoning: dropped by the template, so not trained
        "<think>\nbackwards\n</think>\n\n3 2 1<|im_end|>",
    ]


# ----- images (vision-language rows) -----
MARKER = re.compile(r"<image (\d+): (\d+)x(\d+) px -> (\d+) tokens>")


@pytest.fixture(scope="module")
def vision(demo_dir, tmp_path_factory) -> dict:
    """A tiny Qwen2.5-VL folder, image chats with bytes (train) and relative paths (val)."""
    root = tmp_path_factory.mktemp("inspect_vision")
    model = write_vision_model(demo_dir / "model", root / "model", "qwen2_5_vl")
    train = write_vision_rows(root / "data", 4, seed=5, layout="verl")
    val = write_vision_rows(root / "data", 3, seed=6, layout="paths")
    return {"model": model, "train": train, "val": val}


def vision_overrides(vision) -> list[str]:
    return [
        f"data.train_files={vision['train']}",
        f"data.val_files={vision['val']}",
        f"model.partial_pretrain={vision['model']}",
        "data.multiturn.enable=true",
        "data.max_length=512",
    ]


def vision_dataset(vision, split: str):
    cfg = load_config(vision_overrides(vision))
    tok = load_tokenizer(cfg)
    processor = load_processor(str(vision["model"]), tok)
    return tok, build_dataset(str(vision[split]), tok, cfg.data, -1, True, processor=processor)


def stored_images(vision, split: str) -> list[list[tuple[int, int, int]]]:
    """(width, height, tokens) of each row's images, from the files themselves: PIL's size, and the image
    processor's grid of patches merged 2x2."""
    _, ds = vision_dataset(vision, split)
    out = []
    for row in pq.read_table(vision[split]).to_pylist():
        files = [vision[split].parent / im if isinstance(im, str) else io.BytesIO(im["bytes"]) for im in row["images"]]
        images = [Image.open(f).convert("RGB") for f in files]
        grids = ds.processor.image_processor(images=images, return_tensors="np")["image_grid_thw"]
        out.append([(*im.size, int(g.prod()) // 4) for im, g in zip(images, grids)])
    return out


def test_text_shows_each_image_as_one_marker(vision, capsys):
    assert main(["--rows", "4", *vision_overrides(vision)]) == 0
    out = capsys.readouterr().out
    tok, ds = vision_dataset(vision, "train")
    rows = pq.read_table(vision["train"]).to_pylist()
    blocks = re.split(r"^=== row \d+ .*===$\n", out, flags=re.M)[1:]
    assert len(blocks) == 4 and "<|image_pad|>" not in out
    for i, (block, row, images) in enumerate(zip(blocks, rows, stored_images(vision, "train"))):
        markers = [(int(n), int(w), int(h), int(t)) for n, w, h, t in MARKER.findall(block)]
        assert markers == [(k, *im) for k, im in enumerate(images, start=1)], f"row {i}"
        # Each marker stands where its image tokens are: expanded again, the block is the decoded row.
        expanded = MARKER.sub(lambda m: "<|image_pad|>" * int(m.group(4)), block)
        ids, _ = ds.token_ids(i)
        assert expanded.replace("[[", "").replace("]]", "").rstrip("\n") == tok.decode(ids.tolist()).rstrip("\n")
        answers = [m["content"] + "<|im_end|>" for m in row["messages"] if m["role"] == "assistant"]
        assert re.findall(r"\[\[(.*?)\]\]", block, flags=re.S) == answers


def test_jsonl_gives_each_images_place_size_and_tokens(vision, capsys):
    """The val split (relative paths) is read with the processor the trainer builds from the train files."""
    assert main(["--format", "jsonl", "--split", "val", *vision_overrides(vision)]) == 0
    lines = capsys.readouterr().out.splitlines()
    tok, ds = vision_dataset(vision, "val")
    image_pad = tok.convert_tokens_to_ids("<|image_pad|>")
    assert len(lines) == 3
    for i, (line, images) in enumerate(zip(lines, stored_images(vision, "val"))):
        obj = json.loads(line)
        ids, mask = ds.token_ids(i)
        assert (obj["row"], obj["input_ids"], obj["loss_mask"]) == (i, ids.tolist(), mask.tolist())
        # Runs of image tokens, found in the ids: where each image starts and how long it is.
        starts = [t for t in range(len(ids)) if ids[t] == image_pad and (t == 0 or ids[t - 1] != image_pad)]
        assert obj["images"] == [
            {"start": s, "tokens": n, "width": w, "height": h} for s, (w, h, n) in zip(starts, images, strict=True)
        ]
        assert all((ids[s : s + n] == image_pad).all() for s, (_, _, n) in zip(starts, images))


def test_text_rows_have_no_images_key(demo_dir, capsys):
    assert main(["--format", "jsonl", "--rows", "1", *overrides(demo_dir)]) == 0
    assert "images" not in json.loads(capsys.readouterr().out)


def test_vision_errors_are_one_line(vision, tmp_path, capsys):
    # The model folder without its processor files: a configuration error naming the key and the folder.
    model = tmp_path / "model"
    shutil.copytree(vision["model"], model)
    (model / "processor_config.json").unlink()
    assert main([*vision_overrides(vision), f"model.partial_pretrain={model}"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert re.match(rf"^sft: config error: model.partial_pretrain: {re.escape(str(model))}: cannot load", err)
    # A row whose image is not an image: a data error naming the file and the row.
    rows = pq.read_table(vision["train"]).to_pylist()
    rows[1]["images"][0]["bytes"] = b"not an image"
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMAS["verl"]), bad)
    assert main([*vision_overrides(vision), f"data.train_files={bad}"]) == 3
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert re.match(rf"^sft: data error: {re.escape(str(bad))} row 1: .*not an image format PIL can read", err)
