"""Chat messages as they come out of parquet: validation, cleaning and template rendering.

Parquet stores a list of messages as a list of structs, so every message carries every
field (null where a message had none) and nested dicts (tool schemas, tool-call arguments)
carry the union of all their keys. `clean_messages` / `parse_tools` undo that and check the
roles and contents; `ChatRenderer` renders through the tokenizer's chat template.
"""

from __future__ import annotations

import json
from typing import Any

from jinja2 import TemplateError
from transformers import PreTrainedTokenizerBase

ROLES = ("system", "user", "assistant", "tool")
# Optional message fields holding a turn's reasoning, passed through to the template:
# reasoning_content (Qwen3 style), thinking (gpt-oss), reasoning (other templates).
REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")


def drop_nulls(value: Any) -> Any:
    """Recursively remove dict keys whose value is None (parquet's filler for absent keys)."""
    if isinstance(value, dict):
        return {k: drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [drop_nulls(v) for v in value]
    return value


def _as_json(value: Any, where: str, key: str) -> Any:
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: column {key!r} is a string but not valid JSON ({e}); store a list or JSON") from e


def clean_messages(
    raw: Any, where: str, key: str, need_assistant: bool = True, parts: bool = False
) -> tuple[list[dict[str, Any]], list[int | None]]:
    """Checked messages for the template, and each message's `loss_mask` override (or None).

    Allowed roles are system/user/assistant/tool; content must be a string, except None for
    an assistant turn that has tool_calls, and (with `parts`, vision-language rows) a list of content parts.
    At least one assistant turn is required unless `need_assistant` is False.
    """
    raw = _as_json(raw, where, key)
    if not isinstance(raw, list) or not raw:
        raise ValueError(f"{where}: column {key!r} must be a non-empty list of messages, got {type(raw).__name__}")
    messages: list[dict[str, Any]] = []
    overrides: list[int | None] = []
    for j, msg in enumerate(raw):
        if not isinstance(msg, dict):
            raise ValueError(f"{where}: {key}[{j}] is a {type(msg).__name__}, expected a dict with role and content")
        role = msg.get("role")
        if role not in ROLES:
            raise ValueError(f"{where}: {key}[{j}] has role {role!r}; use one of {', '.join(ROLES)}")
        content = msg.get("content")
        tool_calls = msg.get("tool_calls")
        if content is None and not (role == "assistant" and tool_calls):
            raise ValueError(
                f"{where}: {key}[{j}] ({role}) has no content; give a string (None only for an assistant tool call)"
            )
        if content is not None and not isinstance(content, str) and not (parts and isinstance(content, list)):
            raise ValueError(f"{where}: {key}[{j}] content is a {type(content).__name__}; give a string")
        for field in REASONING_KEYS:
            if msg.get(field) is not None and not isinstance(msg[field], str):
                raise ValueError(
                    f"{where}: {key}[{j}].{field} is a {type(msg[field]).__name__}; give a string or leave it out"
                )
        overrides.append(_loss_mask_value(msg.get("loss_mask"), where, f"{key}[{j}]"))
        messages.append({k: drop_nulls(v) for k, v in msg.items() if v is not None and k != "loss_mask"})
    if need_assistant and not any(m["role"] == "assistant" for m in messages):
        raise ValueError(f"{where}: column {key!r} has no assistant message, so nothing to train on; remove the row")
    return messages, overrides


def _loss_mask_value(value: Any, where: str, name: str) -> int | None:
    if value is None:
        return None
    if value in (0, 1) and not isinstance(value, float):
        return int(value)
    raise ValueError(f"{where}: {name}.loss_mask={value!r}; use 0, 1 or leave it out")


def parse_tools(raw: Any, where: str, key: str) -> list[Any] | None:
    """Tool schemas from a list or a JSON string; None when the row has none."""
    tools = _as_json(raw, where, key)
    if tools is None:
        return None
    if not isinstance(tools, list):
        raise ValueError(f"{where}: column {key!r} must be a list of tool schemas, got {type(tools).__name__}")
    return drop_nulls(tools) or None


def check_chat_template(tokenizer: PreTrainedTokenizerBase) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"tokenizer {tokenizer.name_or_path!r} has no chat template; set data.chat_template to a Jinja template"
        )


class ChatRenderer:
    """Renders one conversation to text with fixed template arguments."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, kwargs: dict[str, Any], where: str) -> None:
        self.tokenizer = tokenizer
        self.kwargs = kwargs
        self.where = where

    def try_render(self, messages: list[dict[str, Any]], add_generation_prompt: bool) -> str | None:
        """Text of a partial conversation, or None where the template refuses it."""
        if not messages:
            return None
        try:
            return self._render(messages, add_generation_prompt)
        except (TemplateError, TypeError, ValueError, KeyError, IndexError):
            # Templates may reject a prefix (e.g. "must end with a user turn"); the caller
            # then locates that turn by searching instead.
            return None

    def try_render_each(
        self, conversations: list[list[dict[str, Any]]], add_generation_prompt: bool = False
    ) -> list[str | None]:
        """`try_render` of each conversation, in one batched call when the template accepts
        them all (the per-call overhead is paid once)."""
        if not conversations:
            return []
        if not all(conversations):
            return [self.try_render(c, add_generation_prompt) for c in conversations]
        try:
            texts = self.tokenizer.apply_chat_template(
                conversations, add_generation_prompt=add_generation_prompt, tokenize=False, **self.kwargs
            )
        except (TemplateError, TypeError, ValueError, KeyError, IndexError):
            return [self.try_render(c, add_generation_prompt) for c in conversations]
        assert isinstance(texts, list) and len(texts) == len(conversations), "one rendering per conversation"
        return texts

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = False) -> str:
        try:
            return self._render(messages, add_generation_prompt)
        except Exception as e:
            raise ValueError(f"{self.where}: chat template failed: {type(e).__name__}: {e}") from e

    def _render(self, messages: list[dict[str, Any]], add_generation_prompt: bool) -> str:
        text = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, tokenize=False, **self.kwargs
        )
        assert isinstance(text, str), "apply_chat_template(tokenize=False) must return a string"
        return text
