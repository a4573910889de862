"""sft/data/images.py: every accepted image layout, every refusal, and reading sizes without decoding.

Expectations come from what the tests wrote: the bytes of each PNG, the paths they were saved at, the sizes and
colours they were drawn with. A truncated PNG still reports its size (only the header is read) while
load_image refuses it; no file stays open after reading.
"""

from __future__ import annotations

import base64
import io
import os
from pathlib import Path

import pytest
from PIL import Image, ImageFile

from sft.data.images import ImageRef, image_refs, image_size, load_image, part_ref

WHERE = "train.parquet row 7"


def png(width: int, height: int, colour=(200, 40, 10), mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (width, height), colour).save(buf, format="PNG")
    return buf.getvalue()


def noisy_png(width: int, height: int) -> bytes:
    """A PNG whose pixel data is large enough to cut in half after the header."""
    im = Image.frombytes("RGB", (width, height), os.urandom(width * height * 3))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def open_paths() -> set[str]:
    """The files this process has open (Linux)."""
    found = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            found.add(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            continue
    return found


@pytest.fixture
def files(tmp_path: Path) -> dict[str, object]:
    """A data folder with a sub-folder of images: a.png 30x20 red, b.png 12x50 blue."""
    (tmp_path / "img").mkdir()
    a, b = png(30, 20, (255, 0, 0)), png(12, 50, (0, 0, 255))
    (tmp_path / "img" / "a.png").write_bytes(a)
    (tmp_path / "img" / "b.png").write_bytes(b)
    return {"dir": tmp_path, "a": a, "b": b, "a_path": str(tmp_path / "img" / "a.png")}


# ----- accepted layouts -----
def test_empty_values_have_no_images(tmp_path):
    assert image_refs(None, WHERE, "images", tmp_path) == []
    assert image_refs([], WHERE, "images", tmp_path) == []


def test_bytes_and_dict_layouts(files):
    a, b, base = files["a"], files["b"], files["dir"]
    refs = image_refs([a, {"bytes": b, "path": None}, bytearray(a)], WHERE, "images", base)
    assert refs == [ImageRef(a, None), ImageRef(b, None), ImageRef(a, None)]
    # HF datasets keeps the source path next to the bytes: the bytes win, the path is not read.
    assert image_refs([{"bytes": b, "path": "gone/elsewhere.png"}], WHERE, "images", base) == [ImageRef(b, None)]
    assert image_refs({"bytes": a, "path": None}, WHERE, "images", base) == [ImageRef(a, None)]  # one image
    assert image_refs(a, WHERE, "images", base) == [ImageRef(a, None)]
    assert refs[1].describe() == f"bytes in the data file ({len(b)} bytes)"


def test_path_layouts(files):
    base, a_path = files["dir"], files["a_path"]
    b_path = str(base / "img" / "b.png")
    refs = image_refs(
        ["img/a.png", {"bytes": None, "path": "img/b.png"}, a_path, f"file://{b_path}", ("./img/../img/a.png")],
        WHERE,
        "images",
        base,
    )
    assert [r.path for r in refs] == [a_path, b_path, a_path, b_path, a_path]
    assert all(r.data is None for r in refs)
    assert refs[0].describe() == f"path {a_path}"
    assert image_refs(("img/a.png", "img/b.png"), WHERE, "images", base) == [
        ImageRef(None, a_path),
        ImageRef(None, b_path),
    ]


def test_data_url(files):
    a = files["a"]
    url = "data:image/png;base64," + base64.b64encode(a).decode()
    assert image_refs([url], WHERE, "images", files["dir"]) == [ImageRef(a, None)]


def test_content_parts(files):
    a, base, a_path = files["a"], files["dir"], files["a_path"]
    url = "data:image/png;base64," + base64.b64encode(a).decode()
    # A bare image part (parquet fills the absent keys with None) takes the row's next image from `images`.
    assert part_ref({"type": "image"}, WHERE, base) is None
    assert part_ref({"type": "image", "image": None, "path": None, "url": None, "text": None}, WHERE, base) is None
    cases = [
        ({"type": "image", "image": a}, ImageRef(a, None)),
        ({"type": "image", "image": {"bytes": a, "path": None}}, ImageRef(a, None)),
        ({"type": "image", "image": "img/a.png"}, ImageRef(None, a_path)),
        ({"type": "image", "path": "img/a.png", "text": None}, ImageRef(None, a_path)),
        ({"type": "image", "url": f"file://{a_path}"}, ImageRef(None, a_path)),
        ({"type": "image", "url": url}, ImageRef(a, None)),
        ({"type": "image_url", "image_url": {"url": url}}, ImageRef(a, None)),
        ({"type": "image_url", "image_url": {"url": "img/a.png"}}, ImageRef(None, a_path)),
    ]
    for part, expected in cases:
        assert part_ref(part, WHERE, base) == expected, part


# ----- refusals -----
@pytest.mark.parametrize("url", ["http://example.com/a.png", "https://example.com/a.png", "s3://bucket/a.png"])
def test_network_urls_are_refused(tmp_path, url):
    with pytest.raises(ValueError, match=r"^train.parquet row 7: images\[1\]: .*sft reads no network") as e:
        image_refs([png(4, 4), url], WHERE, "images", tmp_path)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="sft reads no network"):
        part_ref({"type": "image_url", "image_url": {"url": url}}, WHERE, tmp_path)
    with pytest.raises(ValueError, match="sft reads no network"):
        part_ref({"type": "image", "url": url}, WHERE, tmp_path)


@pytest.mark.parametrize(
    "value, index, message",
    [
        ([png(4, 4), 12], 1, "type int is not an image"),
        ([[png(4, 4)]], 0, "type list is not an image"),
        ([{"bytes": None, "path": None}], 0, "neither 'bytes' nor 'path'"),
        ([b""], 0, "empty image bytes"),
        ([""], 0, "empty image path"),
        (["data:image/png;base64,@@not base64@@"], 0, "not valid base64"),
        (["data:image/png;base64"], 0, "no ','"),
    ],
)
def test_bad_values_are_refused(tmp_path, value, index, message):
    with pytest.raises(ValueError, match=rf"^{WHERE}: images\[{index}\]") as e:
        image_refs(value, WHERE, "images", tmp_path)
    assert message in str(e.value) and "fix" in str(e.value) and "\n" not in str(e.value)


def test_bad_parts_are_refused(tmp_path):
    with pytest.raises(ValueError, match="image_url part has no url"):
        part_ref({"type": "image_url", "image_url": {"url": None}}, WHERE, tmp_path)
    with pytest.raises(ValueError, match="'text' is not an image part"):
        part_ref({"type": "text", "text": "hi"}, WHERE, tmp_path)
    with pytest.raises(ValueError, match="type int is not an image"):
        part_ref({"type": "image", "image": 3}, WHERE, tmp_path)


def test_missing_file(tmp_path):
    ref = image_refs(["img/none.png"], WHERE, "images", tmp_path)[0]
    for read in (image_size, load_image):
        with pytest.raises(ValueError, match=rf"^{WHERE}: image path {tmp_path}/img/none.png: file not found") as e:
            read(ref, WHERE)
        assert "\n" not in str(e.value)


def test_corrupt_bytes(tmp_path):
    ref = ImageRef(b"this is not an image at all", None)
    for read in (image_size, load_image):
        with pytest.raises(ValueError, match=r"bytes in the data file \(27 bytes\): not an image format"):
            read(ref, WHERE)


def test_truncated_png_reports_its_size_but_does_not_load(tmp_path):
    data = noisy_png(64, 48)
    cut = data[: len(data) // 2]
    (tmp_path / "cut.png").write_bytes(cut)
    for ref in (ImageRef(cut, None), ImageRef(None, str(tmp_path / "cut.png"))):
        assert image_size(ref, WHERE) == (64, 48)  # the header is intact; the pixels are not read
        with pytest.raises(ValueError, match=rf"^{WHERE}: image .*truncated") as e:
            load_image(ref, WHERE)
        assert "\n" not in str(e.value)


def test_image_size_never_decodes(files, monkeypatch):
    def no_decoding(self):
        raise AssertionError("image_size decoded the pixels")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    assert image_size(ImageRef(files["b"], None), WHERE) == (12, 50)
    assert image_size(ImageRef(None, files["a_path"]), WHERE) == (30, 20)


def test_decompression_bomb_is_refused(monkeypatch):
    data = png(40, 40)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # PIL refuses past twice the limit: 1600 > 200
    with pytest.raises(ValueError, match=rf"^{WHERE}: image bytes .*decompression bomb.*MAX_IMAGE_PIXELS") as e:
        load_image(ImageRef(data, None), WHERE)
    assert "\n" not in str(e.value)


# ----- reading -----
def test_load_image_decodes_to_rgb(files, tmp_path):
    im = load_image(ImageRef(files["b"], None), WHERE)
    assert (im.mode, im.size, im.getpixel((5, 30))) == ("RGB", (12, 50), (0, 0, 255))
    for mode, colour, rgb in [("RGBA", (10, 200, 30, 128), (10, 200, 30)), ("L", 77, (77, 77, 77))]:
        im = load_image(ImageRef(png(9, 7, colour, mode), None), WHERE)
        assert (im.mode, im.size, im.getpixel((3, 3))) == ("RGB", (9, 7), rgb)


def test_no_file_stays_open(files):
    path = files["a_path"]
    ref = ImageRef(None, path)
    assert image_size(ref, WHERE) == (30, 20)
    im = load_image(ref, WHERE)
    assert path not in open_paths()
    assert (im.size, im.getpixel((0, 0))) == ((30, 20), (255, 0, 0))  # the pixels live on without the file
    with pytest.raises(ValueError):
        load_image(ImageRef(None, str(Path(path).with_name("nothing.png"))), WHERE)
    cut = Path(path).with_name("cut.png")
    cut.write_bytes(noisy_png(32, 32)[:200])
    with pytest.raises(ValueError):
        load_image(ImageRef(None, str(cut)), WHERE)
    assert str(cut) not in open_paths()


def test_exif_orientation_is_applied_to_size_and_pixels(tmp_path):
    """A JPEG stored 40x20 with EXIF orientation 6 (a quarter turn) is a 20x40 image upright: the header size used
    for the token count and the decoded image agree, as Hugging Face datasets decode it."""
    import io

    from PIL import Image

    from sft.data.images import ImageRef, decoded_size, image_size, load_image

    img = Image.new("RGB", (40, 20), (200, 10, 10))
    img.paste((10, 10, 200), (0, 0, 10, 20))  # a blue left edge: after the turn it is the top edge
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    img.save(buf, "JPEG", exif=exif, quality=95)
    ref = ImageRef(data=buf.getvalue(), path=None)
    assert image_size(ref, "row") == decoded_size(ref, "row") == (20, 40)
    upright = load_image(ref, "row")
    assert upright.size == (20, 40)
    r, g, b = upright.getpixel((10, 2))  # top edge: blue
    assert b > 150 and r < 80
