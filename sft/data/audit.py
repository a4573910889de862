"""The mask audit, run on every row when it is tokenised.

It checks the trained character spans of a row against the message windows (what the
template rendered for each message, `sft.data.regions`): every assistant message must have
one; no trained span may touch the window of another message, so text rendered for a
system, user or tool message (or for another turn) is never trained by mistake; and an
assistant turn's span may not stop before the end-of-turn token that closes it (the model
must learn to close its tool calls and end its turn). A row that fails raises ValueError with
the reason; the dataset refuses it or, with `data.on_bad_sample=skip`, drops it.
"""

from __future__ import annotations

import re
from typing import Any

from sft.data.regions import Span
from sft.data.spans import neighbours


def _touches(span: Span, window: Span) -> bool:
    start, end = span
    if window[0] == window[1]:  # rendered as nothing, at one position
        return start < window[0] < end
    return start < window[1] and window[0] < end


def audit_spans(
    messages: list[dict[str, Any]],
    text: str,
    windows: list[Span | None],
    spans: dict[int, Span],
    closers: re.Pattern[str] | None,
) -> None:
    """Raise ValueError naming the first message whose mask cannot be trusted; `closers` matches
    the template's end-of-turn tokens."""
    for i, (msg, window) in enumerate(zip(messages, windows)):
        if msg["role"] == "assistant" and window is None:
            raise ValueError(
                f"mask audit: assistant message {i} has no place in the rendered conversation (the chat template "
                "renders nothing that depends on its content, reasoning or tool calls, or refuses them changed); "
                "fix data.chat_template or the row"
            )
    for i, span in spans.items():
        own = windows[i]
        # A span may start inside its window (the generation prompt gives the window's first
        # characters, e.g. a think tag written in the content); it always runs past its end.
        assert own is not None and span[0] <= own[1] <= span[1], "a trained span must reach its window's end"
        for j, window in enumerate(windows):
            if j != i and window is not None and _touches(span, window):
                raise ValueError(
                    f"mask audit: the trained text of message {i} ({messages[i]['role']}) would include text "
                    f"rendered for message {j} ({messages[j]['role']}); the chat template mixes the two, so "
                    "this row cannot be masked exactly; fix data.chat_template or the row"
                )
        if messages[i]["role"] == "assistant" and closers is not None:
            _, after = neighbours(windows, i)
            m = closers.search(text, own[1], len(text) if after < 0 else after)
            if m is not None and span[1] < m.end():
                raise ValueError(
                    f"mask audit: the trained text of message {i} (assistant) stops before the end-of-turn token "
                    f"{m.group()!r} that closes its turn; the chat template closes this turn in a way sft cannot "
                    "place; fix data.chat_template or the row"
                )
