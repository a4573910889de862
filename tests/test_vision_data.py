"""Vision-language rows as `build_dataset(..., processor=...)` tokenizes them (sft/data/vision_dataset.py).

Expectations are computed here, never by the code under test: ids and loss masks of hand-built rows are tokenized
piece by piece from the fixtures' ChatML template (tests/vision_models.py) with image token counts worked out by
hand (sizes that are multiples of 28 px: H*W/784 tokens); fixture rows are checked against the processor's own
`processor(text=..., images=...)` ids; the three layouts and JSON lines must agree to the token and the decoded
pixel. Bad rows fail before training, one line naming the file, the row and the reason, or are skipped and counted
with data.on_bad_sample=skip. The tokenised cache is reused by a second build, images included.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from transformers import AutoTokenizer
from vision_data import LAYOUTS, SCHEMAS, write_vision_rows
from vision_models import GEMMA_TOKENS, write_vision_model

from sft.config.schema import DataConfig
from sft.data.build import build_dataset
from sft.data.images import ImageRef, load_image
from sft.data.processor import load_processor

TYPES = ("qwen2_5_vl", "qwen3_vl")
N_ROWS = 10
VISION = ("<|vision_start|>", "<|image_pad|>", "<|vision_end|>")


@pytest.fixture(scope="module")
def root(demo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The two model folders and the same N_ROWS chats in every layout (rows/{layout}.parquet)."""
    root = tmp_path_factory.mktemp("vision_data")
    for t in TYPES:
        write_vision_model(demo_dir / "model", root / t, t)
    for layout in LAYOUTS:
        write_vision_rows(root / "rows", N_ROWS, seed=3, layout=layout)
    return root


@pytest.fixture(scope="module")
def procs(root: Path) -> dict:
    return {t: load_processor(str(root / t), AutoTokenizer.from_pretrained(root / t)) for t in TYPES}


def data_cfg(**kw) -> DataConfig:
    kw = {"max_length": 512, "truncation": "error", **kw}
    cfg = DataConfig(train_files="unused", **kw)
    cfg.multiturn.enable = True
    return cfg


def build(path: Path, processor, cfg: DataConfig | None = None, cache_dir: Path | None = None):
    cfg = cfg or data_cfg()
    return build_dataset(str(path), processor.tokenizer, cfg, -1, False, cache_dir=cache_dir, processor=processor)


def solid_png(width: int, height: int, colour: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buf, format="PNG")
    return buf.getvalue()


def noisy_png(width: int, height: int) -> bytes:
    """Incompressible pixels: half of the file is header plus half of the pixel data."""
    buf = io.BytesIO()
    Image.frombytes("RGB", (width, height), os.urandom(width * height * 3)).save(buf, format="PNG")
    return buf.getvalue()


def pixels(image: Image.Image) -> bytes:
    return np.asarray(image.convert("RGB")).tobytes()


# ----- masks of hand-built rows -----
# (width, height, colour, tokens): Qwen's processor keeps a size that is a multiple of 28 px (patch 14, 2x2 merge)
# within [28*28, 112*112] pixels, so an image is (H/14 * W/14) / 4 = H*W/784 tokens.
RED = (56, 28, (220, 30, 30), 2)
BLUE = (28, 84, (40, 70, 220), 3)
GREEN = (84, 56, (30, 170, 60), 6)
YELLOW = (112, 112, (235, 200, 20), 16)
HAND = [
    # Two images in the first user turn, an image inside the second reply (its tokens are not trained).
    (
        [
            {"role": "user", "content": "<image>Compare it with <image>."},
            {"role": "assistant", "content": "The first is red."},
            {"role": "user", "content": "Show me a green one."},
            {"role": "assistant", "content": "<image>Here is a green one."},
        ],
        [RED, BLUE, GREEN],
    ),
    # A system turn and one large image after the question's text.
    (
        [
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": "What is this?<image>"},
            {"role": "assistant", "content": "A square."},
        ],
        [YELLOW],
    ),
    # An assistant turn that is an image only: nothing of it is trained but its <|im_end|>.
    (
        [
            {"role": "user", "content": "Draw a red one."},
            {"role": "assistant", "content": "<image>"},
        ],
        [RED],
    ),
]


def expected_pieces(messages: list[dict], counts: list[int], default_system: bool) -> list[tuple[str, bool]]:
    """(text, trained) pieces of the fixture template's rendering, split at its special tokens, with every
    image expanded: assistant text and its <|im_end|> trained; headers, other turns and vision tokens not."""
    pieces: list[tuple[str, bool]] = []
    if default_system and messages[0]["role"] != "system":
        pieces += [("<|im_start|>", False), ("system\nYou are a helpful assistant.", False)]
        pieces += [("<|im_end|>", False), ("\n", False)]
    images = iter(counts)
    for m in messages:
        trained = m["role"] == "assistant"
        pieces += [("<|im_start|>", False), (m["role"] + "\n", False)]
        for k, text in enumerate(m["content"].split("<image>")):
            if k:
                pieces += [(VISION[0], False), *[(VISION[1], False)] * next(images), (VISION[2], False)]
            if text:
                pieces.append((text, trained))
        pieces += [("<|im_end|>", trained), ("\n", False)]
    return pieces


@pytest.fixture(scope="module")
def hand_rows(root: Path) -> Path:
    rows = [
        {"messages": messages, "images": [{"bytes": solid_png(w, h, c), "path": None} for w, h, c, _ in images]}
        for messages, images in HAND
    ]
    path = root / "hand" / "hand.parquet"
    path.parent.mkdir()
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMAS["verl"]), path)
    return path


HAND_CASES = [(t, i) for t in TYPES for i in range(len(HAND))]


@pytest.mark.parametrize(("model_type", "row"), HAND_CASES)
def test_masks_of_hand_built_rows(procs, hand_rows, model_type, row):
    proc = procs[model_type]
    tok = proc.tokenizer
    messages, images = HAND[row]
    pieces = expected_pieces(messages, [n for *_, n in images], default_system=model_type == "qwen2_5_vl")
    ids, mask = [], []
    for text, trained in pieces:
        piece = tok.encode(text, add_special_tokens=False)
        ids += piece
        mask += [int(trained)] * len(piece)
    ds = build(hand_rows, proc)
    assert len(ds) == len(HAND) and ds.where(row) == f"{hand_rows} row {row}"
    item = ds[row]
    # The processor's grids agree with the counts worked out by hand above, and the images come back whole.
    decoded = [load_image(ref, item["where"]) for ref in item["images"]]
    grids = proc.image_processor(images=decoded, return_tensors="np")["image_grid_thw"]
    assert [int(np.prod(g)) // 4 for g in grids] == [n for *_, n in images]
    assert [(im.size, im.getpixel((0, 0))) for im in decoded] == [((w, h), c) for w, h, c, _ in images]
    assert item["input_ids"].tolist() == ids, tok.decode(item["input_ids"])
    # Never trained, even inside an assistant turn: image tokens and the vision start/end tokens.
    vision = np.isin(item["input_ids"].numpy(), tok.convert_tokens_to_ids(list(VISION)))
    assert vision.any() and not item["loss_mask"].numpy()[vision].any(), "a vision token is trained"
    assert item["loss_mask"].tolist() == mask


@pytest.mark.parametrize("model_type", ["qwen2_5_vl", "qwen3_vl"])
def test_image_in_assistant_turn_is_not_trained(procs, hand_rows, model_type):
    """Row 0's second reply opens with an image: its trained text is the reply's words and <|im_end|> only."""
    proc = procs[model_type]
    item = build(hand_rows, proc)[0]
    ids, mask = item["input_ids"].tolist(), item["loss_mask"].tolist()
    runs, start = [], None
    for t in range(len(ids) + 1):
        if t < len(ids) and mask[t] and start is None:
            start = t
        elif (t == len(ids) or not mask[t]) and start is not None:
            runs.append(proc.tokenizer.decode(ids[start:t]))
            start = None
    assert runs == ["The first is red.<|im_end|>", "Here is a green one.<|im_end|>"]


# ----- Gemma 3: the template writes <start_of_image>, the processor puts its full image text there -----
GEMMA_SPECIAL = ("<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>", "<image_soft_token>")
GEMMA_HAND = [
    # Two images and text in the first user turn, a text-only second exchange.
    (
        [
            {"role": "user", "content": "<image>Compare it with <image>."},
            {"role": "assistant", "content": "The first is red."},
            {"role": "user", "content": "And now?"},
            {"role": "assistant", "content": "Blue."},
        ],
        [RED, BLUE],
    ),
    # A system turn (Gemma folds it into the first user turn) and an image after the question.
    (
        [
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": "What is this?<image>"},
            {"role": "assistant", "content": "A square."},
        ],
        [YELLOW],
    ),
]


def gemma_pieces(messages: list[dict]) -> list[tuple[str, bool]]:
    """(text, trained) pieces of a Gemma 3 rendering with each image as Gemma 3's processor writes it (a blank line,
    <start_of_image>, GEMMA_TOKENS soft tokens, <end_of_image>, a blank line); text parts trimmed, the system text
    opening the first user turn; the replies and their <end_of_turn> trained."""
    image = ["\n\n", "<start_of_image>", *["<image_soft_token>"] * GEMMA_TOKENS, "<end_of_image>", "\n\n"]
    system = ""
    if messages[0]["role"] == "system":
        system, messages = messages[0]["content"] + "\n\n", messages[1:]
    pieces: list[tuple[str, bool]] = []
    for k, m in enumerate(messages):
        trained = m["role"] == "assistant"
        role = "model" if trained else m["role"]
        pieces += [("<start_of_turn>", False), (role + "\n" + (system if k == 0 else ""), False)]
        for j, text in enumerate(m["content"].split("<image>")):
            if j:
                pieces += [(p, False) for p in image]
            if text.strip():
                pieces.append((text.strip(), trained))
        pieces += [("<end_of_turn>", trained), ("\n", False)]
    return pieces


def _tokenize_pieces(tok, pieces: list[tuple[str, bool]]) -> tuple[list[int], list[int]]:
    """Ids and mask: special tokens alone, runs of untrained text between them tokenized together (as the
    tokenizer sees them: the blank lines merge with the text beside them)."""
    merged: list[tuple[str, bool]] = []
    for text, trained in pieces:
        joinable = merged and not trained and not merged[-1][1] and text not in GEMMA_SPECIAL
        if joinable and merged[-1][0] not in GEMMA_SPECIAL:
            merged[-1] = (merged[-1][0] + text, False)
        else:
            merged.append((text, trained))
    ids, mask = [], []
    for text, trained in merged:
        piece = tok.encode(text, add_special_tokens=False)
        ids += piece
        mask += [int(trained)] * len(piece)
    return ids, mask


@pytest.fixture(scope="module")
def gemma(root: Path, demo_dir: Path):
    folder = write_vision_model(demo_dir / "model", root / "gemma3", "gemma3")
    return load_processor(str(folder), AutoTokenizer.from_pretrained(folder))


@pytest.mark.parametrize("row", range(len(GEMMA_HAND)))
def test_gemma3_masks_of_hand_built_rows(gemma, tmp_path, row):
    messages, images = GEMMA_HAND[row]
    path = tmp_path / "gemma.parquet"
    record = {"messages": messages, "images": [{"bytes": solid_png(w, h, c), "path": None} for w, h, c, _ in images]}
    pq.write_table(pa.Table.from_pylist([record], schema=SCHEMAS["verl"]), path)
    ids, mask = _tokenize_pieces(gemma.tokenizer, gemma_pieces(messages))
    item = build(path, gemma)[0]
    assert item["input_ids"].tolist() == ids, gemma.tokenizer.decode(item["input_ids"])
    assert item["loss_mask"].tolist() == mask
    soft = item["input_ids"] == gemma.tokenizer.convert_tokens_to_ids("<image_soft_token>")
    assert int(soft.sum()) == GEMMA_TOKENS * len(images)


def test_gemma3_pan_and_scan_is_refused(gemma, hand_rows):
    gemma.image_processor.do_pan_and_scan = True
    try:
        with pytest.raises(ValueError, match="do_pan_and_scan=true"):
            build(hand_rows, gemma)
    finally:
        gemma.image_processor.do_pan_and_scan = False


# ----- the processor's own ids -----
def _parts_messages(row: dict) -> list[dict]:
    """A parts-layout parquet row's messages as transformers' content lists (parquet's null fields dropped)."""
    return [
        {"role": m["role"], "content": [{k: v for k, v in p.items() if v is not None} for p in m["content"]]}
        for m in row["messages"]
    ]


@pytest.mark.parametrize("model_type", TYPES)
def test_ids_equal_the_processors_own(root, procs, model_type):
    proc = procs[model_type]
    path = root / "rows" / "parts.parquet"
    ds = build(path, proc)
    rows = pq.read_table(path).to_pylist()
    assert len(ds) == len(rows) == N_ROWS
    for i, row in enumerate(rows[:6]):
        assert ds.where(i) == f"{path} row {i}"
        text = proc.apply_chat_template(_parts_messages(row), tokenize=False)
        images = [Image.open(io.BytesIO(im["bytes"])).convert("RGB") for im in row["images"]]
        theirs = proc(text=[text], images=images, return_tensors="np")["input_ids"][0]
        assert ds[i]["input_ids"].tolist() == theirs.tolist(), f"row {i}"
        # The trained text is each reply and its <|im_end|>, nothing else.
        item = ds[i]
        trained = proc.tokenizer.decode(item["input_ids"][item["loss_mask"].bool()])
        replies = [m["content"][0]["text"] + "<|im_end|>" for m in row["messages"] if m["role"] == "assistant"]
        assert trained == "".join(replies)


def test_gemma3_ids_equal_the_processors_own(root, gemma):
    """Gemma 3's processor expands <start_of_image> itself; sft's ids must be its ids, and the trained text the
    replies with their <end_of_turn>."""
    path = root / "rows" / "parts.parquet"
    ds = build(path, gemma)
    for i, row in enumerate(pq.read_table(path).to_pylist()[:6]):
        text = gemma.apply_chat_template(_parts_messages(row), tokenize=False)
        images = [Image.open(io.BytesIO(im["bytes"])).convert("RGB") for im in row["images"]]
        theirs = gemma(text=[text], images=images, return_tensors="np")["input_ids"][0]
        item = ds[i]
        assert item["input_ids"].tolist() == theirs.tolist(), f"row {i}"
        trained = gemma.tokenizer.decode(item["input_ids"][item["loss_mask"].bool()])
        replies = [m["content"][0]["text"] + "<end_of_turn>" for m in row["messages"] if m["role"] == "assistant"]
        assert trained == "".join(replies)


# ----- layouts -----
@pytest.mark.parametrize("model_type", TYPES)
def test_layouts_give_identical_ids_masks_and_pixels(root, procs, model_type):
    folder = root / "rows"
    ds = {layout: build(folder / f"{layout}.parquet", procs[model_type]) for layout in LAYOUTS}
    stored = [[im["bytes"] for im in row["images"]] for row in pq.read_table(folder / "verl.parquet").to_pylist()]
    assert all(len(d) == N_ROWS for d in ds.values())
    for i in range(N_ROWS):
        items = {layout: d[i] for layout, d in ds.items()}
        ref = items["verl"]
        for layout, item in items.items():
            assert item["input_ids"].tolist() == ref["input_ids"].tolist(), f"{layout} row {i}"
            assert item["loss_mask"].tolist() == ref["loss_mask"].tolist(), f"{layout} row {i}"
        # Bytes layouts hand back the stored bytes; the paths layout the files beside the data, with those bytes.
        assert items["verl"]["images"] == items["parts"]["images"] == [ImageRef(b, None) for b in stored[i]]
        paths = [ref.path for ref in items["paths"]["images"]]
        assert all(Path(p).parent == (folder / "images").resolve() for p in paths)
        assert [Path(p).read_bytes() for p in paths] == stored[i]
        decoded = {layout: [pixels(load_image(r, it["where"])) for r in it["images"]] for layout, it in items.items()}
        assert decoded["verl"] == decoded["parts"] == decoded["paths"]
        assert decoded["verl"] == [pixels(Image.open(io.BytesIO(b))) for b in stored[i]]


def test_json_lines_with_relative_paths(root, procs):
    """JSON lines beside the images (messages with <image>, `images` as relative paths) = the paths parquet."""
    proc = procs["qwen3_vl"]
    folder = root / "rows"
    rows = pq.read_table(folder / "paths.parquet").to_pylist()
    path = folder / "paths.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    ds, ref = build(path, proc), build(folder / "paths.parquet", proc)
    assert len(ds) == len(ref) == N_ROWS
    for i in range(N_ROWS):
        got, want = ds[i], ref[i]
        assert ds.where(i) == f"{path} line {i + 1}"
        assert got["input_ids"].tolist() == want["input_ids"].tolist()
        assert got["loss_mask"].tolist() == want["loss_mask"].tolist()
        assert (
            got["images"] == want["images"] == [ImageRef(None, str((folder / p).resolve())) for p in rows[i]["images"]]
        )


def test_json_lines_with_inline_image_parts(root, procs):
    """Content parts carrying their image (a relative path in the part) and an empty `images`: the same tokens as
    the parts parquet, whose parts take the column's images."""
    proc = procs["qwen2_5_vl"]
    folder = root / "rows"
    parts = pq.read_table(folder / "parts.parquet").to_pylist()
    paths = pq.read_table(folder / "paths.parquet").to_pylist()
    lines = []
    for row, with_paths in zip(parts, paths):
        names = iter(with_paths["images"])
        messages = [
            {
                "role": m["role"],
                "content": [
                    {"type": "image", "path": next(names)}
                    if p["type"] == "image"
                    else {"type": "text", "text": p["text"]}
                    for p in m["content"]
                ],
            }
            for m in row["messages"]
        ]
        lines.append(json.dumps({"messages": messages, "images": []}) + "\n")
    path = folder / "inline.jsonl"
    path.write_text("".join(lines))
    ds, ref = build(path, proc), build(folder / "parts.parquet", proc)
    assert len(ds) == len(ref) == N_ROWS
    for i in range(N_ROWS):
        got, want = ds[i], ref[i]
        assert got["input_ids"].tolist() == want["input_ids"].tolist()
        assert got["loss_mask"].tolist() == want["loss_mask"].tolist()
        assert [pixels(load_image(r, "")) for r in got["images"]] == [pixels(load_image(r, "")) for r in want["images"]]


# ----- bad rows: refused before training, or skipped and counted -----
GOOD = {"messages": [{"role": "user", "content": "<image>What?"}, {"role": "assistant", "content": "red"}]}
TRUNCATED = noisy_png(56, 56)[:1200]  # a valid 56x56 header and the first ~1 KB of its ~9 KB of pixel data


def _row(content: str, images: list, reply: str = "red") -> dict:
    return {
        "messages": [{"role": "user", "content": content}, {"role": "assistant", "content": reply}],
        "images": images,
    }


def _bytes(*pngs: bytes) -> list[dict]:
    return [{"bytes": png, "path": None} for png in pngs]


RED_PNG = solid_png(56, 56, (220, 30, 30))
# name -> (layout, bad row, data config keys, the reason the error must give)
BAD = {
    "missing_file": ("paths", _row("<image>What?", ["images/gone.png"]), {}, r"images/gone\.png: file not found"),
    "corrupt_bytes": (
        "verl",
        _row("<image>What?", _bytes(b"\x89PNG but not really")),
        {},
        r"not an image format PIL can read",
    ),
    "more_placeholders": (
        "verl",
        _row("<image><image>What?", _bytes(RED_PNG)),
        {},
        r"2 image placeholder\(s\) .* but 1 image\(s\) in images",
    ),
    "fewer_placeholders": (
        "verl",
        _row("<image>What?", _bytes(RED_PNG, RED_PNG)),
        {},
        r"1 image placeholder\(s\) .* but 2 image\(s\) in images",
    ),
    "video": ("verl", _row("<video>What happens?", []), {}, r"holds <video>; sft trains on images only"),
    "cut_by_max_length": (
        "verl",
        _row("word " * 40 + "<image>What?", _bytes(RED_PNG)),
        {"max_length": 40, "truncation": "right"},
        r"\d+ tokens > data.max_length=40, and truncating would cut its images",
    ),
    "cut_by_max_length_left": (
        "verl",
        _row("<image>What?", _bytes(RED_PNG), reply="red " * 40),
        {"max_length": 40, "truncation": "left"},
        r"\d+ tokens > data.max_length=40, and truncating would cut its images",
    ),
    "image_token_in_text": (
        "verl",
        _row("<image>What is <|image_pad|>?", _bytes(RED_PNG)),
        {},
        r"<\|image_pad\|>",  # the reason names the token written in the text
    ),
    "truncated_png": ("verl", _row("<image>What?", _bytes(TRUNCATED)), {}, r"image file is truncated"),
}
XFAIL: dict[str, str] = {}


def _bad_file(folder: Path, name: str, first: dict | None = None, second: dict | None = None) -> Path:
    """[good, bad, good] rows in the layout of case `name` (or the given rows 0 and 1)."""
    layout, bad, _, _ = BAD[name]
    good = dict(GOOD, images=["images/red.png"] if layout == "paths" else _bytes(RED_PNG))
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "images" / "red.png").write_bytes(RED_PNG)
    path = folder / f"{name}.parquet"
    rows = [first or good, second or bad, good]
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMAS[layout]), path)
    return path


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.xfail(reason=XFAIL[n], strict=True)) if n in XFAIL else n for n in BAD]
)
def test_bad_row_fails_in_one_line_or_is_skipped(procs, tmp_path, name):
    _, _, keys, reason = BAD[name]
    path = _bad_file(tmp_path, name)
    proc = procs["qwen2_5_vl"]
    with pytest.raises(ValueError) as e:
        build(path, proc, data_cfg(**keys))
    message = str(e.value)
    assert "\n" not in message and message.startswith(f"{path} row 1: "), message
    assert re.search(reason, message), message
    ds = build(path, proc, data_cfg(on_bad_sample="skip", **keys))
    assert [ds.where(i) for i in range(len(ds))] == [f"{path} row 0", f"{path} row 2"]
    assert ds.bad_rows.count == 1 and re.search(reason, ds.bad_rows.samples[1]), ds.bad_rows.samples
    for i in range(len(ds)):
        assert [pixels(load_image(r, "")) for r in ds[i]["images"]] == [pixels(Image.open(io.BytesIO(RED_PNG)))]


def test_truncated_png_in_the_first_row_is_refused(procs, tmp_path):
    """The first row's images are decoded (the check against the processor's own ids): a truncated image there
    is refused, and with data.on_bad_sample=skip that row is skipped and counted."""
    bad = BAD["truncated_png"][1]
    path = _bad_file(tmp_path, "truncated_png", first=bad, second=dict(GOOD, images=_bytes(RED_PNG)))
    proc = procs["qwen2_5_vl"]
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))} row 0: .*image file is truncated"):
        build(path, proc)
    ds = build(path, proc, data_cfg(on_bad_sample="skip"))
    assert [ds.where(i) for i in range(len(ds))] == [f"{path} row 1", f"{path} row 2"]
    assert ds.bad_rows.count == 1 and "image file is truncated" in ds.bad_rows.samples[0]


def test_truncation_that_keeps_the_images_is_allowed(procs, tmp_path):
    """data.truncation=right cutting only the text after the image keeps the row, its image whole."""
    proc = procs["qwen2_5_vl"]
    path = tmp_path / "long.parquet"
    pq.write_table(pa.Table.from_pylist([_row("<image>What?", _bytes(RED_PNG), "red " * 40)], SCHEMAS["verl"]), path)
    full = build(path, proc)[0]["input_ids"]
    cut = build(path, proc, data_cfg(max_length=40, truncation="right"))[0]
    assert len(full) > 40 and cut["input_ids"].tolist() == full[:40].tolist()
    image_pad = proc.tokenizer.convert_tokens_to_ids(VISION[1])
    assert int((cut["input_ids"] == image_pad).sum()) == int((full == image_pad).sum()) == 4


# ----- tokenised cache -----
@pytest.mark.parametrize("data", ["parquet", "jsonl"])
def test_second_build_reuses_the_cache(root, procs, tmp_path, caplog, data):
    """Bytes in a parquet file, and relative paths in JSON lines (rows read back by their line)."""
    proc = procs["qwen2_5_vl"]
    path = root / "rows" / "verl.parquet"
    if data == "jsonl":
        rows = pq.read_table(root / "rows" / "paths.parquet").to_pylist()
        path = root / "rows" / "cached.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    ref = build(path, proc)
    caplog.set_level(logging.INFO, logger="sft")
    build(path, proc, cache_dir=tmp_path)
    assert "tokenised cache written" in caplog.text
    caplog.clear()
    warm = build(path, proc, cache_dir=tmp_path)
    assert "tokenised cache reused" in caplog.text and isinstance(warm.input_ids, np.memmap)
    assert not hasattr(warm.source, "tables")  # the data files were not read to tokenize
    assert len(warm) == len(ref) == N_ROWS
    for i in range(N_ROWS):
        got, want = warm[i], ref[i]
        assert got["where"] == want["where"]
        assert got["input_ids"].tolist() == want["input_ids"].tolist()
        assert got["loss_mask"].tolist() == want["loss_mask"].tolist()
        assert got["images"] == want["images"] and got["images"]


def test_cache_follows_the_processors_image_size(root, procs, tmp_path):
    """The user lowers the image size limit in the model folder: the token counts change, so the cache must."""
    folder = tmp_path / "model"
    shutil.copytree(root / "qwen2_5_vl", folder)
    path = root / "rows" / "verl.parquet"
    build(path, procs["qwen2_5_vl"], cache_dir=tmp_path / "cache")
    config = json.loads((folder / "processor_config.json").read_text())
    config["image_processor"]["size"]["longest_edge"] = 56 * 56
    (folder / "processor_config.json").write_text(json.dumps(config))
    smaller = load_processor(str(folder), AutoTokenizer.from_pretrained(folder))
    fresh = build(path, smaller)
    assert fresh.lengths.sum() < build(path, procs["qwen2_5_vl"]).lengths.sum()  # the change matters
    warm = build(path, smaller, cache_dir=tmp_path / "cache")
    assert warm.lengths.tolist() == fresh.lengths.tolist()
