"""Writing the tokenised cache: per-rank part files in a staging folder, one assembly, one rename.

During a cold build every rank appends the batches it tokenised to its own part files in
`<cache_dir>/.tmp-sft-<key>-<nonce>/` (memory: one batch at a time). Global rank 0 then copies
the parts in row order into the final arrays, writes `manifest.json` last, fsyncs, and renames the
staging folder to `sft-<key>`: a reader finds a whole cache or none. Two jobs building the same key
at once each stage their own folder; the first rename wins and the other maps the winner's cache.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sft.data import cache
from sft.data.cache import ARRAYS, MANIFEST, PREFIX, sampled_hash

logger = logging.getLogger("sft")

STALE_S = 3600  # a staging folder of the same key untouched this long was left by a killed launch


@dataclass
class Batch:
    """One encoded batch: its rows and lengths, and its tokens in memory or in a part file."""

    index: int
    rows: np.ndarray
    lengths: np.ndarray
    trained: int
    ids: np.ndarray | None = None
    mask: np.ndarray | None = None
    part: int = -1  # rank whose part file holds the tokens, from token `start`
    start: int = 0

    def tokens(self, staging: Path | None) -> tuple[np.ndarray, np.ndarray]:
        if self.ids is not None:
            return self.ids, self.mask
        assert staging is not None, "a batch in a part file needs the staging folder"
        n = int(self.lengths.sum())
        ids = np.fromfile(
            staging / f"part{self.part}.input_ids", dtype=ARRAYS["input_ids"], count=n, offset=4 * self.start
        )
        mask = np.fromfile(
            staging / f"part{self.part}.loss_mask", dtype=ARRAYS["loss_mask"], count=n, offset=self.start
        )
        assert len(ids) == len(mask) == n, f"part file {self.part} is short"
        return ids, mask

    def in_memory(self, staging: Path | None) -> Batch:
        ids, mask = self.tokens(staging)
        return Batch(self.index, self.rows, self.lengths, self.trained, ids, mask)


class PartSink:
    """Appends this rank's batches to its part files; after a write error, keeps them in memory."""

    def __init__(self, staging: Path | None, rank: int) -> None:
        self.staging, self.rank, self.tokens = staging, rank, 0
        self.error: str | None = None
        self.files = None
        if staging is not None:
            try:
                self.files = [open(staging / f"part{rank}.{name}", "wb") for name in ("input_ids", "loss_mask")]
            except OSError as e:
                self.error = f"{type(e).__name__}: {e}"

    def add(self, index: int, rows: np.ndarray, ids: np.ndarray, mask: np.ndarray, lengths: np.ndarray) -> Batch:
        trained = int(mask.sum())
        if self.files is not None and self.error is None:
            try:
                self.files[0].write(ids.astype(ARRAYS["input_ids"], copy=False).tobytes())
                self.files[1].write(mask.astype(ARRAYS["loss_mask"], copy=False).tobytes())
                batch = Batch(index, rows, lengths, trained, part=self.rank, start=self.tokens)
                self.tokens += len(ids)
                return batch
            except OSError as e:  # disk full: the batches written so far stay readable
                self.error = f"{type(e).__name__}: {e}"
        return Batch(index, rows, lengths, trained, ids, mask)

    def close(self) -> None:
        for f in self.files or []:
            try:
                f.close()
            except OSError as e:
                self.error = self.error or f"{type(e).__name__}: {e}"


def new_nonce() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{time.time_ns()}"


def make_staging(root: Path, key: str, nonce: str) -> tuple[Path | None, str]:
    """Create the staging folder (rank 0): (folder, "") or (None, why it cannot be written)."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        _remove_stale(root, key)
        staging = root / f".tmp-{PREFIX}{key}-{nonce}"
        staging.mkdir()
        return staging, ""
    except OSError as e:
        return None, f"{type(e).__name__}: {e}"


def _remove_stale(root: Path, key: str) -> None:
    """Staging folders of this key that nothing wrote to for STALE_S (a launch killed mid-write)."""
    now = time.time()
    for old in root.glob(f".tmp-{PREFIX}{key}-*"):
        times = [p.stat().st_mtime for p in [old, *old.iterdir()]]
        if now - max(times) > STALE_S:
            shutil.rmtree(old, ignore_errors=True)


def remove_folder(folder: Path) -> None:
    """Move a cache folder aside (one rename) then delete it; used for staging and broken caches."""
    if not folder.exists():
        return
    aside = folder.with_name(f".del-{folder.name}-{new_nonce()}")
    try:
        folder.rename(aside)
    except OSError:
        aside = folder
    shutil.rmtree(aside, ignore_errors=True)


def _write(path: Path, array: np.ndarray, dtype: str) -> dict[str, Any]:
    array.astype(dtype, copy=False).tofile(path)
    return {"count": int(len(array)), "hash": sampled_hash(path, path.stat().st_size)}


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def assemble(staging: Path, batches: list[Batch], record: dict[str, Any]) -> None:
    """Write the final arrays (batches in row order) and, last, the manifest into `staging`.

    `record`: key, inputs, source (paths, starts, json flags), lines, counters, bad_rows, num_trained.
    """
    arrays: dict[str, dict[str, Any]] = {}
    with open(staging / "input_ids.bin", "wb") as fi, open(staging / "loss_mask.bin", "wb") as fm:
        for b in batches:
            ids, mask = b.tokens(staging)
            fi.write(ids.astype(ARRAYS["input_ids"], copy=False).tobytes())
            fm.write(mask.astype(ARRAYS["loss_mask"], copy=False).tobytes())
    for name in ("input_ids", "loss_mask"):
        path = staging / f"{name}.bin"
        arrays[name] = {
            "count": path.stat().st_size // np.dtype(ARRAYS[name]).itemsize,
            "hash": sampled_hash(path, path.stat().st_size),
        }
    lengths = np.concatenate([b.lengths for b in batches]) if batches else np.zeros(0, np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    rows = np.concatenate([b.rows for b in batches]) if batches else np.zeros(0, np.int64)
    for name, array in (("lengths", lengths), ("offsets", offsets), ("rows", rows), ("lines", record["lines"])):
        arrays[name] = _write(staging / f"{name}.bin", array, ARRAYS[name])
    for part in staging.glob("part*"):
        part.unlink()
    for name in arrays:
        _fsync(staging / f"{name}.bin")
    manifest = {
        "version": cache.CACHE_VERSION,  # read at call time: bumped in one place
        "key": record["key"],
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "num_samples": len(lengths),
        "num_tokens": int(offsets[-1]),
        "num_trained": record["num_trained"],
        "arrays": arrays,
        "source": record["source"],
        "counters": record["counters"],
        "bad_rows": record["bad_rows"],
        "inputs": record["inputs"],
    }
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=1, default=str))
    _fsync(staging / MANIFEST)


def commit(staging: Path, final: Path) -> bool:
    """Rename the staging folder to the cache folder; False when another job's cache got there first."""
    try:
        os.rename(staging, final)
    except OSError:  # `final` exists and is not empty: another writer won the race
        remove_folder(staging)
        return False
    _fsync(final.parent)
    return True
