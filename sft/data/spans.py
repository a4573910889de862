"""Which characters of a rendered conversation are training targets, and the token mask.

For assistant message i, P = render(messages[:i], generation prompt) and Q =
render(messages[:i+1]); when Q is a prefix of the full text T and P of Q, the turn is
T[len(P):len(Q)], trained up to the end of its last added token after the content (the
end-of-turn marker), so neither the role header nor what follows the marker is trained.
Templates that rewrite history break that; such turns are found by searching T in order.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
from transformers import PreTrainedTokenizerBase

from sft.data.messages import ChatRenderer

Span = tuple[int, int]


def _alternation(tokens: set[str]) -> str:
    # Longest first, so "<|im_end|>" wins over any shorter token it contains.
    return "|".join(re.escape(t) for t in sorted((t for t in tokens if t), key=len, reverse=True))


class Markers:
    """Regexes over the tokenizer's added tokens (any) and special tokens (end of turn)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        added = {t.content: t.special for t in tokenizer.added_tokens_decoder.values()}
        special = {t for t, is_special in added.items() if is_special} | set(tokenizer.all_special_tokens)
        any_tokens = set(added) | special
        self.any = re.compile(_alternation(any_tokens)) if any_tokens else None
        self.special = re.compile(_alternation(special)) if special else None
        # Whitespace then a special token, right after a located content: its end of turn.
        self.turn_close = re.compile(r"\s*(?:" + _alternation(special) + ")") if special else None

    def turn_length(self, segment: str, content: str) -> int:
        """Trained length of an assistant turn's text: through its last added token after
        the content, else the segment without trailing whitespace."""
        start = 0
        if content:
            found = segment.find(content)
            start = found + len(content) if found >= 0 else 0
        matches = list(self.any.finditer(segment, start)) if self.any is not None else []
        return matches[-1].end() if matches else len(segment.rstrip())

    def last_marker(self, piece: str) -> str | None:
        """The added token that ends `piece` (a turn's end-of-turn token), if it ends in one."""
        matches = list(self.any.finditer(piece)) if self.any is not None else []
        return matches[-1].group() if matches and matches[-1].end() == len(piece) else None

    def turn_end(self, text: str, start: int, closing: str | None = None) -> int:
        """End of the turn's end-of-turn token at or after `start`: `closing` when known
        (a turn may hold other special tokens), else the first special token; `start`
        itself when there is none."""
        if closing is not None:
            found = text.find(closing, start)
            return found + len(closing) if found >= 0 else start
        m = self.special.search(text, start) if self.special is not None else None
        return m.end() if m else start

    def close(self, text: str, end: int) -> int:
        """`end` moved past the end-of-turn token that directly follows it, if any."""
        if self.turn_close is None:
            return end
        m = self.turn_close.match(text, end)
        return m.end() if m else end


def trained_spans(
    messages: list[dict[str, Any]],
    overrides: list[int | None],
    text: str,
    renderer: ChatRenderer,
    markers: Markers,
    last_only: bool = False,
) -> list[Span]:
    """Sorted, non-overlapping character spans of `text` (the whole rendered conversation)
    that are training targets: assistant turns (only the last one with `last_only`),
    changed by per-message `loss_mask`."""
    spans: list[Span] = []
    cursor = 0
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=-1)
    for i, msg in enumerate(messages):
        role = msg["role"]
        default = role == "assistant" and (not last_only or i == last)
        train = default if overrides[i] is None else bool(overrides[i])
        content = msg.get("content") or ""
        if role == "assistant":
            start, end = _assistant_span(i, messages, text, renderer, markers, cursor)
            cursor = max(cursor, end)
            if train and end > start:
                spans.append((start, end))
            continue
        # Other turns are only located when trained, or to move the cursor past their text
        # so a later assistant search cannot match inside them.
        found = text.find(content, cursor) if content else -1
        if found >= 0:
            if train:
                spans.append((found, markers.close(text, found + len(content))))
            cursor = found + len(content)
        elif train and content:
            raise ValueError(
                f"{renderer.where}: message {i} ({role}) has loss_mask=1 but the chat template does not "
                "render its content verbatim; drop its loss_mask"
            )
    return _merge(spans)


def _assistant_span(
    i: int,
    messages: list[dict[str, Any]],
    text: str,
    renderer: ChatRenderer,
    markers: Markers,
    cursor: int,
) -> Span:
    content = messages[i].get("content") or ""
    history = messages[:i]
    before = renderer.try_render(history, add_generation_prompt=True)
    upto = text if i == len(messages) - 1 else renderer.try_render(messages[: i + 1], add_generation_prompt=False)
    closing = None
    if before is not None and upto is not None and upto.startswith(before):
        segment = upto[len(before) :]
        piece = segment[: markers.turn_length(segment, content)]
        if text.startswith(upto):
            return len(before), len(before) + len(piece)
        # Earlier history was rewritten (e.g. its reasoning dropped), maybe not this turn.
        found = text.find(piece, cursor) if piece.strip() else -1
        if found >= 0:
            return found, found + len(piece)
        closing = markers.last_marker(piece)
    # This turn itself renders differently inside the whole conversation (e.g. without its
    # reasoning): find its role header, else its content, and train up to its end-of-turn.
    header = _generation_prompt(renderer, history, before)
    found = text.find(header, cursor) if header.strip() else -1
    if found >= 0 and text.startswith(content, found + len(header)):
        start = found + len(header)
        return start, markers.turn_end(text, start + len(content), closing)
    found = text.find(content, cursor) if content else -1
    if found >= 0:
        return found, markers.turn_end(text, found + len(content), closing)
    raise ValueError(
        f"{renderer.where}: assistant message {i} is not in the rendered conversation (the chat template "
        "rewrites it); fix data.chat_template or the row"
    )


def _generation_prompt(renderer: ChatRenderer, history: list[dict[str, Any]], before: str | None) -> str:
    """What add_generation_prompt appends after `history` (an assistant role header)."""
    plain = renderer.try_render(history, add_generation_prompt=False)
    if before is None or plain is None or not before.startswith(plain):
        return ""
    return before[len(plain) :]


def _merge(spans: list[Span]) -> list[Span]:
    merged: list[Span] = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(end, merged[-1][1]))
        else:
            merged.append((start, end))
    return merged


def token_mask(offsets: np.ndarray, spans: list[Span], text_length: int) -> tuple[np.ndarray, bool]:
    """loss mask (1 where a token's first character lies in a span) and whether every span
    starts and ends on a token boundary (False: a token straddles a span edge)."""
    starts = offsets[:, 0] if len(offsets) else np.zeros(0, dtype=np.int64)
    mask = np.zeros(len(starts), dtype=np.uint8)
    boundaries = set(starts.tolist())
    boundaries.add(text_length)
    aligned = True
    for start, end in spans:
        mask[(starts >= start) & (starts < end)] = 1
        aligned = aligned and start in boundaries and end in boundaries
    return mask, aligned
