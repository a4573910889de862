"""Build the next step's micro-batches on a background thread while the device runs this one.

Fetching a step (reading samples, packing them, finding the target positions, pinning) takes host time
during which the GPU would sit idle, since the step's one read-back leaves the device with nothing queued.
`prefetched(loader)` yields the same items in the same order, one step ahead; an error raised while
building a step is raised again, unchanged, where that step is asked for.

The build runs Python code (packing) that holds the GIL, while the training thread gives the GIL up and
takes it back around every torch op it launches; at Python's default switch interval each take-back can
wait milliseconds. So while a prefetch thread runs, the interval is at most `SWITCH_INTERVAL_S` (restored
when the last one stops). A thread that builds as soon as a slot frees still competes with the training
thread just when it launches the optimizer and the first forward with the device empty; with a
`BuildWindow` the thread builds only when the training thread opens it, just before it blocks on the
step's read-back (the device still has the whole backward queued), or when the training thread asks for a
step that is not built yet. A build that outlasts the window (slow data: on-the-fly tokenization, a cold
disk) would then make the training thread wait every step, so after `LATE_BUILDS_TO_HOLD` waits longer
than `LATE_WAIT_S` in a row the window stays open for good. Measurements: docs/PERFORMANCE.md.
"""

from __future__ import annotations

import queue
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")

_DONE = object()
SWITCH_INTERVAL_S = 0.0005
LATE_BUILDS_TO_HOLD = 3  # in a row; one late build (a GC pause, a cold page) is not a slow dataset
LATE_WAIT_S = 0.02
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


class BuildWindow:
    """When a prefetch thread may build its next item: opened by the training thread while it waits on
    the device (or asks for an item not built yet), taken by the thread when it starts a build."""

    def __init__(self) -> None:
        self._open = threading.Event()
        self._building = threading.Event()  # from take() until the item is queued: the consumer waits, not reopens
        self.held_open = False  # builds outlast the window: build ahead, as without one
        self._late_in_a_row = 0
        self._late_since: float | None = None  # when the consumer asked for an item whose build was not done

    def open(self) -> None:
        self._open.set()

    def asked(self, ready: bool) -> None:
        """The consumer asks for an item (`ready`: it is queued). Opens the window when nothing is being
        built; notes a possibly late build when the window started one that is not done."""
        self._late_since = None
        if self.held_open:
            self._open.set()  # again: a take that read held_open just before it was set may have shut it
        elif ready:
            pass
        elif not self._open.is_set() and not self._building.is_set():
            self.open()  # asked for an item not built yet: build it now
        else:  # its build, started in the window, is running or about to start
            self._late_since = time.perf_counter()

    def got(self) -> None:
        """The item came: hold the window open after LATE_BUILDS_TO_HOLD late builds in a row that each
        kept the consumer waiting more than LATE_WAIT_S."""
        if self.held_open:
            return
        late = self._late_since is not None and time.perf_counter() - self._late_since > LATE_WAIT_S
        self._late_in_a_row = self._late_in_a_row + 1 if late else 0
        if self._late_in_a_row >= LATE_BUILDS_TO_HOLD:
            self.held_open = True
            self._open.set()

    def take(self, stop: threading.Event) -> bool:
        """Wait until the window opens (True: taking it closes it, and marks a build as running) or `stop`
        is set (False)."""
        while not stop.is_set():
            if self._open.wait(timeout=0.1):
                self._building.set()  # before the window shuts: a consumer never sees it shut with nothing building
                if not self.held_open:
                    self._open.clear()
                return True
        return False

    def built(self) -> None:
        """The item taken for is queued (or the thread stops)."""
        self._building.clear()


class _Failed:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


def prefetched(items: Iterable[T], depth: int = 1, window: BuildWindow | None = None) -> Iterator[T]:
    """Iterate `items` on a daemon thread, at most `depth` items ahead of the consumer; with a `window`,
    each item is built only once the window opens (or the consumer waits for it).

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
        it = iter(items)
        try:
            while window is None or window.take(stop):
                item = next(it, _DONE)
                queued = put(item)
                if window is not None:
                    window.built()
                if not queued or item is _DONE:
                    return
        except BaseException as exc:  # handed to the consumer, raised there
            put(_Failed(exc))
            if window is not None:
                window.built()

    worker = threading.Thread(target=produce, name="sft-prefetch", daemon=True)
    _short_switches(True)
    worker.start()
    try:
        while True:
            if window is not None:
                window.asked(ready=not slots.empty())
            item = slots.get()
            if window is not None:
                window.got()
            if item is _DONE:
                return
            if isinstance(item, _Failed):
                raise item.exc
            yield item
    finally:
        stop.set()
        worker.join()
        _short_switches(False)
