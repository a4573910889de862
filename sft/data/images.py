"""Where the images of a data row are, and how to read them.

`image_refs` reads a row's images column (verl's `images`, HF datasets' Image layout) and `part_ref` one image part of
a content list (transformers / OpenAI layout) into `ImageRef`s: encoded bytes stored in the data file, or a local
path. `image_size` reads only an image's header, so start-up never decodes a dataset; `load_image` decodes to RGB.
Every failure is a one-line ValueError naming the row, the image and the fix. sft reads no network.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote_to_bytes

from PIL import Image, ImageOps, UnidentifiedImageError

FILE_SCHEME = "file://"
# Any other `scheme://` (http, https, s3, gs, ...) would need the network or credentials.
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
# What PIL raises on bad input: missing or unreadable files and unknown formats (OSError), broken headers or data
# in some plugins, and its guard against images too large to decode.
_DECODE_ERRORS = (
    OSError,
    ValueError,
    SyntaxError,
    EOFError,
    struct.error,
    zlib.error,
    Image.DecompressionBombError,
)
_FIX_VALUE = 'store encoded image bytes, a local path, or {"bytes": ..., "path": ...} per image'


@dataclass(frozen=True)
class ImageRef:
    """One image: encoded bytes from the data file, or an absolute path (exactly one is set)."""

    data: bytes | None
    path: str | None

    def __post_init__(self) -> None:
        assert (self.data is None) != (self.path is None), "an ImageRef holds bytes or a path, not both"

    def describe(self) -> str:
        if self.path is not None:
            return f"path {self.path}"
        return f"bytes in the data file ({len(self.data)} bytes)"


def _data_url(url: str, where: str) -> ImageRef:
    """`data:[<mime>][;base64],<payload>` -> the bytes it carries."""
    header, comma, payload = url[len("data:") :].partition(",")
    if not comma:
        raise ValueError(f"{where}: data URL has no ',' before its payload; fix: write data:image/png;base64,<data>")
    if header.endswith(";base64"):
        try:
            data = base64.b64decode(payload, validate=True)
        except binascii.Error as e:
            raise ValueError(f"{where}: data URL is not valid base64 ({e}); fix: re-encode the image") from e
    else:
        data = unquote_to_bytes(payload)
    if not data:
        raise ValueError(f"{where}: data URL carries no bytes; fix: store the encoded image")
    return ImageRef(data=data, path=None)


def _string_ref(text: str, where: str, base_dir: Path) -> ImageRef:
    """A path (relative to the data file's folder, absolute, or file://) or a data URL."""
    if text.startswith("data:"):
        return _data_url(text, where)
    if text.startswith(FILE_SCHEME):
        text = text[len(FILE_SCHEME) :]
    elif _URL.match(text):
        raise ValueError(
            f"{where}: {text[:80]!r} is a URL and sft reads no network; fix: download the images and store paths or bytes"
        )
    if not text:
        raise ValueError(f"{where}: empty image path; fix: {_FIX_VALUE}")
    # Relative paths follow the data file, so a dataset folder can move as a whole.
    return ImageRef(data=None, path=str((base_dir / text).resolve()))


def _one_ref(value: Any, where: str, base_dir: Path) -> ImageRef:
    if isinstance(value, (bytes, bytearray, memoryview)):
        if not len(value):
            raise ValueError(f"{where}: empty image bytes; fix: {_FIX_VALUE}")
        return ImageRef(data=bytes(value), path=None)
    if isinstance(value, str):
        return _string_ref(value, where, base_dir)
    if isinstance(value, dict):
        # HF datasets' Image feature: the stored bytes win; the path is only the file they came from.
        if value.get("bytes") is not None:
            return _one_ref(value["bytes"], f"{where}.bytes", base_dir)
        if value.get("path") is not None:
            return _one_ref(value["path"], f"{where}.path", base_dir)
        raise ValueError(f"{where}: image dict has neither 'bytes' nor 'path' set; fix: {_FIX_VALUE}")
    raise ValueError(f"{where}: a value of type {type(value).__name__} is not an image; fix: {_FIX_VALUE}")


def image_refs(value: Any, where: str, key: str, base_dir: Path) -> list[ImageRef]:
    """The images of one row's `key` column, in order: a list of images, one image, or None / [] for none."""
    if value is None:
        return []
    if hasattr(value, "tolist") and not isinstance(value, (bytes, bytearray, memoryview)):
        value = value.tolist()  # numpy arrays, as pandas hands out list columns
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    return [_one_ref(item, f"{where}: {key}[{k}]", base_dir) for k, item in enumerate(items)]


def part_ref(part: dict, where: str, base_dir: Path) -> ImageRef | None:
    """The image of one image content part; None for a bare {"type": "image"}, which takes the row's next image."""
    kind = part.get("type")
    if kind == "image":
        # transformers' layout puts the image under `image`, `path` or `url`; parquet fills absent keys with None.
        for key in ("image", "path", "url"):
            if part.get(key) is not None:
                return _one_ref(part[key], f"{where}: image part '{key}'", base_dir)
        return None
    if kind == "image_url":
        url = part.get("image_url")
        if isinstance(url, dict):
            url = url.get("url")
        if not isinstance(url, str):
            raise ValueError(
                f'{where}: image_url part has no url string; fix: write {{"type": "image_url", "image_url": {{"url": ...}}}}'
            )
        return _string_ref(url, f"{where}: image_url", base_dir)
    raise ValueError(f"{where}: part of type {kind!r} is not an image part; fix: use type 'image' or 'image_url'")


def _reason(error: BaseException) -> str:
    if isinstance(error, FileNotFoundError):
        return "file not found (relative paths are relative to the data file's folder)"
    if isinstance(error, UnidentifiedImageError):
        return "not an image format PIL can read"
    if isinstance(error, Image.DecompressionBombError):
        return f"{error} (raise PIL.Image.MAX_IMAGE_PIXELS if the image is trusted)"
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def _open(ref: ImageRef) -> Image.Image:
    return Image.open(io.BytesIO(ref.data) if ref.data is not None else ref.path)


# EXIF orientations that turn the stored image a quarter turn: its upright width and height are swapped.
_QUARTER_TURNS = (5, 6, 7, 8)
_ORIENTATION = 0x0112


# Formats whose EXIF sits before the pixel data (a PNG's may follow it: reading it would decode the image).
_HEADER_EXIF = ("JPEG", "MPO", "TIFF", "WEBP")


def _orientation(im: Image.Image) -> int | None:
    return im.getexif().get(_ORIENTATION) if im.format in _HEADER_EXIF else None


def _upright_size(im: Image.Image) -> tuple[int, int]:
    w, h = im.size
    return (h, w) if _orientation(im) in _QUARTER_TURNS else (w, h)


def image_size(ref: ImageRef, where: str) -> tuple[int, int]:
    """(width, height) of the upright image (EXIF orientation applied, as `load_image` does) from the header; the
    pixel data is neither read nor decoded."""
    try:
        with _open(ref) as im:  # Image.open parses the header only; pixels wait for load()
            return _upright_size(im)
    except _DECODE_ERRORS as e:
        raise ValueError(f"{where}: image {ref.describe()}: {_reason(e)}; fix or drop the image") from e


def decoded_size(ref: ImageRef, where: str) -> tuple[int, int]:
    """`image_size`, for an image whose pixel data decodes to the end: a truncated or corrupt body is refused here,
    while tokenizing (where a row can be skipped), not later in the loader. A JPEG decodes at 1/8 scale (PIL's
    draft mode reads every block all the same), so the check costs a fraction of a full decode."""
    try:
        with _open(ref) as im:
            size = _upright_size(im)
            im.draft(im.mode, (max(1, im.size[0] // 8), max(1, im.size[1] // 8)))  # JPEG only; others ignore it
            im.load()
            return size
    except _DECODE_ERRORS as e:
        raise ValueError(f"{where}: image {ref.describe()}: {_reason(e)}; fix or drop the image") from e


def load_image(ref: ImageRef, where: str) -> Image.Image:
    """The fully decoded image in RGB, upright (the EXIF orientation of JPEG, TIFF and WebP files applied, as Hugging
    Face datasets decode images); the file is closed before this returns."""
    try:
        with _open(ref) as im:
            turned = _orientation(im) not in (None, 1)
            im.load()  # decode here, so a truncated or corrupt image fails inside this try
            upright = ImageOps.exif_transpose(im) if turned else im  # the same rule as `image_size`
            return upright.convert("RGB") if upright.mode != "RGB" or upright is im else upright
    except _DECODE_ERRORS as e:
        raise ValueError(f"{where}: image {ref.describe()}: {_reason(e)}; fix or drop the image") from e
