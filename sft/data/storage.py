"""The dataset base class: tokenize every row up front into compact numpy storage.

`TokenizedDataset` reads the data files, scans them for bad rows (`sft.data.scan`, before any
tokenization), asks its subclass to encode rows in batches (`_encode_batch` -> token ids and
a 0/1 loss mask per row), applies `data.truncation`, drops rows left with no trained token
(and, with `data.on_bad_sample=skip`, bad rows), and stores the rest as flat int32 ids /
uint8 masks with int64 offsets. `__getitem__` returns the item contract of docs/ARCHITECTURE.md, padded or unpadded.
Given a `TokenizeShard` the ranks share the tokenizing; given a cache folder the store is read
from (or written to) the tokenised cache and mapped. Both are `sft.data.store_build`'s job.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from transformers import PreTrainedTokenizerBase

from sft.config.errors import either
from sft.config.schema import ON_BAD_SAMPLE, TRUNCATIONS, DataConfig
from sft.data.files import ParquetSource
from sft.data.scan import scan_source
from sft.data.store_build import StoreBuild

logger = logging.getLogger("sft")

Encoded = tuple[np.ndarray, np.ndarray]


@dataclass(frozen=True)
class TokenizeShard:
    """Split tokenization over the processes of `group` (rank `rank` of `world`)."""

    rank: int
    world: int
    group: Any  # torch.distributed.ProcessGroup


class TokenizedDataset(StoreBuild, Dataset):
    """Base of the SFT datasets; subclasses define the columns and `_encode_batch`."""

    def __init__(
        self,
        parquet_files: str | Sequence[str],
        tokenizer: PreTrainedTokenizerBase,
        config: DataConfig,
        max_samples: int = -1,
        pad_to_max_length: bool = True,
        shard: TokenizeShard | None = None,
        cache_dir: str | Path | None = None,
    ) -> None:
        self.shard = shard
        self.cache: tuple[Path, str, dict[str, Any]] | None = None
        if config.truncation not in TRUNCATIONS:
            raise ValueError(f"data.truncation={config.truncation!r}: choose {either(TRUNCATIONS)}")
        if config.on_bad_sample not in ON_BAD_SAMPLE:
            raise ValueError(f"data.on_bad_sample={config.on_bad_sample!r}: choose {either(ON_BAD_SAMPLE)}")
        if config.max_length < 2:
            raise ValueError(f"data.max_length={config.max_length}: must be at least 2")
        self.tokenizer = tokenizer
        self.config = config
        self.max_length = int(config.max_length)
        self.truncation = config.truncation
        self.pad_to_max_length = pad_to_max_length
        self.chat_kwargs = _chat_kwargs(config.apply_chat_template_kwargs)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        # Padding is masked out of attention and loss, so any valid id works as a fallback.
        self.pad_token_id = int(pad_id) if pad_id is not None else 0
        self._prepare()
        required, optional = self._columns()
        if cache_dir is not None and self._reuse(parquet_files, max_samples, Path(cache_dir).expanduser()):
            return
        self.source = ParquetSource(parquet_files, required, optional, max_samples, binary=self._binary_columns())
        self._scan()
        self._build()

    # -- subclass interface ------------------------------------------------------------

    def _prepare(self) -> None:
        """Checks and state that need the tokenizer and config, before any row is read."""

    def _columns(self) -> tuple[dict[str, str], list[str]]:
        """Required columns (name -> the config key that names it) and optional columns."""
        raise NotImplementedError

    def _fingerprint_extra(self) -> dict[str, Any]:
        """What else changes the tokenised result, for the cache key (sft/data/cache.py)."""
        return {}

    def _binary_columns(self) -> list[str]:
        """Columns read as bytes, not text (encoded images)."""
        return []

    def _encode_batch(self, rows: Sequence[int], columns: dict[str, list[Any]]) -> list[Encoded]:
        """(int token ids, 0/1 loss mask) for each row of `rows`, untruncated."""
        raise NotImplementedError

    def _check_table(self, table: Any, path: str, checks: Any) -> None:
        """Vectorised checks of one file's columns (`sft.data.scan`), before any tokenization."""

    # -- bad rows ----------------------------------------------------------------------

    def _scan(self) -> None:
        t0 = time.perf_counter()
        # Every rank scans every file: the result is the same everywhere without communication.
        self.skip_rows, self.bad_rows = scan_source(self.source, self._check_table)
        logger.debug("scanned %d rows in %.2fs", self.source.num_rows, time.perf_counter() - t0)
        if self.bad_rows.count and self.config.on_bad_sample == "error":
            row, reason = self.bad_rows.first()
            raise ValueError(
                f"{self.source.where(row)}: {reason} ({self.bad_rows.count} of {self.source.num_rows} rows have "
                "such problems; fix them, or set data.on_bad_sample=skip to drop them)"
            )

    def _refuse(self, row: int, error: ValueError) -> None:
        """Note a row that failed while tokenizing (skip mode); its reason without the location."""
        self.bad_rows.add(row, str(error).removeprefix(f"{self.source.where(row)}: "))

    # -- storage -----------------------------------------------------------------------

    def _encode_rows(self, rows: Sequence[int], columns: dict[str, list[Any]]) -> list[Encoded | None]:
        """Encoded and fitted rows; in skip mode a row that fails is noted and None."""
        skip = self.config.on_bad_sample == "skip"
        try:
            encoded = self._encode_batch(rows, columns)
        except ValueError as e:
            if not skip:
                raise ValueError(f"{e} (or set data.on_bad_sample=skip to drop such rows)") from e
            if len(rows) == 1:
                self._refuse(rows[0], e)
                return [None]
            # Encode the batch again row by row to find the rows that fail.
            return [
                item
                for k, row in enumerate(rows)
                for item in self._encode_rows([row], {name: [v[k]] for name, v in columns.items()})
            ]
        assert len(encoded) == len(rows), "encode_batch must return one entry per row"
        out: list[Encoded | None] = []
        for row, (ids, mask) in zip(rows, encoded):
            try:
                out.append(self._fit(row, np.asarray(ids, dtype=np.int32), np.asarray(mask, dtype=np.uint8)))
            except ValueError as e:
                if not skip:
                    raise ValueError(f"{e} (or set data.on_bad_sample=skip to drop such rows)") from e
                self._refuse(row, e)
                out.append(None)
        return out

    def _encode_part(self, rows: Sequence[int], columns: dict[str, list[Any]]) -> tuple[np.ndarray, ...] | None:
        """(rows, ids, masks, lengths) of the rows of one batch that keep a trained token."""
        encoded = self._encode_rows(rows, columns)
        kept: list[tuple[int, np.ndarray, np.ndarray]] = []
        for row, item in zip(rows, encoded):
            if item is None:
                continue
            ids, mask = item
            # Token 0 has no context to be predicted from, so it can never be a target.
            if mask[1:].any():
                kept.append((row, ids, mask))
            else:
                self.num_dropped += 1
        if not kept:
            return None
        lengths = np.asarray([len(k[1]) for k in kept], dtype=np.int64)
        mask = np.concatenate([k[2] for k in kept])
        mask[np.cumsum(lengths) - lengths] = 0  # each sample's first token (see above)
        return np.asarray([k[0] for k in kept], dtype=np.int64), np.concatenate([k[1] for k in kept]), mask, lengths

    def _fit(self, row: int, ids: np.ndarray, mask: np.ndarray) -> Encoded:
        assert ids.shape == mask.shape, f"{self.source.where(row)}: ids and loss mask differ in length"
        n = len(ids)
        if n <= self.max_length:
            return ids, mask
        if self.truncation == "error":
            raise ValueError(
                f"{self.source.where(row)}: {n} tokens > data.max_length={self.max_length}; "
                "raise data.max_length or set data.truncation=left or right"
            )
        self.num_truncated += 1
        if self.truncation == "left":
            return ids[-self.max_length :], mask[-self.max_length :]
        return ids[: self.max_length], mask[: self.max_length]

    def _report(self, seconds: float) -> None:
        paths = ", ".join(self.source.paths)
        if self.bad_rows.count:
            row, reason = self.bad_rows.first()
            logger.warning(
                "%d of %d rows of %s skipped as bad (data.on_bad_sample=skip); the first: %s: %s",
                self.bad_rows.count,
                self.source.num_rows,
                paths,
                self.source.where(row),
                reason,
            )
        if self.num_dropped:
            logger.warning(
                "%d of %d rows of %s dropped: no trained token left (after truncation to data.max_length=%d)",
                self.num_dropped,
                self.source.num_rows,
                paths,
                self.max_length,
            )
        if self.num_truncated:
            logger.info(
                "%d rows of %s truncated (%s) to %d tokens", self.num_truncated, paths, self.truncation, self.max_length
            )
        logger.info(
            "tokenized %d rows of %s in %.1fs: %d samples, %d tokens, %d trained",
            self.source.num_rows,
            paths,
            seconds,
            len(self),
            int(self.lengths.sum()),
            self.num_trained,
        )

    # -- access ------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.lengths)

    def origin(self, index: int) -> tuple[str, int]:
        """(parquet path, row in that file) that sample `index` came from."""
        return self.source.origin(int(self.rows[index]))

    def where(self, index: int) -> str:
        return self.source.where(int(self.rows[index]))

    def token_ids(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Unpadded (ids, loss mask) of sample `index` as numpy views of the storage."""
        start, end = self.offsets[index], self.offsets[index + 1]
        return self.input_ids[start:end], self.loss_mask[start:end]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"sample {index} out of range for a dataset of {len(self)}")
        ids, mask = self.token_ids(index)
        n = len(ids)
        size = self.max_length if self.pad_to_max_length else n
        input_ids = torch.full((size,), self.pad_token_id, dtype=torch.long)
        input_ids[:n] = torch.from_numpy(ids.astype(np.int64))
        attention_mask = torch.zeros(size, dtype=torch.long)
        attention_mask[:n] = 1
        position_ids = torch.zeros(size, dtype=torch.long)
        position_ids[:n] = torch.arange(n)
        loss_mask = torch.zeros(size, dtype=torch.long)
        loss_mask[:n] = torch.from_numpy(mask.astype(np.int64))
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "position_ids": position_ids,
            "loss_mask": loss_mask,
        }


# Arguments the datasets set themselves; passing them again would clash or break the masks.
RESERVED_KWARGS = (
    "conversation",
    "tokenize",
    "add_generation_prompt",
    "continue_final_message",
    "return_dict",
    "return_assistant_tokens_mask",
    "sanitize_control_tokens",
)


def _chat_kwargs(kwargs: dict[str, Any] | None) -> dict[str, Any]:
    kwargs = dict(kwargs or {})
    for key in RESERVED_KWARGS:
        if key in kwargs:
            raise ValueError(
                f"data.apply_chat_template_kwargs.{key}={kwargs[key]!r}: set by the dataset itself; remove it"
            )
    return kwargs
