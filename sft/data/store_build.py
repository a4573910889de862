"""Building a dataset's token store: tokenised over the ranks, exchanged, cached and mapped.

`StoreBuild` is mixed into `TokenizedDataset`. `_reuse` maps the cache of this key when every
rank finds it complete. Otherwise `_build` has each rank encode every world-th batch (the result
is identical to one process); with a cache folder the tokens go to per-rank part files, rank 0
assembles and renames them into the cache and every rank maps it read-only; without one (or
when it cannot be written) the ranks exchange the arrays and keep them in memory. Any rank's
answer is shared through `_gather`, so all ranks take the same path.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch.distributed as dist

from sft.data.cache import CachedData, cache_folder, check_cache, fingerprint, open_cache
from sft.data.cache_write import Batch, PartSink, assemble, commit, make_staging, new_nonce, remove_folder
from sft.data.files import expand_paths
from sft.data.scan import BadRows

logger = logging.getLogger("sft")

BATCH_ROWS = 256  # rows converted to Python objects at a time; large enough for batched tokenization


class StoreBuild:
    """The build steps of `TokenizedDataset` (uses its shard, tokenizer, config, source and encoders)."""

    def _gather(self, obj: Any) -> list[Any]:
        """`obj` of every rank of the tokenizing group (just `[obj]` in one process)."""
        if self.shard is None or self.shard.world == 1:
            return [obj]
        out: list[Any] = [None] * self.shard.world
        dist.all_gather_object(out, obj, group=self.shard.group)
        return out

    def _counters(self) -> dict[str, int]:
        """The build's counters (`num_*`, the subclasses' included): summed over ranks and cached."""
        return {k: v for k, v in vars(self).items() if k.startswith("num_") and type(v) is int}

    def _reuse(self, files: str | Sequence[str], max_samples: int, root: Path) -> bool:
        """Map the cache of this key when every rank finds it complete; else note the key for the build."""
        t0 = time.perf_counter()
        kind = f"{type(self).__module__}.{type(self).__qualname__}"
        key, inputs = fingerprint(
            kind, expand_paths(files), max_samples, self.tokenizer, self.config, self._fingerprint_extra()
        )
        self.cache = (root, key, inputs)
        folder = cache_folder(root, key)
        manifest, why = check_cache(folder, key)
        data = None
        if manifest is not None:
            try:
                data = open_cache(folder, manifest)
            except (ValueError, KeyError, AssertionError) as e:
                why = f"inconsistent arrays ({e})"
        if not all(self._gather(data is not None)):
            # Said when the build starts, after the scan: a data error stays the run's only line.
            self._cache_miss = f"tokenised cache {folder}: {why or 'incomplete on another rank'}; tokenizing"
            return False
        self._adopt(data)
        logger.info("tokenised cache reused: %s (same key)", folder)
        self._report(time.perf_counter() - t0)
        return True

    def _adopt(self, data: CachedData) -> None:
        self.input_ids, self.loss_mask, self.offsets = data.input_ids, data.loss_mask, data.offsets
        self.lengths, self.rows, self.source = data.lengths, data.rows, data.source
        for name, value in data.counters.items():
            setattr(self, name, value)
        self.bad_rows = BadRows(data.bad_count, data.bad_samples)
        self.num_trained = data.num_trained

    def _staging(self) -> Path | None:
        """The staging folder rank 0 created, when every rank sees it; None keeps the data in memory."""
        if self.cache is None:
            return None
        root, key, _ = self.cache
        made, why = make_staging(root, key, new_nonce()) if self.shard is None or self.shard.rank == 0 else (None, "")
        made, why = self._gather((str(made) if made else None, why))[0]
        if made is None:
            if self.shard is None or self.shard.rank == 0:
                logger.warning(
                    "tokenised cache folder %s cannot be written (%s); keeping the data in memory", root, why
                )
            return None
        if all(self._gather(Path(made).is_dir())):
            return Path(made)
        if self.shard.rank == 0:
            remove_folder(Path(made))
            logger.warning(
                "tokenised cache folder %s is not on a filesystem every rank sees; keeping the data in memory "
                "(set data.cache_dir to a shared folder)",
                root,
            )
        return None

    def _commit(self, staging: Path, batches: list[Batch]) -> str | None:
        """Rank 0 writes the cache and renames it into place; then every rank maps it. None: done."""
        root, key, _ = self.cache
        final = cache_folder(root, key)
        trouble = None
        if self.shard is None or self.shard.rank == 0:
            try:
                assemble(staging, batches, self._record(key))
                if final.exists() and check_cache(final, key)[0] is None:
                    remove_folder(final)  # a broken cache of this key (killed writer, edited file)
                if not commit(staging, final):
                    logger.info("another job wrote tokenised cache %s first; using it", final)
            except OSError as e:
                trouble = f"{type(e).__name__}: {e}"
        trouble = self._gather(trouble)[0]
        if trouble is not None:
            return trouble
        manifest, why = check_cache(final, key)
        if manifest is None:
            raise ValueError(f"tokenised cache {final} unreadable right after it was written ({why}); remove it")
        self._adopt(open_cache(final, manifest))
        logger.info("tokenised cache written: %s", final)
        return None

    def _record(self, key: str) -> dict[str, Any]:
        src = self.source
        lines = [x for x in src.lines if x is not None]
        return {
            "key": key,
            "inputs": self.cache[2],
            "source": {"paths": src.paths, "starts": src.starts.tolist(), "json": [x is not None for x in src.lines]},
            "lines": np.concatenate(lines) if lines else np.zeros(0, np.int64),
            "counters": self._counters(),
            "bad_rows": {
                "count": self.bad_rows.count,
                "samples": {str(r): w for r, w in self.bad_rows.samples.items()},
            },
            "num_trained": self.num_trained,
        }

    def _build(self) -> None:
        t0 = time.perf_counter()
        if getattr(self, "_cache_miss", None):
            logger.info("%s", self._cache_miss)
        self.num_dropped = 0
        self.num_truncated = 0
        rank, world = (self.shard.rank, self.shard.world) if self.shard else (0, 1)
        staging = self._staging()
        sink = PartSink(staging, rank)
        # One record per batch (not per row) keeps the build's memory overhead small; with a
        # cache the tokens go to this rank's part file and the record holds only where they are.
        mine: list[Batch] = []
        error: str | None = None
        skip = self.skip_rows if self.bad_rows.count else None
        scanned = self.bad_rows
        # From here on only the rows this rank refuses while tokenizing; merged after the exchange.
        self.bad_rows = BadRows()
        try:
            for index, rows, columns in self.source.iter_batches(BATCH_ROWS, rank, world, skip):
                part = self._encode_part(rows, columns)
                if part is not None:
                    mine.append(sink.add(index, *part))
        except ValueError as e:
            error = str(e)  # raised on every rank below: a lone raise would leave the others waiting
        sink.close()
        gathered = self._gather((mine, error, self._counters(), self.bad_rows, sink.error))
        errors = [g[1] for g in gathered if g[1] is not None]
        if errors:
            if staging is not None and rank == 0:
                remove_folder(staging)
            raise ValueError(errors[0])
        for name in gathered[0][2]:
            setattr(self, name, sum(g[2][name] for g in gathered))
        self.bad_rows = BadRows()
        for g in [*gathered, (None, None, None, scanned)]:
            self.bad_rows.merge(g[3])
        batches = sorted((b for g in gathered for b in g[0]), key=lambda b: b.index)  # row order
        self.num_trained = sum(b.trained for b in batches)
        if not batches:
            if staging is not None and rank == 0:
                remove_folder(staging)
            raise ValueError(
                f"{', '.join(self.source.paths)}: no sample to train on ({self.source.num_rows} rows read, "
                f"{self.num_dropped} dropped with no trained token, {self.bad_rows.count} bad); check the files, "
                "data.max_length and data.truncation"
            )
        trouble = next((g[4] for g in gathered if g[4] is not None), None)
        if staging is not None and trouble is None:
            trouble = self._commit(staging, batches)
            if trouble is None:
                return self._report(time.perf_counter() - t0)
        if staging is not None:
            # The cache could not be written: every rank reads its part back and they exchange.
            batches = sorted(
                (b for g in self._gather([b.in_memory(staging) for b in mine]) for b in g), key=lambda b: b.index
            )
            if rank == 0:
                remove_folder(staging)
                logger.warning("tokenised cache not written (%s); the data is kept in memory this time", trouble)
        self._keep(batches)
        self._report(time.perf_counter() - t0)

    def _keep(self, batches: list[Batch]) -> None:
        """The exchanged batches as flat in-memory arrays (no cache)."""
        self.lengths = np.concatenate([b.lengths for b in batches]) if batches else np.zeros(0, np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.lengths)]).astype(np.int64)
        self.input_ids = np.concatenate([b.ids for b in batches]) if batches else np.zeros(0, np.int32)
        self.loss_mask = np.concatenate([b.mask for b in batches]) if batches else np.zeros(0, np.uint8)
        self.rows = np.concatenate([b.rows for b in batches]) if batches else np.zeros(0, np.int64)
