"""Where each assistant turn's trained text begins, and which tokens end a turn, from the template itself.

Start: at inference, what the template gives before turn i is the conversation cut before i, rendered
with the generation prompt. Where that rendering agrees with the whole conversation's up to its
generation prompt (the history is not rewritten), turn i starts where the two part: its role header
and whatever prefix of the generation prompt it begins with (an opening think tag, a response-block
token) are given, not trained, whichever message field the text came from. Where the history is
rewritten, the cut's generation prompt (whole, its first line, then its prefixes at token ends) is
searched for between the previous message and the turn.

End: the end-of-turn token is the last special token of a plain reply's closing: the text that
follows the reply both as the last message and before a user turn, in two small probe
conversations (where the two closings differ from their first character, the first special token
of each). A turn runs through the first of them after its text, so a tool-call section closed by
several tokens or tags is trained whole.
"""

from __future__ import annotations

import re
from typing import Any

from transformers import PreTrainedTokenizerBase

from sft.data.messages import ChatRenderer
from sft.data.regions import Span, common_prefix, diff_window
from sft.data.spans import Markers, alternation, neighbours

# Probe replies: ordinary words, and a string no template treats specially.
_PROBE_REPLIES = ("fine thanks", "~~~~")


def _cache_key(renderer: ChatRenderer) -> str:
    # Tools change where a template puts its tool list, not how a turn opens or ends.
    return repr(sorted((k, repr(v)) for k, v in renderer.kwargs.items() if k != "tools"))


class TurnFinder:
    """Per-turn starts and the end-of-turn tokens of one tokenizer's chat template."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, markers: Markers) -> None:
        self.tokenizer = tokenizer
        self.markers = markers
        self._closers: dict[str, re.Pattern[str] | None] = {}
        self._headers: dict[str, tuple[str, ...]] = {}

    def closers(self, renderer: ChatRenderer) -> re.Pattern[str] | None:
        """The special tokens that end a plain reply (None when no probe renders or none is special)."""
        key = _cache_key(renderer)
        if key in self._closers:
            return self._closers[key]
        tails = [t for t in (self._reply_tail(renderer, last) for last in (True, False)) if t is not None]
        found: set[str] = set()
        if self.markers.special is not None and tails:
            # What follows a reply both as the last message and before a user turn is the reply's
            # own closing; its last special token ends the turn (a block close may come first).
            common = tails[0][: common_prefix(tails[0], tails[-1])]
            inside = [m.group() for m in self.markers.special.finditer(common)]
            if inside:
                found.add(inside[-1])
            else:  # the closer depends on the position (a final-answer token for the last turn)
                found.update(m.group() for m in (self.markers.special.search(t) for t in tails) if m is not None)
        pattern = re.compile(alternation(found)) if found else None
        if tails:  # a template that refuses both probes may accept them with a later row's arguments
            self._closers[key] = pattern
        return pattern

    def _reply_tail(self, renderer: ChatRenderer, last: bool) -> str | None:
        """The text after a plain reply's window in a probe conversation, as the last message or not."""
        tail = [] if last else [{"role": "user", "content": "and then"}]
        convs = [
            [{"role": "user", "content": "how are you"}, {"role": "assistant", "content": r}] + tail
            for r in _PROBE_REPLIES
        ]
        texts = renderer.try_render_each(convs)
        if texts[0] is None or texts[1] is None:
            return None
        window = diff_window(texts[0], texts[1])
        return None if window is None else texts[0][window[1] :]

    def starts(
        self, renderer: ChatRenderer, messages: list[dict[str, Any]], text: str, windows: list[Span | None]
    ) -> dict[int, int]:
        """Start of the trained text of every assistant turn that has a window, by message index."""
        turns = [i for i, m in enumerate(messages) if m["role"] == "assistant" and windows[i] is not None]
        cut = [i for i in turns if i > 0]
        cuts = [messages[:i] for i in cut]
        prompted = dict(zip(cut, renderer.try_render_each(cuts, add_generation_prompt=True)))
        plain = dict(zip(cut, renderer.try_render_each(cuts)))
        out: dict[int, int] = {}
        for i in turns:
            window = windows[i]
            assert window is not None
            g, h = prompted.get(i), plain.get(i)
            if g is None or h is None:
                header = self._first_header(renderer, messages)
            else:
                # The generation prompt starts where the cut parts from its rendering without one
                # (a template may end a conversation without a prompt with a terminator instead).
                q = self.markers.token_start(g, common_prefix(g, h))
                p = common_prefix(text, g)
                # Never inside an added token of either text (e.g. "<think>" vs "<tool_call>").
                p = min(self.markers.token_start(text, p), self.markers.token_start(g, p))
                if p >= q and (p > q or q == len(g)):
                    out[i] = p
                    continue
                header = _candidates(self.tokenizer, g[q:])
            before, _ = neighbours(windows, i)
            out[i] = _search_start(text, before, window[0], header, self.markers)
        return out

    def _first_header(self, renderer: ChatRenderer, messages: list[dict[str, Any]]) -> tuple[str, ...]:
        """Header candidates from the generation prompt after the first assistant turn's history, once
        per set of template arguments (for a turn whose own cut the template refuses)."""
        key = _cache_key(renderer)
        if key in self._headers:
            return self._headers[key]
        first = next((i for i, m in enumerate(messages) if m["role"] == "assistant"), 0)
        history = messages[:first]
        prompted = renderer.try_render(history, add_generation_prompt=True)
        plain = renderer.try_render(history, add_generation_prompt=False)
        if prompted is None or plain is None:
            return ()  # not cached: a later row may allow the derivation
        found = _candidates(
            self.tokenizer, prompted[self.markers.token_start(prompted, common_prefix(prompted, plain)) :]
        )
        self._headers[key] = found
        return found


def _candidates(tokenizer: PreTrainedTokenizerBase, prompt: str) -> tuple[str, ...]:
    """The generation prompt, most specific first: whole, its first line (the role line: what follows,
    e.g. an empty think block, belongs to the prompt only when all of it is there), then its prefixes
    cut at token ends."""
    enc = tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)
    ends = sorted({int(e) for _, e in enc["offset_mapping"]}, reverse=True)
    line = prompt[: prompt.find("\n") + 1] if "\n" in prompt else prompt
    return tuple(dict.fromkeys(c for c in [prompt, line] + [prompt[:e] for e in ends] if c.strip()))


def _search_start(text: str, before: int, start: int, header: tuple[str, ...], markers: Markers) -> int:
    for prefix in header:
        found = text.rfind(prefix, before, start)
        if found >= 0:
            return found + len(prefix)
    closed = markers.first_special_end(text, before, start)
    return start if closed is None else closed
