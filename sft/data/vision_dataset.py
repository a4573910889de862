"""`VisionSFTDataset`: multi-turn chats with images, rendered by the model's own template and processor.

Rows are read as by `MultiTurnSFTDataset` (same masks: the assistant turns and their end-of-turn token), with
image parts (sft/data/vision_rows.py). Each image's placeholder is expanded to the processor's token count for
its size, read from the image header only, so tokenizing never decodes an image; image and vision-special tokens
are never trained. The store keeps ids and masks; a sample's images are read back from its row
(sft/data/row_reader.py) when the loader builds its micro-batch. The first row each process encodes is
checked against the processor's own ids for the decoded images.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from sft.data.images import ImageRef, decoded_size, load_image
from sft.data.messages import clean_messages
from sft.data.multiturn import MultiTurnSFTDataset, text_of
from sft.data.row_reader import RowReader
from sft.data.scan import scan_messages
from sft.data.storage import Encoded
from sft.data.vision_rows import expand_images, vision_messages

# Processor attributes naming the tokens of images and videos: never trained.
VISION_TOKENS = ("image_token", "video_token", "vision_start_token", "vision_end_token", "boi_token", "eoi_token")
# Unusual text around a probe image, so the template's own tokens around an image can be found between them.
_BEFORE, _AFTER = "\u27e6sft-before\u27e7", "\u27e6sft-after\u27e7"


def vision_token_ids(processor: Any) -> list[int]:
    """Ids never trained: the processor's image/video tokens, and the special tokens the chat template writes
    around an image (e.g. <|vision_start|> / <|vision_end|>, which Qwen2.5-VL's processor does not name)."""
    tok = processor.tokenizer
    ids = {
        tok.convert_tokens_to_ids(t) for name in VISION_TOKENS if isinstance(t := getattr(processor, name, None), str)
    }
    probe = [
        {
            "role": "user",
            "content": [{"type": "text", "text": _BEFORE}, {"type": "image"}, {"type": "text", "text": _AFTER}],
        }
    ]
    try:
        text = tok.apply_chat_template(probe, tokenize=False)
    except Exception:  # a template that refuses a lone user turn: the processor's names only
        text = ""
    lo, hi = text.find(_BEFORE), text.find(_AFTER)
    if 0 <= lo < hi:
        special = set(tok.all_special_ids) | {i for i, t in tok.added_tokens_decoder.items() if t.special}
        inside = tok(text[lo + len(_BEFORE) : hi], add_special_tokens=False)["input_ids"]
        ids |= {i for i in inside if i in special}
    return sorted(i for i in ids if i is not None and i != tok.unk_token_id)


def image_text(processor: Any) -> tuple[str, Any, str]:
    """(what the chat template writes for an image, the text the processor puts there for an image of n tokens,
    the token repeated once per image feature), from the processor itself.

    Qwen-VL: the template writes the image token, repeated n times. Gemma 3: the template writes <start_of_image>,
    which the processor replaces by its `full_image_sequence` (blank lines, <start_of_image>, n soft tokens,
    <end_of_image>); pan-and-scan crops would add images the header cannot count, so they are refused. Gemma 4: the
    template writes the image token, which the processor wraps in its begin/end-of-image tokens. Whatever the rule,
    the first row of each process is checked against the processor's own ids."""
    full = getattr(processor, "full_image_sequence", None)
    if isinstance(full, str):
        if getattr(processor.image_processor, "do_pan_and_scan", False):
            raise ValueError(
                f"{type(processor).__name__}: do_pan_and_scan=true crops each image into a variable number of "
                "images, which sft does not train; set do_pan_and_scan to false in the processor files"
            )
        soft = processor.tokenizer.image_token
        per_image = full.count(soft)

        def gemma(n: int) -> str:
            assert n == per_image, f"{n} tokens for an image, the processor writes {per_image}"
            return full

        return processor.boi_token, gemma, soft
    token = processor.image_token
    boi, eoi = getattr(processor, "boi_token", None), getattr(processor, "eoi_token", None)
    if isinstance(boi, str) and isinstance(eoi, str):
        return token, lambda n: boi + token * n + eoi, token
    return token, lambda n: token * n, token


def image_token_count(processor: Any, height: int, width: int) -> int:
    """Tokens the processor makes of one image of this size (its own count, as inference servers use it)."""
    data = processor._get_num_multimodal_tokens(image_sizes=[[height, width]])
    counts = data["num_image_tokens"] if isinstance(data, dict) else data.num_image_tokens
    return int(counts[0])


class VisionSFTDataset(MultiTurnSFTDataset):
    """Multi-turn SFT with images (`data.image_key`); items add `images`, the sample's ImageRefs in order."""

    def __init__(self, *args: Any, processor: Any, **kwargs: Any) -> None:
        self.processor = processor
        self.checked = False
        self.reader: RowReader | None = None
        super().__init__(*args, **kwargs)

    def _prepare(self) -> None:
        super()._prepare()
        if not isinstance(getattr(self.processor, "image_token", None), str):
            raise ValueError(
                f"processor {type(self.processor).__name__} names no image token; sft cannot place images for it"
            )
        self.placeholder, self.expansion, self.soft_token = image_text(self.processor)
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(self.soft_token)
        never = {*vision_token_ids(self.processor), self.image_token_id}
        self.never_trained = np.asarray(sorted(never), dtype=np.int32)
        self.num_images = 0

    def _columns(self) -> tuple[dict[str, str], list[str]]:
        required, optional = super()._columns()
        # Images optional per file: a validation file of text-only chats has no images column.
        return required, [*optional, self.config.image_key, self.config.video_key]

    def _fingerprint_extra(self) -> dict[str, Any]:
        # The image processor's settings set each image's token count (min/max pixels, patch and merge sizes).
        return {"image_processor": self.processor.image_processor.to_dict()}

    def _binary_columns(self) -> list[str]:
        return [self.config.image_key, self.config.video_key]

    def _check_table(self, table: Any, path: str, checks: Any) -> None:
        key = self.config.multiturn.messages_key
        t = table.column(key).type
        if pa.types.is_list(t) and pa.types.is_struct(t.value_type):
            content = t.value_type.field("content").type if "content" in [f.name for f in t.value_type] else None
            if content is not None and pa.types.is_list(content):
                return  # content parts: checked row by row while tokenizing
        scan_messages(table, path, checks, key)

    def _base_dir(self, where_row: int) -> Path:
        path, _ = self.source.origin(where_row)
        return RowReader.folder(path)

    def _conversation(
        self, k: int, columns: dict[str, list[Any]], where: str
    ) -> tuple[list[dict[str, Any]], list[int | None]]:
        mt, key = self.config.multiturn, self.config.image_key
        videos = columns.get(self.config.video_key, [None] * (k + 1))[k]
        if videos is not None and len(videos):
            raise ValueError(
                f"{where}: {self.config.video_key} holds {len(videos)} video(s); sft trains on images only so far "
                "(drop the videos, or the row)"
            )
        row = self._rows_now[k]
        images = columns[key][k] if key in columns else None
        raw, refs = vision_messages(
            columns[mt.messages_key][k], images, where, mt.messages_key, key, self._base_dir(row)
        )
        self._refs_now[k] = refs
        messages, overrides = clean_messages(raw, where, mt.messages_key, parts=True)
        for j, m in enumerate(messages):
            text = text_of(m.get("content"))
            for token in dict.fromkeys((self.placeholder, self.soft_token)):
                if token in text:
                    raise ValueError(
                        f"{where}: {mt.messages_key}[{j}] holds the image token {token!r} as text; remove it "
                        f"(images go in {key}, each marked by <image> or an image part)"
                    )
        return messages, overrides

    def _encode_batch(self, rows: Sequence[int], columns: dict[str, list[Any]]) -> list[Encoded]:
        # What the hooks below pass between them for the rows of this batch (by position k).
        self._rows_now, self._refs_now, self._counts_now, self._texts_now = list(rows), {}, {}, {}
        return super()._encode_batch(rows, columns)

    def _rendered(self, k: int, text: str, spans: list[tuple[int, int]], where: str) -> tuple[str, list]:
        self._texts_now[k] = text  # as rendered: what the processor's own check expands
        expanded, spans, counts = expand_images(
            text,
            spans,
            self._refs_now[k],
            self.placeholder,
            lambda h, w: image_token_count(self.processor, h, w),
            where,
            size_of=decoded_size,  # every image decodes here, so a broken one is this row's error (or skip)
            expansion=self.expansion,
        )
        self._counts_now[k] = counts
        return expanded, spans

    def _encoded(self, k: int, ids: np.ndarray, mask: np.ndarray, where: str) -> Encoded:
        expected = sum(self._counts_now[k])
        found = int((ids == self.image_token_id).sum())
        if found != expected:
            raise ValueError(
                f"{where}: {found} image tokens after tokenizing, {expected} expected (an image token written in a "
                "message's text?); remove image tokens from the text"
            )
        mask = mask.copy()
        mask[np.isin(ids, self.never_trained)] = 0  # image and vision-special tokens are inputs, never targets
        self.num_images += len(self._counts_now[k])
        if not self.checked:
            self._check_with_processor(self._texts_now[k], self._refs_now[k], ids, where)
        return ids, mask

    def _fit(self, row: int, ids: np.ndarray, mask: np.ndarray) -> Encoded:
        cut = ids[: -self.max_length] if self.truncation == "left" else ids[self.max_length :]
        if len(ids) > self.max_length and self.truncation != "error" and (cut == self.image_token_id).any():
            raise ValueError(
                f"{self.source.where(row)}: {len(ids)} tokens > data.max_length={self.max_length}, and truncating "
                "would cut its images; raise data.max_length or use smaller images"
            )
        return super()._fit(row, ids, mask)

    def _check_with_processor(self, rendered: str, refs: list[ImageRef], ids: np.ndarray, where: str) -> None:
        """The processor's own ids for the decoded images must be sft's (once per process: it decodes images)."""
        if not refs:
            return
        images = [load_image(r, where) for r in refs]  # a broken image refuses this row; the next row is checked
        self.checked = True
        theirs = self.processor(text=[rendered], images=images, return_tensors="np")["input_ids"][0]
        if theirs.shape != ids.shape or (theirs != ids).any():
            raise ValueError(
                f"{where}: {type(self.processor).__name__} expands this row's images to {len(theirs)} tokens where "
                f"sft counted {len(ids)} from the image headers; sft cannot train this processor (report it)"
            )

    def images(self, index: int) -> list[ImageRef]:
        """The images of sample `index`, in order, read back from its row."""
        if self.reader is None:
            mt = self.config.multiturn
            self.reader = RowReader(self.source, [mt.messages_key, self.config.image_key])
        row = int(self.rows[index])
        record = self.reader.row(row)
        mt, key, where = self.config.multiturn, self.config.image_key, self.source.where(row)
        _, refs = vision_messages(
            record[mt.messages_key], record[key], where, mt.messages_key, key, self._base_dir(row)
        )
        return refs

    def __getitem__(self, index: int) -> dict[str, Any]:
        item: dict[str, Any] = super().__getitem__(index)
        if index < 0:
            index += len(self)
        item["images"] = self.images(index)
        item["where"] = self.where(index)
        return item


def image_inputs(processor: Any, refs: list[ImageRef], wheres: list[str]) -> dict[str, torch.Tensor]:
    """Decoded and preprocessed images of a micro-batch, in order: the processor's pixel values and grids."""
    images = [load_image(r, w) for r, w in zip(refs, wheres)]
    out = processor.image_processor(images=images, return_tensors="pt")
    return dict(out)
