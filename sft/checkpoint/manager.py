"""Checkpoints under `trainer.default_local_dir`, with verl's folder names.

`global_step_N/` holds the sharded model and optimizer (torch.distributed.checkpoint, so a
checkpoint loads on any number of ranks), per rank `extra_state_rank_R.json` +
`rng_state_rank_R.safetensors` (scheduler, RNG, data position, counters: sft/checkpoint/extra_state.py)
and `huggingface/` (sft/checkpoint/hf_export.py), plus `lora_adapter/` for LoRA runs (PEFT's layout) and, for a
multimodal checkpoint, `frozen_weights.safetensors` (its vision side, as the model folder stores it).
Loading runs no code from the folder: DCP through sft/checkpoint/safe_dcp.py, no pickle anywhere. A folder counts only once
its `COMPLETE` marker exists; `latest_checkpointed_iteration.txt` is replaced atomically
after every rank finished, so a kill at any moment leaves the previous checkpoint usable.

Faults: a write that fails on any rank (disk full, unwritable folder) is agreed on by all
ranks before the marker; every rank raises `CheckpointWriteError`, the incomplete folder is
removed and the tracker and earlier checkpoints stay as they were. On auto-resume, a complete
checkpoint that does not load (files deleted or corrupt) is skipped with a warning and the
previous complete one is tried, newest first (its marker is renamed to `BROKEN` so the step is
saved afresh); we prefer losing a few steps to stopping a relaunched job. An explicit
`trainer.resume_from_path` never falls back: it fails instead.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors import SafetensorError
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from transformers import GenerationConfig

from sft.checkpoint import extra_state
from sft.checkpoint.hf_export import export_hf
from sft.checkpoint.safe_dcp import UnsafeFileError, safe_load
from sft.config.errors import either
from sft.config.schema import CONTENTS, RESUME_MODES
from sft.models.lora import adapter_config, adapter_state, is_lora, write_adapter
from sft.models.multimodal import FROZEN_FILE
from sft.ops.fp8 import plain_state_dict
from sft.parallel.distributed import DistContext

logger = logging.getLogger("sft")

TRACKER = "latest_checkpointed_iteration.txt"
MARKER = "COMPLETE"
BROKEN = "BROKEN"
STEP_DIR = re.compile(r"^global_step_(\d+)$")


def complete_steps(root: Path) -> list[int]:
    """Steps of the complete checkpoints on disk, oldest first (also those of earlier runs)."""
    if not root.is_dir():
        return []
    steps = []
    for p in root.iterdir():
        m = STEP_DIR.match(p.name)
        if m and (p / MARKER).exists():
            steps.append(int(m.group(1)))
    return sorted(steps)


class CheckpointWriteError(ValueError):
    """A checkpoint could not be written (disk full, permissions); raised on every rank with one line."""


class CheckpointLoadError(ValueError):
    """No checkpoint to resume from could be loaded."""


class UnsafeCheckpointError(CheckpointLoadError):
    """A checkpoint file would run code if read as it asks (a pickle): refused on every rank with one line."""


def _refusal(err: BaseException | None) -> str | None:
    """The one-line refusal when `err` (or a rank's error inside DCP's CheckpointException) is UnsafeFileError."""
    if isinstance(err, CheckpointException):
        inner = [e for e, _ in err.failures.values()] if err.failures else []
        return next((r for r in map(_refusal, inner) if r is not None), None)
    if isinstance(err, UnsafeFileError):
        return f"refused to load checkpoint: {err}"
    return None


def _free_space(path: Path) -> str:
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return f"{shutil.disk_usage(path).free / 1e9:.2f} GB free on {path}"
    except OSError:
        return f"free space of {path} unknown"


def _describe(err: BaseException) -> str:
    """One line for an error; DCP's CheckpointException wraps the ranks' errors with tracebacks: take the first."""
    if isinstance(err, CheckpointException) and err.failures:
        rank, (inner, _) = next(iter(sorted(err.failures.items())))
        return f"rank {rank}: {_describe(inner)}"
    return " ".join(f"{type(err).__name__}: {err}".split())[:300]


class FSDPCheckpointManager:
    def __init__(
        self,
        root: str,
        ctx: DistContext,
        save_contents: list[str],
        load_contents: list[str],
        max_keep: int | None,
        hf_dtype: torch.dtype = torch.bfloat16,
    ) -> None:
        for key, contents in (("save_contents", save_contents), ("load_contents", load_contents)):
            unknown = sorted(set(contents) - set(CONTENTS))
            if unknown:
                raise ValueError(f"trainer.checkpoint.{key}: unknown {unknown}; choose from {either(CONTENTS)}")
        self.hf_dtype = hf_dtype
        self.root = Path(root).expanduser()
        self.ctx = ctx
        self.save_contents = set(save_contents)
        self.load_contents = set(load_contents)
        self.max_keep = max_keep
        self.resumed_from: int | None = None
        self.loaded_path: Path | None = None
        self.fallback = False

    # ----- save -----
    def save(
        self,
        step: int,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        extra: dict,
        hf_config,
        tokenizer,
        generation_config: GenerationConfig | None,
    ) -> Path:
        path = self.root / f"global_step_{step}"
        if step in complete_steps(self.root):
            return path
        start = time.perf_counter()
        err: BaseException | None = None
        if self.ctx.is_main:
            try:
                if path.exists():  # left behind by a failed or killed save: never counted, safe to drop
                    shutil.rmtree(path)
                path.mkdir(parents=True)
            except OSError as exc:
                err = exc
        self._agree_saved(path, err)
        try:
            if self.save_contents & {"model", "optimizer"}:
                state, _, _ = _dcp_state(model, optimizer, self.save_contents)
                # Collective; DCP hands a failed write on one rank to every rank as CheckpointException.
                dcp.save(state, checkpoint_id=str(path / "dcp"), process_group=self.ctx.world_group)
        except (OSError, CheckpointException) as exc:
            err = exc
        if err is None and "model" in self.save_contents and model.frozen is not None and self.ctx.is_main:
            try:  # a multimodal checkpoint's unchanged tensors, for sft.merge (resume reads the model folder)
                model.frozen.save(path / FROZEN_FILE)
            except (OSError, SafetensorError) as exc:
                err = exc
        if err is None and "extra" in self.save_contents:
            try:
                extra_state.write(path, self.ctx.rank, extra)
            except (OSError, SafetensorError) as exc:
                err = exc
        # Every rank joins the export's gathers (as long as the ranks agree so far), even after a local error.
        err = self._export_hf(path / "huggingface", model, hf_config, tokenizer, generation_config, err)
        if is_lora(model.lm):  # small, so always written: loads with PeftModel.from_pretrained on the base model
            state = adapter_state(model.lm)  # collective: every rank gathers
            if self.ctx.is_main and err is None:
                try:
                    base = getattr(hf_config, "_name_or_path", None)
                    config = adapter_config(model.lm, base, full_paths=model.frozen is not None)
                    write_adapter(path / "lora_adapter", state, config)
                except (OSError, SafetensorError) as exc:
                    err = exc
        self._agree_saved(path, err)
        if self.ctx.is_main:
            try:
                (path / MARKER).write_text(json.dumps({"step": step, "world_size": self.ctx.world_size}))
                tmp = self.root / f".{TRACKER}.tmp"
                tmp.write_text(str(step))
                os.replace(tmp, self.root / TRACKER)
            except OSError as exc:
                err = exc
        self._agree_saved(path, err)
        if self.ctx.is_main:
            self._apply_retention(step)
        dist.barrier(group=self.ctx.world_group)
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if self.ctx.is_main else 0
        logger.info("saved checkpoint %s in %.1f s (%.2f GB)", path, time.perf_counter() - start, size / 1e9)
        return path

    def _agree_saved(self, path: Path, err: BaseException | None) -> None:
        """All ranks learn whether any rank failed (a lone raise would leave the others hanging in a
        collective); on failure the folder is dropped and every rank raises the same line."""
        failed = torch.tensor([int(err is not None)], device=self.ctx.device)
        dist.all_reduce(failed, op=dist.ReduceOp.MAX, group=self.ctx.world_group)
        if not failed.item():
            return
        errors: list[str | None] = [None] * self.ctx.world_size
        mine = None if err is None else _describe(err)
        dist.all_gather_object(errors, mine, group=self.ctx.world_group)
        rank, first = next((r, e) for r, e in enumerate(errors) if e is not None)
        if self.ctx.is_main:
            shutil.rmtree(path, ignore_errors=True)  # never counted (no marker is left); frees the space it took
        dist.barrier(group=self.ctx.world_group)
        tracker = self.root / TRACKER
        kept = f"step {tracker.read_text().strip()}" if tracker.exists() else "none"
        raise CheckpointWriteError(
            f"could not write checkpoint {path} (rank {rank}: {first}); {_free_space(self.root)}; the incomplete "
            f"folder was removed and the last complete checkpoint ({kept}) is untouched; free space or point "
            "trainer.default_local_dir at a writable disk, then relaunch to resume"
        )

    def _apply_retention(self, newest: int) -> None:
        if self.max_keep is None:
            return
        steps = complete_steps(self.root)
        keep = set(steps[-self.max_keep :]) | {newest}
        if self.resumed_from is not None:
            keep.add(self.resumed_from)
        for s in steps:
            if s not in keep:
                shutil.rmtree(self.root / f"global_step_{s}", ignore_errors=True)

    def _export_hf(
        self, out: Path, model: nn.Module, hf_config, tokenizer, generation_config, err: BaseException | None
    ) -> BaseException | None:
        return export_hf(
            out,
            model,
            hf_config,
            tokenizer,
            generation_config,
            err,
            self.ctx.is_main,
            self.save_contents,
            self.hf_dtype,
        )

    # ----- load -----
    def find_resume_step(self, mode: str, resume_from_path: str | None) -> Path | None:
        if mode not in RESUME_MODES:
            raise ValueError(f"trainer.resume_mode={mode!r}: choose {either(RESUME_MODES)}")
        self.fallback = mode == "auto"  # only a checkpoint we picked ourselves may be swapped for an older one
        if mode == "disable":
            return None
        if mode == "resume_path":
            p = Path(resume_from_path).expanduser()
            if not (p / MARKER).exists():
                raise ValueError(f"trainer.resume_from_path={p}: not a complete checkpoint folder (no {MARKER} marker)")
            return p
        steps = complete_steps(self.root)
        return self.root / f"global_step_{steps[-1]}" if steps else None

    def load(self, path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict | None:
        """Load what `trainer.checkpoint.load_contents` asks for; returns this rank's extra state.

        On auto-resume, a checkpoint that fails to load on any rank is skipped for the previous
        complete one (all ranks agree); `self.loaded_path` names the one actually loaded."""
        m = STEP_DIR.match(path.name)
        older = [s for s in complete_steps(self.root) if m and s < int(m.group(1))] if self.fallback else []
        candidates = [path] + [self.root / f"global_step_{s}" for s in reversed(older)]
        failures = []
        for candidate in candidates:
            err: BaseException | None = None
            try:
                extra = self._load_one(candidate, model, optimizer)
            except (Exception, CheckpointException) as exc:  # any damage (missing file, bad pickle): try older
                err, extra = exc, None
            refused = _refusal(err)
            flags = torch.tensor([int(err is not None), int(refused is not None)], device=self.ctx.device)
            dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.ctx.world_group)
            if flags[1].item():  # a file that would run code: never skipped for an older one, never unpickled
                lines: list[str | None] = [None] * self.ctx.world_size
                dist.all_gather_object(lines, refused, group=self.ctx.world_group)
                raise UnsafeCheckpointError(next(x for x in lines if x is not None))
            if not flags[0].item():
                m = STEP_DIR.match(candidate.name)
                self.resumed_from = int(m.group(1)) if m else None
                self.loaded_path = candidate
                if candidate != path:
                    logger.warning("resuming from %s instead of %s, which could not be loaded", candidate, path)
                return extra
            why = _describe(err) if err is not None else "failed on another rank"
            failures.append(f"{candidate} ({why})")
            if not self.fallback:
                break
            logger.warning("checkpoint %s could not be loaded (%s); trying the previous complete one", candidate, why)
            if self.ctx.is_main and (candidate / MARKER).exists():
                # No longer counted as complete: a later save of this step writes it afresh instead of skipping it.
                os.replace(candidate / MARKER, candidate / BROKEN)
            dist.barrier(group=self.ctx.world_group)
        raise CheckpointLoadError(
            f"no checkpoint could be loaded: {'; '.join(failures)}; remove the damaged folders from "
            f"{self.root} (or set trainer.resume_mode=disable to start afresh)"
        )

    def _load_one(self, path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict | None:
        # A failed attempt may leave some tensors overwritten; the next attempt loads the same keys over them.
        state, msd, osd = _dcp_state(model, optimizer, self.load_contents)
        if state:
            safe_load(state, path / "dcp", process_group=self.ctx.world_group)  # runs no pickle from the folder
            set_state_dict(
                model,
                optimizer,
                model_state_dict=state.get("model", msd),
                optim_state_dict=state.get("optimizer", osd),
            )
        if "extra" not in self.load_contents:
            return None
        return extra_state.read(path, self.ctx.rank)  # rank 0's after a change of world size: counters are shared


def _dcp_state(model: nn.Module, optimizer: torch.optim.Optimizer, contents: set[str]) -> tuple[dict, dict, dict]:
    """The part of {model, optimizer} sharded state that `contents` names, plus both full dicts."""
    msd, osd = get_state_dict(model, optimizer)
    msd = plain_state_dict(msd)  # model.fp8's FP8-gathered weights as the plain master tensors they wrap
    state = {k: v for k, v in (("model", msd), ("optimizer", osd)) if k in contents}
    return state, msd, osd
