"""The tokenised cache: where it lives, its key, and reading a finished one (mapped, never loaded).

A cache is a folder `<data.cache_dir>/sft-<fingerprint>/` of raw little-endian arrays (token ids
int32, loss masks uint8, offsets/lengths/rows int64, JSON-lines line numbers int64) and
`manifest.json` (sizes, sampled hashes, counters, the bad-row sample). `fingerprint` is the one
function that decides the key; `open_cache` checks a folder against its manifest and maps it
read-only, so every rank of a node shares one copy in the page cache. Nothing here unpickles.
Writing (staging, assembly, atomic rename) is in `sft.data.cache_write`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from transformers import PreTrainedTokenizerBase

from sft.config.schema import DataConfig

logger = logging.getLogger("sft")

# Bump when the dataset code's output (ids, masks, kept rows, counters) changes for the same
# inputs: every existing cache is then rebuilt. The data modules' authors own this number.
CACHE_VERSION = "4"
MANIFEST = "manifest.json"
PREFIX = "sft-"
# Data config keys that do not change the tokenised result (batching, loss, the cache itself).
NOT_IN_KEY = (
    "train_files",
    "val_files",
    "train_batch_size",
    "micro_batch_size_per_gpu",
    "max_token_len_per_gpu",
    "micro_batch_size",
    "train_max_samples",
    "val_max_samples",
    "balance_dp_token",
    "use_shm",
    "cache",
    "cache_dir",
)
# name -> little-endian dtype: the files of one cache.
ARRAYS = {
    "input_ids": "<i4",
    "loss_mask": "|u1",
    "offsets": "<i8",
    "lengths": "<i8",
    "rows": "<i8",
    "lines": "<i8",
}
EDGE_BYTES = 1 << 16  # bytes hashed at each end of a data file, and per sampled block of a cache file
SAMPLED_BLOCKS = 32


def cache_location(cache: bool, cache_dir: str | None, default_local_dir: str) -> Path | None:
    """The cache folder the trainer uses: `data.cache_dir`, else `<trainer.default_local_dir>/data_cache`."""
    if not cache:
        return None
    return Path(cache_dir or Path(default_local_dir) / "data_cache").expanduser()


def _file_identity(path: str) -> dict[str, Any]:
    """Path, size, mtime and a hash of the first and last 64 KiB (a parquet file's footer is at the end)."""
    st = os.stat(path)
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        h.update(f.read(EDGE_BYTES))
        if st.st_size > EDGE_BYTES:
            f.seek(max(EDGE_BYTES, st.st_size - EDGE_BYTES))
            h.update(f.read(EDGE_BYTES))
    return {"path": str(Path(path).resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "edges": h.hexdigest()}


def _tokenizer_identity(tok: PreTrainedTokenizerBase) -> dict[str, Any]:
    """A hash of everything in the tokenizer that changes ids: its full definition (vocab, merges,
    normalizer) when it is a fast tokenizer, the vocab otherwise, and the special tokens."""
    h = hashlib.blake2b(digest_size=16)
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tok.get_vocab().items())).encode())
    special = {
        "map": {k: str(v) for k, v in tok.special_tokens_map.items()},
        "added": {int(i): str(t) for i, t in tok.added_tokens_decoder.items()},
        "ids": [tok.bos_token_id, tok.eos_token_id, tok.pad_token_id],
    }
    h.update(json.dumps(special, sort_keys=True).encode())
    return {"tokenizer": h.hexdigest(), "chat_template": getattr(tok, "chat_template", None)}


def fingerprint(
    kind: str,
    paths: Sequence[str],
    max_samples: int,
    tokenizer: PreTrainedTokenizerBase,
    config: DataConfig,
    extra: dict[str, Any] | None = None,
) -> tuple[str, dict[str, Any]]:
    """(key, inputs): the hex key of everything that changes the tokenised result, and those inputs.

    In the key: the dataset class (`kind`), CACHE_VERSION, every data file's identity, the row limit,
    the tokenizer and its chat template, every data config key except those of NOT_IN_KEY
    (max_length, truncation, train_on, the column keys, on_bad_sample, apply_chat_template_kwargs, ...), and what
    the dataset adds in `extra` (a vision dataset: its image processor's settings, which set the image token counts).
    """
    data = asdict(config)
    inputs = {
        "version": CACHE_VERSION,
        "kind": kind,
        "files": [_file_identity(p) for p in paths],
        "max_samples": int(max_samples) if max_samples > 0 else -1,
        **_tokenizer_identity(tokenizer),
        "config": {k: data[k] for k in sorted(data) if k not in NOT_IN_KEY},
        **({"extra": extra} if extra else {}),
    }
    blob = json.dumps(inputs, sort_keys=True, default=str).encode()
    return hashlib.blake2b(blob, digest_size=16).hexdigest(), inputs


def sampled_hash(path: Path, size: int) -> str:
    """Hash of a whole small file, or of 32 blocks spread over a large one (cheap on a warm start)."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        if size <= SAMPLED_BLOCKS * EDGE_BYTES:
            h.update(f.read())
        else:
            step = (size - EDGE_BYTES) // (SAMPLED_BLOCKS - 1)
            for k in range(SAMPLED_BLOCKS):
                f.seek(k * step)
                h.update(f.read(EDGE_BYTES))
    return h.hexdigest()


class CachedSource:
    """Where each sample came from, without reading the data files (stands in for `ParquetSource`)."""

    def __init__(self, paths: list[str], starts: np.ndarray, json_files: list[bool], lines: np.ndarray) -> None:
        self.paths, self.starts = paths, starts
        # lines: the JSON-lines line number of each row of the JSON files, concatenated in file order.
        self.lines: list[np.ndarray | None] = []
        at = 0
        for k, is_json in enumerate(json_files):
            n = int(starts[k + 1] - starts[k])
            self.lines.append(lines[at : at + n] if is_json else None)
            at += n if is_json else 0

    @property
    def num_rows(self) -> int:
        return int(self.starts[-1])

    def origin(self, row: int) -> tuple[str, int]:
        k = int(np.searchsorted(self.starts, row, side="right")) - 1
        return self.paths[k], int(row - self.starts[k])

    def where(self, row: int) -> str:
        path, local = self.origin(row)
        lines = self.lines[self.paths.index(path)]
        return f"{path} line {int(lines[local])}" if lines is not None else f"{path} row {local}"


@dataclass
class CachedData:
    """A finished cache, mapped read-only, plus what the build reported."""

    input_ids: np.ndarray
    loss_mask: np.ndarray
    offsets: np.ndarray
    lengths: np.ndarray
    rows: np.ndarray
    source: CachedSource
    counters: dict[str, int]
    bad_count: int
    bad_samples: dict[int, str]
    num_trained: int


def _map(path: Path, dtype: str, count: int) -> np.ndarray:
    if count == 0:  # an empty file cannot be mapped
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=(count,))


def check_cache(folder: Path, key: str) -> tuple[dict[str, Any] | None, str]:
    """(manifest, "") when `folder` holds a complete cache of `key`, else (None, why not)."""
    if not folder.is_dir():
        return None, "no cache yet"
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        return None, f"unreadable {MANIFEST} ({type(e).__name__}: an incomplete write)"
    if manifest.get("key") != key or manifest.get("version") != CACHE_VERSION:
        return None, "its manifest names another key or version"
    for name, entry in manifest.get("arrays", {}).items():
        path = folder / f"{name}.bin"
        expected = entry["count"] * np.dtype(ARRAYS[name]).itemsize
        try:
            size = path.stat().st_size
        except OSError:
            return None, f"{path.name} is missing"
        if size != expected:
            return None, f"{path.name} has {size} bytes, {expected} expected (truncated or edited)"
        if sampled_hash(path, size) != entry["hash"]:
            return None, f"{path.name} differs from what was written (corrupt or edited)"
    if set(manifest.get("arrays", {})) != set(ARRAYS):
        return None, "its manifest lists other arrays"
    return manifest, ""


def open_cache(folder: Path, manifest: dict[str, Any]) -> CachedData:
    """Map the arrays of a checked cache read-only and restore the build's record."""
    arrays = {name: _map(folder / f"{name}.bin", ARRAYS[name], e["count"]) for name, e in manifest["arrays"].items()}
    offsets, lengths = arrays["offsets"], arrays["lengths"]
    # Cheap consistency of the per-sample arrays (sizes of the big ones were checked already).
    n = len(lengths)
    assert len(offsets) == n + 1 and len(arrays["rows"]) == n, "cache arrays disagree in length"
    if n and (offsets[0] != 0 or offsets[-1] != len(arrays["input_ids"]) or (np.diff(offsets) != lengths).any()):
        raise ValueError("offsets do not match lengths")
    src = manifest["source"]
    source = CachedSource(src["paths"], np.asarray(src["starts"], np.int64), src["json"], arrays["lines"])
    return CachedData(
        input_ids=arrays["input_ids"],
        loss_mask=arrays["loss_mask"],
        offsets=offsets,
        lengths=lengths,
        rows=arrays["rows"],
        source=source,
        counters={k: int(v) for k, v in manifest["counters"].items()},
        bad_count=int(manifest["bad_rows"]["count"]),
        bad_samples={int(r): str(why) for r, why in manifest["bad_rows"]["samples"].items()},
        num_trained=int(manifest["num_trained"]),
    )


def cache_folder(root: Path, key: str) -> Path:
    return root / f"{PREFIX}{key}"
