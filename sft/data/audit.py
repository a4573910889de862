"""The mask audit, run on every row when it is tokenised.

It checks the trained character spans of a row against the message windows (what the
template rendered for each message, `sft.data.regions`): every assistant message must have
one, and no trained span may touch the window of another message, so text rendered for a
system, user or tool message (or for another turn) is never trained by mistake. A row that
fails raises ValueError with the reason; the dataset refuses it or, with
`data.on_bad_sample=skip`, drops it.
"""

from __future__ import annotations

from typing import Any

from sft.data.regions import Span


def _touches(span: Span, window: Span) -> bool:
    start, end = span
    if window[0] == window[1]:  # rendered as nothing, at one position
        return start < window[0] < end
    return start < window[1] and window[0] < end


def audit_spans(messages: list[dict[str, Any]], windows: list[Span | None], spans: dict[int, Span]) -> None:
    """Raise ValueError naming the first message whose mask cannot be trusted."""
    for i, (msg, window) in enumerate(zip(messages, windows)):
        if msg["role"] == "assistant" and window is None:
            raise ValueError(
                f"mask audit: assistant message {i} has no place in the rendered conversation (the chat template "
                "renders nothing that depends on its content, reasoning or tool calls, or refuses them changed); "
                "fix data.chat_template or the row"
            )
    for i, span in spans.items():
        own = windows[i]
        assert own is not None and span[0] <= own[0] and own[1] <= span[1], "a trained span must hold its window"
        for j, window in enumerate(windows):
            if j != i and window is not None and _touches(span, window):
                raise ValueError(
                    f"mask audit: the trained text of message {i} ({messages[i]['role']}) would include text "
                    f"rendered for message {j} ({messages[j]['role']}); the chat template mixes the two, so "
                    "this row cannot be masked exactly; fix data.chat_template or the row"
                )
