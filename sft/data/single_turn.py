"""`SFTDataset`: one prompt and one response per row (verl's single-turn SFT).

The prompt (a string, or a list of chat messages) is rendered with the chat template and a
generation prompt; the response text follows, then the EOS token. Prompt and response are
tokenized separately, as at inference where the model continues the prompt's tokens.
Trained: exactly the response tokens and the EOS.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from sft.data.messages import ChatRenderer, check_chat_template, clean_messages
from sft.data.scan import scan_single_turn
from sft.data.storage import Encoded, TokenizedDataset


def descend(value: Any, keys: list[str] | None, where: str, column: str, option: str) -> Any:
    """`value[k1][k2]...` for the configured dict keys, with an error naming the missing key."""
    for key in keys or []:
        # A null counts as missing: parquet fills the keys a row's struct lacks with nulls.
        if not isinstance(value, dict) or value.get(key) is None:
            found = (
                sorted(k for k, v in value.items() if v is not None)
                if isinstance(value, dict)
                else type(value).__name__
            )
            raise ValueError(f"{where}: column {column!r} has no key {key!r} (found {found}); fix {option}")
        value = value[key]
    return value


class SFTDataset(TokenizedDataset):
    """Single-turn prompt/response SFT; see `TokenizedDataset` for the items."""

    def _prepare(self) -> None:
        check_chat_template(self.tokenizer)
        if self.tokenizer.eos_token_id is None:
            raise ValueError(
                f"tokenizer {self.tokenizer.name_or_path!r} has no eos token; set eos_token in its tokenizer_config.json"
            )

    def _columns(self) -> tuple[dict[str, str], list[str]]:
        cfg = self.config
        return {cfg.prompt_key: "data.prompt_key", cfg.response_key: "data.response_key"}, []

    def _prompt_messages(self, value: Any, where: str) -> list[dict[str, Any]]:
        cfg = self.config
        value = descend(value, cfg.prompt_dict_keys, where, cfg.prompt_key, "data.prompt_dict_keys")
        if isinstance(value, str):
            return [{"role": "user", "content": value}]
        if isinstance(value, list):
            # Prompts stored as chat messages (as in RL datasets) are used as they are.
            return clean_messages(value, where, cfg.prompt_key, need_assistant=False)[0]
        raise ValueError(
            f"{where}: prompt from column {cfg.prompt_key!r} is a {type(value).__name__}; it must be a string "
            "(use data.prompt_dict_keys to reach one inside a dict)"
        )

    def _response_text(self, value: Any, where: str) -> str:
        cfg = self.config
        value = descend(value, cfg.response_dict_keys, where, cfg.response_key, "data.response_dict_keys")
        if not isinstance(value, str):
            raise ValueError(
                f"{where}: response from column {cfg.response_key!r} is a {type(value).__name__}; it must be a "
                "string (use data.response_dict_keys to reach one inside a dict)"
            )
        return value

    def _check_table(self, table: Any, path: str, checks: Any) -> None:
        cfg = self.config
        columns = {
            cfg.prompt_key: (cfg.prompt_dict_keys, "data.prompt_dict_keys", True),
            cfg.response_key: (cfg.response_dict_keys, "data.response_dict_keys", False),
        }
        scan_single_turn(table, path, checks, columns)

    def _encode_batch(self, rows: Sequence[int], columns: dict[str, list[Any]]) -> list[Encoded]:
        cfg = self.config
        prompts: list[str] = []
        responses: list[str] = []
        for k, row in enumerate(rows):
            where = self.source.where(row)
            messages = self._prompt_messages(columns[cfg.prompt_key][k], where)
            renderer = ChatRenderer(self.tokenizer, self.chat_kwargs, where)
            prompts.append(renderer.render(messages, add_generation_prompt=True))
            responses.append(self._response_text(columns[cfg.response_key][k], where))
        prompt_ids = self.tokenizer(prompts, add_special_tokens=False)["input_ids"]
        response_ids = self.tokenizer(responses, add_special_tokens=False)["input_ids"]
        eos = int(self.tokenizer.eos_token_id)
        out: list[Encoded] = []
        for p, r in zip(prompt_ids, response_ids):
            ids = np.asarray([*p, *r, eos], dtype=np.int32)
            mask = np.zeros(len(ids), dtype=np.uint8)
            mask[len(p) :] = 1
            out.append((ids, mask))
        return out
