"""Synthetic image chats written as parquet, in the layouts vision SFT reads.

Each row shows 1-3 PNG images (random sizes 20..120 px, one coloured shape on a light background) over one or two
user turns; each assistant reply names the colours of that turn's shapes, so a model can learn it. Layouts: "verl"
(string contents with one `<image>` per image, `images` = [{"bytes", "path": None}]), "parts" (content lists with
{"type": "image"} parts, same `images`), "paths" (verl strings, PNG files beside the parquet, relative paths).
"""

from __future__ import annotations

import io
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

LAYOUTS = ("verl", "parts", "paths")
COLOURS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (40, 70, 220), "yellow": (235, 200, 20)}
SHAPES = ("square", "circle")
IMAGE_DIR = "images"
PLACEHOLDER = "<image>"

# HF datasets' Image feature stores {bytes, path}; the path stays a (null) string column, as there.
_IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
_PART = pa.struct([("type", pa.string()), ("text", pa.string())])


def _schema(content: pa.DataType, image: pa.DataType) -> pa.Schema:
    message = pa.struct([("role", pa.string()), ("content", content)])
    return pa.schema([("messages", pa.list_(message)), ("images", pa.list_(image))])


SCHEMAS = {
    "verl": _schema(pa.string(), _IMAGE),
    "parts": _schema(pa.list_(_PART), _IMAGE),
    "paths": _schema(pa.string(), pa.string()),
}


def shape_png(rng: random.Random) -> tuple[bytes, str, tuple[int, int]]:
    """(PNG bytes, colour name, (width, height)) of one random shape picture."""
    width, height = rng.randint(20, 120), rng.randint(20, 120)
    colour = rng.choice(sorted(COLOURS))
    im = Image.new("RGB", (width, height), (245, 245, 240))
    box = (width // 5, height // 5, width - width // 5, height - height // 5)
    draw = ImageDraw.Draw(im)
    if rng.choice(SHAPES) == "circle":
        draw.ellipse(box, fill=COLOURS[colour])
    else:
        draw.rectangle(box, fill=COLOURS[colour])
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue(), colour, (width, height)


def _question(n: int) -> str:
    return "What colour is the shape?" if n == 1 else "What colours are the shapes?"


def _row(rng: random.Random) -> tuple[list[tuple[str, int, str]], list[bytes]]:
    """[(user question, images in that turn, reply)] and the row's PNGs, in order of appearance."""
    pictures = [shape_png(rng) for _ in range(rng.randint(1, 3))]
    # Two user turns split the images for some rows: images then follow the turns they appear in.
    split = rng.randint(1, len(pictures) - 1) if len(pictures) > 1 and rng.random() < 0.5 else len(pictures)
    turns = []
    for group in (pictures[:split], pictures[split:]):
        if group:
            turns.append((_question(len(group)), len(group), ", ".join(colour for _, colour, _ in group)))
    return turns, [png for png, _, _ in pictures]


def _messages(turns: list[tuple[str, int, str]], parts: bool) -> list[dict]:
    messages = []
    for question, n_images, reply in turns:
        if parts:
            user = [{"type": "image", "text": None}] * n_images + [{"type": "text", "text": question}]
            messages += [
                {"role": "user", "content": user},
                {"role": "assistant", "content": [{"type": "text", "text": reply}]},
            ]
        else:
            messages += [
                {"role": "user", "content": PLACEHOLDER * n_images + question},
                {"role": "assistant", "content": reply},
            ]
    return messages


def write_vision_rows(folder: Path, n: int, seed: int, layout: str) -> Path:
    """`folder/{layout}.parquet` with `n` image chats (seeded); PNG files under `folder/images/` for "paths"."""
    if layout not in LAYOUTS:
        raise ValueError(f"write_vision_rows: layout {layout!r} is not one of {LAYOUTS}")
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        turns, pngs = _row(rng)
        if layout == "paths":
            (folder / IMAGE_DIR).mkdir(exist_ok=True)
            images = []
            for k, png in enumerate(pngs):
                name = f"{IMAGE_DIR}/{seed}_{i}_{k}.png"
                (folder / name).write_bytes(png)
                images.append(name)
        else:
            images = [{"bytes": png, "path": None} for png in pngs]
        rows.append({"messages": _messages(turns, parts=layout == "parts"), "images": images})
    path = folder / f"{layout}.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMAS[layout]), path)
    return path
