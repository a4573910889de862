"""Metric sinks: `MetricsLogger` and the backends of `trainer.logger`.

`MetricsLogger` fans one `log(dict, step)` out to the backends named in `trainer.logger`
(console, file -> metrics.jsonl, wandb, tensorboard); only rank 0 builds any. `LOGGER_BACKENDS`
is the one list of backend names: the config checks read it from here.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib.util
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from typing import Any

logger = logging.getLogger("sft")

LOGGER_BACKENDS = ("console", "file", "wandb", "tensorboard")


def _human(x: float) -> str:
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.1f}{suffix}"
    return f"{x:.0f}"


# Keys shown on the console train line / progress bar, in order. Every key still reaches
# the file/wandb/tensorboard sinks; the console stays short on purpose.
_TRAIN_FIELDS: tuple[tuple[str, Callable[[float], str]], ...] = (
    ("train/loss", lambda v: f"loss {v:.4f}"),
    ("train/lr", lambda v: f"lr {v:.3g}"),
    ("train/grad_norm", lambda v: f"gnorm {v:.3g}"),
    ("train/tokens_per_s_per_gpu", lambda v: f"{_human(v)} tok/s/gpu"),
    ("train/mfu_model", lambda v: f"mfu {v:.1%}"),
    ("train/mfu", lambda v: f"mfu {v:.1%}"),
    ("train/token_accuracy", lambda v: f"acc {v:.1%}"),
    ("train/peak_mem_gb", lambda v: f"mem {v:.1f} GB"),
    ("train/step_time_s", lambda v: f"{v:.2f} s"),
)


class _Console:
    """Rank 0's console: a live progress bar on a terminal, plain log lines otherwise.

    The bar (tqdm, on stderr where the log goes) shows steps, elapsed time, ETA and the
    train fields; other log lines are routed through it so they do not tear it. When
    stderr is not a terminal (a log file, `| tee`, CI) carriage-return bars would be
    garbage, so each step becomes one line with its own ETA.
    """

    def __init__(self, total_steps: int) -> None:
        self.total_steps = total_steps
        self.use_bar = sys.stderr.isatty()
        self._bar: Any = None
        self._redirect = contextlib.ExitStack()
        # The first logged step is the anchor: it carries compile/warm-up cost, and
        # measuring from it makes the mean robust to logging only every k steps.
        self._anchor: tuple[int, float] | None = None

    def _eta(self, step: int) -> str:
        now = time.perf_counter()
        if self._anchor is None or step <= self._anchor[0]:
            self._anchor = (step, now)
            return ""
        mean_step_s = (now - self._anchor[1]) / (step - self._anchor[0])
        left = max(0, self.total_steps - step) * mean_step_s
        pct = 100.0 * step / max(1, self.total_steps)
        return f"ETA {datetime.timedelta(seconds=round(left))} ({pct:.0f}%)"

    def _advance_bar(self, step: int, fields: list[str]) -> None:
        if self._bar is None:
            from tqdm import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm

            # Created at the first logged step with it counted as done (a resumed run starts
            # mid-way), so tqdm's rate and ETA leave out the warm-up step.
            self._bar = tqdm(
                total=self.total_steps, initial=step, unit="step", desc="train", file=sys.stderr, dynamic_ncols=True
            )
            # Route the `sft` log lines (checkpoints, val loss) above the bar; only when
            # setup_logging gave it a console handler, else tqdm's would print them twice.
            if logger.handlers:
                self._redirect.enter_context(logging_redirect_tqdm(loggers=[logger]))
        else:
            self._bar.update(step - self._bar.n)
        self._bar.set_postfix_str(" | ".join(fields))

    def log(self, metrics: dict[str, float], step: int) -> None:
        head = [f"step {step}/{self.total_steps}"]
        if any(k.startswith("train/") for k in metrics):
            fields = [fmt(float(metrics[k])) for k, fmt in _TRAIN_FIELDS if k in metrics]
            if self.use_bar:
                self._advance_bar(step, fields)
            else:
                eta = self._eta(step)
                logger.info(" | ".join(head + fields + ([eta] if eta else [])))
        val = sorted((k[4:], v) for k, v in metrics.items() if k.startswith("val/"))
        if val:
            logger.info(" | ".join(head + [f"val {k} {v:.4f}" for k, v in val]))

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        self._redirect.close()


def _jsonable(value: Any) -> Any:
    if isinstance(value, bool | int | float | str) or value is None:
        return value
    return float(value)  # 0-d tensors, numpy scalars


class _JsonlFile:
    """Appends `{"step": N, ...}` lines; never truncates, so a resumed run keeps history."""

    def __init__(self, out_dir: str) -> None:
        os.makedirs(out_dir, exist_ok=True)
        self.path = os.path.join(out_dir, "metrics.jsonl")
        self._fh = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())

    def log(self, metrics: dict[str, float], step: int) -> None:
        record = {"step": step, **{k: _jsonable(v) for k, v in metrics.items()}}
        self._fh.write(json.dumps(record) + "\n")
        # Flush per line: a crash must not lose the steps that led up to it.
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


class _Wandb:
    def __init__(
        self,
        out_dir: str,
        project: str,
        experiment: str,
        config: dict,
        run_id: str | None,
    ) -> None:
        import wandb  # lazy: only runs that ask for wandb pay for (or need) the import

        os.makedirs(out_dir, exist_ok=True)
        self.run = wandb.init(
            project=project,
            name=experiment,
            config=config,
            dir=out_dir,
            id=run_id,
            resume="allow" if run_id else None,
        )
        self.run_id: str = self.run.id

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log({k: _jsonable(v) for k, v in metrics.items()}, step=step)

    def close(self) -> None:
        import wandb

        self.run.finish()
        # finish() returns before wandb's service has flushed the run log; teardown waits for
        # it, so an offline run folder is complete (ready for `wandb sync`) once close() returns.
        wandb.teardown()


class _TensorBoard:
    def __init__(self, out_dir: str) -> None:
        from torch.utils.tensorboard import SummaryWriter  # lazy: pulls in tensorboard

        self.writer = SummaryWriter(os.path.join(out_dir, "tensorboard"))

    def log(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, float(value), global_step=step)

    def close(self) -> None:
        self.writer.close()


class MetricsLogger:
    """Sends each `log(metrics, step)` to every backend of `trainer.logger` on rank 0.

    Other ranks hold no backend and import nothing, so every call is a no-op there.
    `run_id` is the wandb run id (None without wandb) for a checkpoint to store, so that
    a resumed run passes it back and continues the same wandb run.
    """

    def __init__(
        self,
        backends: list[str],
        out_dir: str,
        project: str,
        experiment: str,
        config: dict,
        total_steps: int,
        rank: int,
        resume: bool = False,
        run_id: str | None = None,
    ) -> None:
        # Checked on every rank, so a typo fails everywhere instead of hanging the others.
        for name in backends:
            if name not in LOGGER_BACKENDS:
                raise ValueError(
                    f"trainer.logger contains {name!r}, which is not a logger; choose from {list(LOGGER_BACKENDS)}."
                )
            # Found before training (and on every rank) rather than as an ImportError on rank 0.
            if name in ("wandb", "tensorboard") and importlib.util.find_spec(name) is None:
                raise ValueError(
                    f"trainer.logger contains {name!r} but the {name} package is not installed; "
                    f"`pip install {name}` (or `bash scripts/setup.sh trackers`), or remove it from trainer.logger."
                )
        self.run_id: str | None = None
        self._sinks: list[Any] = []
        if rank != 0:
            return
        # `resume` only changes what we say: the file sink always appends and wandb
        # resumes whenever a run id is given.
        if resume:
            logger.info("metrics: resuming (wandb run id %s)", run_id)
        for name in dict.fromkeys(backends):  # de-duplicate, keep order
            if name == "console":
                self._sinks.append(_Console(total_steps))
            elif name == "file":
                self._sinks.append(_JsonlFile(out_dir))
            elif name == "wandb":
                sink = _Wandb(out_dir, project, experiment, config, run_id)
                self.run_id = sink.run_id
                self._sinks.append(sink)
            else:
                self._sinks.append(_TensorBoard(out_dir))

    def log(self, metrics: dict[str, float], step: int) -> None:
        for sink in self._sinks:
            sink.log(metrics, step)

    def close(self) -> None:
        sinks, self._sinks = self._sinks, []  # closing twice is harmless
        for sink in sinks:
            sink.close()
