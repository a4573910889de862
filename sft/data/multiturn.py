"""`MultiTurnSFTDataset`: whole conversations through the tokenizer's chat template.

Each row's messages (plus optional tools and enable_thinking columns) are rendered to text
once and tokenized once, so the ids are exactly `apply_chat_template(tokenize=True)`'s.
The trained tokens are those starting inside the character spans of `sft.data.spans`:
assistant turns (all, or the last with `data.multiturn.train_on=last`) with their
end-of-turn token, changed by per-message `loss_mask`; every row passes the mask audit
(`sft.data.audit`) or is refused.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from sft.config.errors import either
from sft.config.schema import TRAIN_ON
from sft.data.audit import audit_spans
from sft.data.messages import ChatRenderer, check_chat_template, clean_messages, parse_tools
from sft.data.regions import common_prefix, message_windows, sentinel_for
from sft.data.scan import scan_messages
from sft.data.spans import Markers, merge, token_mask, trained_spans
from sft.data.storage import Encoded, TokenizedDataset
from sft.data.turns import TurnFinder

logger = logging.getLogger("sft")


class MultiTurnSFTDataset(TokenizedDataset):
    """Multi-turn chat SFT (`data.multiturn.enable=true`); see `TokenizedDataset` for the items."""

    def _prepare(self) -> None:
        check_chat_template(self.tokenizer)
        if self.config.multiturn.train_on not in TRAIN_ON:
            raise ValueError(f"data.multiturn.train_on={self.config.multiturn.train_on!r}: choose {either(TRAIN_ON)}")
        if not getattr(self.tokenizer, "is_fast", False):
            raise ValueError(
                f"tokenizer {self.tokenizer.name_or_path!r} is a slow (Python) tokenizer; multi-turn masks need "
                "character offsets: provide a tokenizer.json (fast tokenizer) in model.partial_pretrain"
            )
        self.markers = Markers(self.tokenizer)
        self.turns = TurnFinder(self.tokenizer, self.markers)
        self.num_misaligned = 0
        self.num_control_text = 0

    def _columns(self) -> tuple[dict[str, str], list[str]]:
        mt = self.config.multiturn
        return {mt.messages_key: "data.multiturn.messages_key"}, [mt.tools_key, mt.enable_thinking_key]

    def _check_table(self, table: Any, path: str, checks: Any) -> None:
        scan_messages(table, path, checks, self.config.multiturn.messages_key)

    def _encode_batch(self, rows: Sequence[int], columns: dict[str, list[Any]]) -> list[Encoded]:
        mt = self.config.multiturn
        texts: list[str] = []
        all_spans = []
        for k, row in enumerate(rows):
            where = self.source.where(row)
            messages, overrides = self._conversation(k, columns, where)
            kwargs = dict(self.chat_kwargs)
            tools = parse_tools(columns[mt.tools_key][k], where, mt.tools_key) if mt.tools_key in columns else None
            if tools is not None:
                kwargs["tools"] = tools
            thinking = columns[mt.enable_thinking_key][k] if mt.enable_thinking_key in columns else None
            if thinking is not None:
                kwargs["enable_thinking"] = bool(thinking)
            renderer = ChatRenderer(self.tokenizer, kwargs, where)
            text = renderer.render(messages)
            text, spans = self._rendered(k, text, self._spans(messages, overrides, text, renderer), where)
            texts.append(text)
            all_spans.append(spans)
            self._note_control_text(messages)
        # One batched call: the Rust tokenizer encodes the texts in parallel.
        enc = self.tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
        out: list[Encoded] = []
        for k, (text, spans, ids, offsets) in enumerate(zip(texts, all_spans, enc["input_ids"], enc["offset_mapping"])):
            mask, aligned = token_mask(np.asarray(offsets, dtype=np.int64).reshape(-1, 2), spans, len(text))
            self.num_misaligned += not aligned
            out.append(self._encoded(k, np.asarray(ids, dtype=np.int32), mask, self.source.where(rows[k])))
        return out

    # -- hooks of the vision-language dataset (sft/data/vision_dataset.py) --
    def _conversation(
        self, k: int, columns: dict[str, list[Any]], where: str
    ) -> tuple[list[dict[str, Any]], list[int | None]]:
        """Row k's checked messages and their loss_mask overrides."""
        key = self.config.multiturn.messages_key
        return clean_messages(columns[key][k], where, key)

    def _rendered(self, k: int, text: str, spans: list[tuple[int, int]], where: str) -> tuple[str, list]:
        """The text to tokenize and its trained character spans."""
        return text, spans

    def _encoded(self, k: int, ids: np.ndarray, mask: np.ndarray, where: str) -> Encoded:
        return ids, mask

    def _spans(
        self, messages: list[dict[str, Any]], overrides: list[int | None], text: str, renderer: ChatRenderer
    ) -> list[tuple[int, int]]:
        """Audited trained character spans of one rendered row."""
        windows = message_windows(messages, text, renderer)
        starts = self.turns.starts(renderer, messages, text, windows)
        closers = self.turns.closers(renderer)
        last_only = self.config.multiturn.train_on == "last"

        def rendered_end(i: int) -> int | None:
            # Cut after message i; after the last one, a user turn follows (so a terminator
            # that the template appends after the last turn is not taken as the turn's end).
            cut = messages[: i + 1]
            if i == len(messages) - 1:
                cut = cut + [{"role": "user", "content": sentinel_for(text)}]
            other = renderer.try_render(cut, add_generation_prompt=False)
            return None if other is None else self.markers.token_start(text, common_prefix(text, other))

        try:
            spans = trained_spans(
                messages, overrides, text, windows, starts, closers, self.markers, last_only, rendered_end
            )
            audit_spans(messages, text, windows, spans, closers)
        except ValueError as e:
            raise ValueError(f"{renderer.where}: {e}") from e
        return merge(list(spans.values()))

    def _note_control_text(self, messages: list[dict[str, Any]]) -> None:
        # A control token written inside a message (e.g. "<|im_end|>") is encoded as that
        # token, as apply_chat_template does; counted so the user hears about it once.
        if self.markers.special is None:
            return
        if any(self.markers.special.search(text_of(m.get("content"))) for m in messages):
            self.num_control_text += 1

    def _report(self, seconds: float) -> None:
        paths = ", ".join(self.source.paths)
        if self.num_misaligned:
            logger.warning(
                "%d rows of %s: a token straddles the edge of a trained span (the template joins a turn's "
                "text to the next one); such tokens are trained only when they start inside the span",
                self.num_misaligned,
                paths,
            )
        if self.num_control_text:
            logger.warning(
                "%d rows of %s contain special-token text inside a message; it is encoded as the special token",
                self.num_control_text,
                paths,
            )
        super()._report(seconds)


def text_of(content: Any) -> str:
    """A message's text: its content string, or its text parts joined (vision-language rows)."""
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return content or ""
