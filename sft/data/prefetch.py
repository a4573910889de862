"""Build the next step's micro-batches on a background thread while the device runs this one.

Fetching a step (reading 128 samples, packing them, finding the target positions, pinning) took
91 ms of host time at the start of every step of the Qwen2.5-1.5B shape and 277 ms of the 0.5B
one on an H200 (profiled, 2026-12-03), with the GPU idle all the while: the step's one read-back
leaves the device with nothing queued. `prefetched(loader)` yields the same items in the same
order, one step ahead. An error raised while building a step is raised again, unchanged, where that
step is asked for.

Building a step runs Python code (packing) that holds the GIL, while the training thread gives the GIL
up and takes it back around every torch op it launches. With Python's default switch interval (5 ms)
each take-back can wait that long: on this project's 2-core VM (`scripts/gil_bench.py`, 5 runs each) a
small torch op beside a Python-busy thread took 0.08-15 ms on average per run (4.9 ms over the runs),
against 0.7-1.6 ms (1.2 ms) with a 0.5 ms interval; in the H200 profile of 2026-12-03 the step's first
ops (host-side sums) took 8-16 ms each with the GPU idle. So while a prefetch thread runs, the interval
is at most `SWITCH_INTERVAL_S` (restored when the last one stops). Its effect on the GPU step is not
measured yet.
"""

from __future__ import annotations

import queue
import sys
import threading
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")

_DONE = object()
SWITCH_INTERVAL_S = 0.0005
_active = 0  # prefetch threads running; the interval is restored when it drops to 0
_saved_interval = 0.0
_lock = threading.Lock()


def _short_switches(on: bool) -> None:
    """Shorten the GIL switch interval while any prefetch thread runs (see the module docstring)."""
    global _active, _saved_interval
    with _lock:
        if on:
            if _active == 0:
                _saved_interval = sys.getswitchinterval()
                sys.setswitchinterval(min(_saved_interval, SWITCH_INTERVAL_S))
            _active += 1
        else:
            _active -= 1
            if _active == 0:
                sys.setswitchinterval(_saved_interval)


class _Failed:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


def prefetched(items: Iterable[T], depth: int = 1) -> Iterator[T]:
    """Iterate `items` on a daemon thread, at most `depth` items ahead of the consumer.

    Leaving the loop early (break, an exception, a preemption) stops the thread: the item it
    holds is dropped, and nothing is read past it.
    """
    slots: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                slots.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(item):
                    return
        except BaseException as exc:  # handed to the consumer, raised there
            put(_Failed(exc))
            return
        put(_DONE)

    worker = threading.Thread(target=produce, name="sft-prefetch", daemon=True)
    _short_switches(True)
    worker.start()
    try:
        while True:
            item = slots.get()
            if item is _DONE:
                return
            if isinstance(item, _Failed):
                raise item.exc
            yield item
    finally:
        stop.set()
        worker.join()
        _short_switches(False)
