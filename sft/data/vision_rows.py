"""Vision-language rows: messages with images made ready for the model's chat template, and image tokens expanded.

verl's layout writes `<image>` placeholders in string contents, with the row's images in the `data.image_key`
column, in order; the content-list layout (transformers, OpenAI) writes {"type": "image"} parts, which take the
column's images in order, or carry their image inline. Both become content lists of text and image parts plus the
row's images in the order the template renders them. `expand_images` then replaces each image's placeholder token
in the rendered text by as many image tokens as the processor makes of an image of that size (read from its
header), and moves the trained character spans with it.
"""

from __future__ import annotations

import bisect
import json
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from sft.data.files import JSON_SUFFIXES, expand_paths
from sft.data.images import ImageRef, image_refs, image_size, part_ref
from sft.data.messages import _as_json

IMAGE_TAG = "<image>"
VIDEO_TAG = "<video>"
VIDEO_PARTS = ("video", "video_url", "input_video")
Span = tuple[int, int]


def _split_tags(text: str) -> list[dict[str, Any]]:
    """verl's `<image>` placeholders -> text and image parts, in order (empty texts dropped)."""
    out: list[dict[str, Any]] = []
    for k, piece in enumerate(text.split(IMAGE_TAG)):
        if k:
            out.append({"type": "image"})
        if piece:
            out.append({"type": "text", "text": piece})
    return out


def _parts(content: list[Any], where: str, name: str, base_dir: Path) -> tuple[list[dict[str, Any]], list[Any]]:
    """Content parts for the template and, per image part, its inline ImageRef or None (the column's next image)."""
    parts: list[dict[str, Any]] = []
    inline: list[ImageRef | None] = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            parts.append({"type": "text", "text": part["text"]})
        elif kind in ("image", "image_url", "input_image"):
            parts.append({"type": "image"})
            inline.append(part_ref({k: v for k, v in part.items() if v is not None}, where, base_dir))
        elif kind in VIDEO_PARTS:
            raise ValueError(f"{where}: {name}[{j}] is a video; sft trains on images only so far (drop the video)")
        else:
            raise ValueError(
                f"{where}: {name}[{j}] is not a content part sft reads ({part!r:.80}); give "
                '{"type": "text", "text": ...} or {"type": "image"} parts'
            )
    return parts, inline


def vision_messages(
    raw: Any, images: Any, where: str, messages_key: str, image_key: str, base_dir: Path
) -> tuple[list[dict[str, Any]], list[ImageRef]]:
    """A row's messages with image parts for the template, and its images in the order they are rendered.

    The count of placeholders (verl's `<image>` or image parts without an inline image) must equal the count of
    images in `image_key`: a mismatch is refused, naming both counts."""
    raw = _as_json(raw, where, messages_key)
    column = image_refs(images, where, image_key, base_dir)
    if not isinstance(raw, list):
        return raw, column  # clean_messages refuses it with the row's location
    out: list[dict[str, Any]] = []
    order: list[ImageRef | None] = []
    for j, msg in enumerate(raw):
        content = msg.get("content") if isinstance(msg, dict) else None
        name = f"{messages_key}[{j}].content"
        if isinstance(content, str):
            if VIDEO_TAG in content:
                raise ValueError(f"{where}: {name} holds {VIDEO_TAG}; sft trains on images only so far (drop it)")
            if IMAGE_TAG in content:
                msg = dict(msg, content=_split_tags(content))
                order.extend(None for p in msg["content"] if p["type"] == "image")
        elif isinstance(content, list):
            parts, inline = _parts(content, where, name, base_dir)
            msg = dict(msg, content=parts)
            order.extend(inline)
        out.append(msg)
    wanted = sum(ref is None for ref in order)
    if wanted != len(column):
        raise ValueError(
            f"{where}: {wanted} image placeholder(s) ({IMAGE_TAG} or image parts) but {len(column)} image(s) in "
            f"{image_key}; give one image per placeholder"
        )
    it = iter(column)
    return out, [ref if ref is not None else next(it) for ref in order]


def expand_images(
    text: str,
    spans: list[Span],
    refs: list[ImageRef],
    placeholder: str,
    tokens_per_image: Any,
    where: str,
    size_of: Any = image_size,
    expansion: Any = None,
) -> tuple[str, list[Span], list[int]]:
    """Each `placeholder` in `text` (one per image, in order) replaced by `expansion(count)` (default: the
    placeholder repeated as many times as that image's token count); the trained spans moved to the expanded text;
    and the counts.

    `tokens_per_image(height, width) -> int` is the processor's count for an image of that size; `size_of(ref,
    where) -> (width, height)` reads the size (the header; `decoded_size` also checks the pixels decode)."""
    if expansion is None:

        def expansion(n: int) -> str:
            return placeholder * n

    starts = []
    at = text.find(placeholder)
    while at >= 0:
        starts.append(at)
        at = text.find(placeholder, at + len(placeholder))
    if len(starts) != len(refs):
        raise ValueError(
            f"{where}: the chat template rendered {len(starts)} image placeholder(s) for {len(refs)} image(s) (it "
            "drops or repeats images, e.g. in a system message); put the images in user turns"
        )
    counts = []
    for ref in refs:
        width, height = size_of(ref, where)
        counts.append(int(tokens_per_image(height, width)))
    pieces, last = [], 0
    growth = [0]
    for start, n in zip(starts, counts):
        expanded = expansion(n)
        pieces += [text[last:start], expanded]
        last = start + len(placeholder)
        growth.append(growth[-1] + len(expanded) - len(placeholder))
    pieces.append(text[last:])
    # A position p of the rendered text moves by the growth of every placeholder that ends at or before p.
    ends = [s + len(placeholder) for s in starts]

    def moved(p: int) -> int:
        return p + growth[bisect.bisect_right(ends, p)]

    return "".join(pieces), [(moved(a), moved(b)) for a, b in spans], counts


def has_image_column(files: Any, key: str) -> bool:
    """Whether the first data file has the images column `key`: the run is then vision-language SFT. An unreadable
    file says no here: reading the data reports it, with its location."""
    try:
        return _has_column(expand_paths(files)[0], key)
    except (OSError, ValueError):  # pyarrow's errors are ValueErrors and OSErrors; JSONDecodeError too
        return False


def _has_column(first: str, key: str) -> bool:
    if not first.endswith(JSON_SUFFIXES):
        return key in pq.read_schema(first).names
    with open(first, "rb") as f:
        if f.read(1) == b"[":  # one JSON array: its first object (small files only are written this way)
            f.seek(0)
            rows = json.load(f)
            return bool(rows) and isinstance(rows[0], dict) and key in rows[0]
        f.seek(0)
        for line in f:
            if line.strip():
                record = json.loads(line)
                return isinstance(record, dict) and key in record
    return False
