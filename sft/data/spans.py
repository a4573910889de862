"""Which characters of a rendered conversation are training targets, and the token mask.

Each message's window (what the template made of its fields, `sft.data.regions`) anchors
its turn. An assistant turn is trained from its start (`sft.data.turns`: after what the
template gives at that point at inference) through the first end-of-turn token after its
window, never past the next message's window. A turn that no end-of-turn token closes before
the next message (e.g. a call closed by its own token) runs through the first special token
after its window, else to where the template's rendering of the conversation cut after it
parts from the whole. So a terminator appended after the last turn, history that the template
rewrites, and system prompts or tool lists it moves are all handled by the one rule.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import numpy as np
from transformers import PreTrainedTokenizerBase

from sft.data.regions import Span


def alternation(tokens: set[str]) -> str:
    # Longest first, so "<|im_end|>" wins over any shorter token it contains.
    return "|".join(re.escape(t) for t in sorted((t for t in tokens if t), key=len, reverse=True))


class Markers:
    """Regexes over the tokenizer's added tokens (any) and special tokens (end of turn)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        added = {t.content: t.special for t in tokenizer.added_tokens_decoder.values()}
        special = {t for t, is_special in added.items() if is_special} | set(tokenizer.all_special_tokens)
        any_tokens = set(added) | special
        self.any = re.compile(alternation(any_tokens)) if any_tokens else None
        self.special = re.compile(alternation(special)) if special else None

    def first_special_end(self, text: str, start: int, stop: int) -> int | None:
        """End of the first special token lying within text[start:stop], if any."""
        return first_end(self.special, text, start, stop)

    def token_start(self, text: str, pos: int) -> int:
        """`pos`, moved back to the start of an added token that it falls inside."""
        if self.any is not None:
            for m in self.any.finditer(text, max(0, pos - 64), min(len(text), pos + 64)):
                if m.start() < pos < m.end():
                    return m.start()
        return pos


def neighbours(windows: list[Span | None], i: int) -> Span:
    """End of the last other window before message i's, and start of the first one after it."""
    window = windows[i]
    assert window is not None
    before = max((w[1] for j, w in enumerate(windows) if j != i and w and w[1] <= window[0]), default=0)
    after = min((w[0] for j, w in enumerate(windows) if j != i and w and w[0] >= window[1]), default=-1)
    return before, after


def trained_spans(
    messages: list[dict[str, Any]],
    overrides: list[int | None],
    text: str,
    windows: list[Span | None],
    starts: dict[int, int],
    closers: re.Pattern[str] | None,
    markers: Markers,
    last_only: bool = False,
    rendered_end: Callable[[int], int | None] | None = None,
) -> dict[int, Span]:
    """Character span of `text` trained for each trained message, by message index: the
    assistant turns (only the last one with `last_only`), changed by per-message `loss_mask`.
    `starts` holds each assistant turn's start; `closers` matches the end-of-turn tokens. A turn
    that no special token closes (e.g. a call ended by plain-text markers) runs to
    `rendered_end(i)`: where the template's rendering of the conversation cut after message
    i parts from `text`."""
    spans: dict[int, Span] = {}
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=-1)
    for i, msg in enumerate(messages):
        role = msg["role"]
        default = role == "assistant" and (not last_only or i == last)
        train = default if overrides[i] is None else bool(overrides[i])
        window = windows[i]
        if not train or window is None:
            # An assistant message without a window is refused by the audit.
            if train and role != "assistant":
                raise ValueError(
                    f"message {i} ({role}) has loss_mask=1 but the chat template renders nothing for it; "
                    "drop its loss_mask"
                )
            continue
        _, after = neighbours(windows, i)
        after = len(text) if after < 0 else after
        end = first_end(closers, text, window[1], after)
        if end is None:
            end = markers.first_special_end(text, window[1], after)
        if end is None and rendered_end is not None:
            cut = rendered_end(i)
            end = cut if cut is not None and window[1] <= cut <= after else None
        end = window[1] if end is None else end
        start = starts.get(i, window[0]) if role == "assistant" else window[0]
        spans[i] = (min(start, end), end)
    return spans


def first_end(pattern: re.Pattern[str] | None, text: str, start: int, stop: int) -> int | None:
    """End of the first match of `pattern` lying within text[start:stop], if any."""
    m = None if pattern is None else pattern.search(text, start, stop)
    return None if m is None else m.end()


def merge(spans: list[Span]) -> list[Span]:
    """Sorted, non-overlapping union of `spans`."""
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
