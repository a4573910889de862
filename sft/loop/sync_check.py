"""Host-synchronisation guard for the micro-batch loop.

`sync_debug(mode)` runs a region under `torch.cuda.set_sync_debug_mode(mode)` and restores the
previous mode after it: "error" raises on any operation that makes the host wait for the GPU
(`.item()`, `nonzero`, a blocking copy, ...), "warn" warns, "default" does nothing. The trainer
wraps its micro-batch loop in it (`FSDPSFTTrainer.sync_debug`), so a GPU test can prove the loop
never stops the host from running ahead. No-op without CUDA.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def sync_debug(mode: str | int) -> Iterator[None]:
    if mode in ("default", 0) or not torch.cuda.is_available():
        yield
        return
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode(mode)
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)
