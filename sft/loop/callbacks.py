"""Step callbacks: user code that the trainer calls after each optimizer step's metrics are logged.

A callback is any object with `on_step_end(step, metrics)` (`StepCallback`). The trainer calls the
callbacks of `FSDPSFTTrainer.callbacks` in order, on every rank. Code that cannot reach the trainer
object (a benchmark timing a user's unchanged command line) names callback factories in the
environment variable `SFT_CALLBACKS`: the trainer imports them before it builds anything
(`callback_factories`) and calls them once it is built (`make_callbacks`).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

CALLBACKS_ENV = "SFT_CALLBACKS"
_FIX = f"set {CALLBACKS_ENV} to comma-separated module:factory names (e.g. mypkg.probes:make_probe), or unset it"


@runtime_checkable
class StepCallback(Protocol):
    """Called after step `step` (1-based global step) is logged, with the step's `train/...` metrics.

    Every rank calls it (the metrics are the same global values everywhere), so a callback that runs a
    collective, or a profiler that must see every rank, works; one that writes files checks the rank.
    The metrics dict is the one the loggers got: read it, do not change it.
    """

    def on_step_end(self, step: int, metrics: dict[str, float]) -> None: ...


def _factory(entry: str) -> Callable[[Any], StepCallback | None]:
    module_name, sep, attr = entry.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"{CALLBACKS_ENV}: {entry!r} is not of the form module:factory; {_FIX}")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"{CALLBACKS_ENV}: {entry!r}: cannot import {module_name!r} ({exc}); {_FIX}") from exc
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{CALLBACKS_ENV}: {entry!r}: {module_name} has no attribute {attr!r}; {_FIX}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"{CALLBACKS_ENV}: {entry!r} is not callable; {_FIX}")
    return obj


def callback_factories(spec: str | None = None) -> list[tuple[str, Callable[[Any], StepCallback | None]]]:
    """The `(entry, factory)` pairs named by `spec` (default: the `SFT_CALLBACKS` environment variable), in
    order, imported now: the trainer resolves them before anything expensive, so a bad name fails at once."""
    spec = os.environ.get(CALLBACKS_ENV, "") if spec is None else spec
    return [(entry, _factory(entry)) for entry in (e.strip() for e in spec.split(",")) if entry]


def make_callbacks(
    factories: list[tuple[str, Callable[[Any], StepCallback | None]]], trainer: Any
) -> list[StepCallback]:
    """Call each factory as `factory(trainer)`: it returns a callback, or None to add nothing on this run."""
    callbacks: list[StepCallback] = []
    for entry, factory in factories:
        callback = factory(trainer)
        if callback is None:
            continue
        if not isinstance(callback, StepCallback):
            raise ValueError(
                f"{CALLBACKS_ENV}: {entry!r} returned {type(callback).__name__}, which has no on_step_end(step, "
                f"metrics); return a callback or None"
            )
        callbacks.append(callback)
    return callbacks
