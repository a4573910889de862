"""Where the chat template renders each message, found from the template itself.

For message j, the conversation is rendered once more with j's own text fields (content,
reasoning, tool-call arguments) replaced by a sentinel string made of a character that the
full rendering does not contain. Everything before the first difference and after the last
one is the same in both renderings, so the differing part of the full text, its *window*, is
what the template made of j's fields in this conversation: wherever it put them, however it
trimmed, split or dropped parts of them. No message content is ever searched for as a string.
"""

from __future__ import annotations

from typing import Any

from sft.data.messages import REASONING_KEYS, ChatRenderer

Span = tuple[int, int]

# Sentinel characters, tried in order; one absent from the rendered text is used. ASCII
# first: JSON filters (tojson) keep them as they are.
SENTINEL_CHARS = "~^`|@#$%¤§¦µ±¬"
SENTINEL_LENGTH = 4


def sentinel_for(text: str) -> str:
    """A sentinel string whose character does not occur in `text`."""
    for c in SENTINEL_CHARS:
        if c not in text:
            return c * SENTINEL_LENGTH
    # Every candidate occurs: windows may then end a character early at a coincidence, which
    # the span rules tolerate (they extend to the header and the end-of-turn token).
    return "\x00" * SENTINEL_LENGTH


def _vary_arguments(arguments: Any, s: str) -> Any:
    if isinstance(arguments, str):
        return s if arguments else arguments
    if isinstance(arguments, dict) and arguments:
        return {s: s}
    return arguments


def _vary_calls(calls: Any, s: str) -> tuple[Any, bool]:
    """Tool calls with their arguments replaced (names and ids kept: templates repeat a call's
    name in the tool message that answers it, and some check the id's format)."""
    if not isinstance(calls, list):
        return calls, False
    out, changed = [], False
    for call in calls:
        if not isinstance(call, dict):
            out.append(call)
            continue
        call = dict(call)
        holder = call
        if isinstance(call.get("function"), dict):
            holder = call["function"] = dict(call["function"])
        if "arguments" in holder:
            new = _vary_arguments(holder["arguments"], s)
            changed = changed or new is not holder["arguments"]
            holder["arguments"] = new
        out.append(call)
    return out, changed


def vary(message: dict[str, Any], s: str, content: bool = False) -> dict[str, Any]:
    """`message` with its non-empty text fields replaced by `s` (its content when it has none,
    or always with `content`), keeping the shape the template sees where it can: which
    fields are set and which are empty."""
    out = dict(message)
    changed = False
    if content:
        out["content"] = s
    for key in ("content", *REASONING_KEYS):
        if isinstance(out.get(key), str) and out[key]:
            out[key] = s
            changed = True
    if "tool_calls" in out:
        out["tool_calls"], called = _vary_calls(out["tool_calls"], s)
        changed = changed or called
    if not changed:
        out["content"] = s
    return out


def common_prefix(a: str, b: str) -> int:
    # Binary search over slice comparisons: each comparison runs in C.
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _common_suffix(a: str, b: str, limit: int) -> int:
    lo, hi = 0, limit
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[len(a) - mid :] == b[len(b) - mid :]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def diff_window(text: str, other: str) -> Span | None:
    """The part of `text` that differs from `other` (common prefix and suffix removed)."""
    if text == other:
        return None
    p = common_prefix(text, other)
    q = _common_suffix(text, other, min(len(text), len(other)) - p)
    return p, len(text) - q


def message_windows(messages: list[dict[str, Any]], text: str, renderer: ChatRenderer) -> list[Span | None]:
    """Each message's window in `text` (the whole conversation rendered); None where changing
    the message changes nothing or the template refuses the changed conversation."""
    s = sentinel_for(text)
    variants = [messages[:j] + [vary(m, s)] + messages[j + 1 :] for j, m in enumerate(messages)]
    windows = [None if other is None else diff_window(text, other) for other in renderer.try_render_each(variants)]
    for j, message in enumerate(messages):
        if windows[j] is None and message["role"] == "assistant":
            # E.g. an empty answer whose reasoning the template drops: vary the content too.
            other = renderer.try_render(messages[:j] + [vary(message, s, content=True)] + messages[j + 1 :], False)
            windows[j] = None if other is None else diff_window(text, other)
    return windows
