"""Which characters of a rendered conversation are training targets, and the token mask.

Each message's window (what the template made of its fields, `sft.data.regions`) anchors
its turn. An assistant turn is trained from the end of its role header to the end of the
first special token after its window (its end-of-turn token), never past the next message's
window. The role header is what the template's generation prompt puts before a reply, found
between the previous window and this one: the whole prompt, else its first line, else its
longest prefix cut at a token end; where the generation prompt is empty or not found, the
turn starts after the previous message's end-of-turn token. So a terminator appended after
the last turn, history that the template rewrites, and system prompts or tool lists it moves
are all handled by the one rule.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import numpy as np
from transformers import PreTrainedTokenizerBase

from sft.data.messages import ChatRenderer
from sft.data.regions import Span


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

    def first_special_end(self, text: str, start: int, stop: int) -> int | None:
        """End of the first special token lying within text[start:stop], if any."""
        if self.special is None:
            return None
        m = self.special.search(text, start, stop)
        return m.end() if m else None

    def token_start(self, text: str, pos: int) -> int:
        """`pos`, moved back to the start of an added token that it falls inside."""
        if self.any is not None:
            for m in self.any.finditer(text, max(0, pos - 64), min(len(text), pos + 64)):
                if m.start() < pos < m.end():
                    return m.start()
        return pos


class HeaderFinder:
    """The assistant role header: candidates derived from the template's generation prompt,
    once per set of template arguments (tools aside), most specific first."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, markers: Markers) -> None:
        self.tokenizer = tokenizer
        self.markers = markers
        self.cache: dict[str, tuple[str, ...]] = {}

    def prefixes(self, renderer: ChatRenderer, messages: list[dict[str, Any]]) -> tuple[str, ...]:
        key = repr(sorted((k, repr(v)) for k, v in renderer.kwargs.items() if k != "tools"))
        if key in self.cache:
            return self.cache[key]
        first = next((i for i, m in enumerate(messages) if m["role"] == "assistant"), 0)
        history = messages[:first]
        prompted = renderer.try_render(history, add_generation_prompt=True)
        plain = renderer.try_render(history, add_generation_prompt=False)
        if prompted is None or plain is None:
            return ()  # not cached: a later row may allow the derivation
        # Where the two renderings part (a template may end a conversation without a
        # generation prompt with a terminator instead), never inside an added token.
        p = 0
        while p < min(len(prompted), len(plain)) and prompted[p] == plain[p]:
            p += 1
        prompt = prompted[self.markers.token_start(prompted, p) :]
        # The whole prompt, then its first line (the role line: what follows it, e.g. an empty
        # think block, belongs to the prompt only when all of the prompt is there), then its
        # prefixes cut at token ends (e.g. without a think opener the reply does not repeat).
        enc = self.tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)
        ends = sorted({int(e) for _, e in enc["offset_mapping"]}, reverse=True)
        line = prompt[: prompt.find("\n") + 1] if "\n" in prompt else prompt
        candidates = [prompt, line] + [prompt[:e] for e in ends]
        found = tuple(dict.fromkeys(c for c in candidates if c.strip()))
        self.cache[key] = found
        return found


def trained_spans(
    messages: list[dict[str, Any]],
    overrides: list[int | None],
    text: str,
    windows: list[Span | None],
    header: tuple[str, ...],
    markers: Markers,
    last_only: bool = False,
    rendered_end: Callable[[int], int | None] | None = None,
) -> dict[int, Span]:
    """Character span of `text` trained for each trained message, by message index: the
    assistant turns (only the last one with `last_only`), changed by per-message `loss_mask`.
    A turn that no special token closes (e.g. a call ended by plain-text markers) runs to
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
        before = max((w[1] for j, w in enumerate(windows) if j != i and w and w[1] <= window[0]), default=0)
        after = min((w[0] for j, w in enumerate(windows) if j != i and w and w[0] >= window[1]), default=len(text))
        start = _turn_start(text, before, window[0], header, markers) if role == "assistant" else window[0]
        end = markers.first_special_end(text, window[1], after)
        if end is None and rendered_end is not None:
            cut = rendered_end(i)
            end = cut if cut is not None and window[1] <= cut <= after else None
        spans[i] = (start, window[1] if end is None else end)
    return spans


def _turn_start(text: str, before: int, start: int, header: tuple[str, ...], markers: Markers) -> int:
    for prefix in header:
        found = text.rfind(prefix, before, start)
        if found >= 0:
            return found + len(prefix)
    closed = markers.first_special_end(text, before, start)
    return start if closed is None else closed


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
