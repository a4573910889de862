"""Checkpoints under `trainer.default_local_dir`, with verl's folder names.

`global_step_N/` holds the sharded model and optimizer (torch.distributed.checkpoint, so a
checkpoint loads on any number of ranks), one `extra_state_rank_R.pt` per rank (scheduler,
RNG, data position, trainer counters) and `huggingface/` (config, generation config,
tokenizer, and with `hf_model` the full weights as safetensors). A folder counts only once
its `COMPLETE` marker exists; `latest_checkpointed_iteration.txt` is replaced atomically
after every rank finished, so a kill at any moment leaves the previous checkpoint usable.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import random
import re
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from transformers import GenerationConfig

from sft.distributed import DistContext

logger = logging.getLogger("sft")

TRACKER = "latest_checkpointed_iteration.txt"
MARKER = "COMPLETE"
STEP_DIR = re.compile(r"^global_step_(\d+)$")
SHARD_BYTES = 5 * 1024**3


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


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


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
        self.hf_dtype = hf_dtype
        self.root = Path(root).expanduser()
        self.ctx = ctx
        self.save_contents = set(save_contents)
        self.load_contents = set(load_contents)
        self.max_keep = max_keep
        self.resumed_from: int | None = None

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
        if self.ctx.is_main:
            if path.exists():  # left behind by a save that was killed: never counted, safe to drop
                shutil.rmtree(path)
            path.mkdir(parents=True)
        dist.barrier(group=self.ctx.world_group)
        if self.save_contents & {"model", "optimizer"}:
            msd, osd = get_state_dict(model, optimizer)
            state = {}
            if "model" in self.save_contents:
                state["model"] = msd
            if "optimizer" in self.save_contents:
                state["optimizer"] = osd
            dcp.save(state, checkpoint_id=str(path / "dcp"), process_group=self.ctx.world_group)
        if "extra" in self.save_contents:
            torch.save({**extra, "rng": rng_state()}, path / f"extra_state_rank_{self.ctx.rank}.pt")
        self._export_hf(path / "huggingface", model, hf_config, tokenizer, generation_config)
        dist.barrier(group=self.ctx.world_group)
        if self.ctx.is_main:
            (path / MARKER).write_text(json.dumps({"step": step, "world_size": self.ctx.world_size}))
            tmp = self.root / f".{TRACKER}.tmp"
            tmp.write_text(str(step))
            os.replace(tmp, self.root / TRACKER)
            self._apply_retention(step)
        dist.barrier(group=self.ctx.world_group)
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if self.ctx.is_main else 0
        logger.info("saved checkpoint %s in %.1f s (%.2f GB)", path, time.perf_counter() - start, size / 1e9)
        return path

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

    def _export_hf(self, out: Path, model: nn.Module, hf_config, tokenizer, generation_config) -> None:
        """Config + tokenizer always; full weights streamed one parameter at a time to rank 0."""
        if self.ctx.is_main:
            out.mkdir(parents=True, exist_ok=True)
            export_config = copy.deepcopy(hf_config)
            export_config.dtype = self.hf_dtype
            export_config.use_cache = True  # the export is for inference
            export_config.save_pretrained(out)
            tokenizer.save_pretrained(out)
            if generation_config is not None:
                generation_config.save_pretrained(out)
        if "hf_model" not in self.save_contents:
            return
        lm = model.lm
        keep = set(lm.state_dict().keys())
        tensors = [(n, p) for n, p in lm.named_parameters()]  # deduplicates tied weights
        tensors += [(n, b) for n, b in lm.named_buffers() if n in keep]
        dtype = self.hf_dtype
        shards: list[dict[str, torch.Tensor]] = [{}]
        size = 0
        for name, t in tensors:
            full = t.full_tensor() if hasattr(t, "full_tensor") else t  # collective: every rank
            if self.ctx.is_main:
                cpu = full.detach().to(dtype=dtype if full.is_floating_point() else full.dtype, device="cpu")
                if size + cpu.numel() * cpu.element_size() > SHARD_BYTES and shards[-1]:
                    shards.append({})
                    size = 0
                shards[-1][name] = cpu.contiguous()
                size += cpu.numel() * cpu.element_size()
            del full
        if self.ctx.is_main:
            _write_safetensors(out, shards)

    # ----- load -----
    def find_resume_step(self, mode: str, resume_from_path: str | None) -> Path | None:
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
        """Load what `trainer.checkpoint.load_contents` asks for; returns this rank's extra state."""
        msd, osd = get_state_dict(model, optimizer)
        state = {}
        if "model" in self.load_contents:
            state["model"] = msd
        if "optimizer" in self.load_contents:
            state["optimizer"] = osd
        if state:
            dcp.load(state, checkpoint_id=str(path / "dcp"), process_group=self.ctx.world_group)
            set_state_dict(
                model,
                optimizer,
                model_state_dict=state.get("model", msd),
                optim_state_dict=state.get("optimizer", osd),
            )
        m = STEP_DIR.match(path.name)
        self.resumed_from = int(m.group(1)) if m else None
        if "extra" not in self.load_contents:
            return None
        extra_file = path / f"extra_state_rank_{self.ctx.rank}.pt"
        if not extra_file.exists():
            extra_file = path / "extra_state_rank_0.pt"  # a different world size: counters are shared
        return torch.load(extra_file, weights_only=False)


def _write_safetensors(out: Path, shards: list[dict[str, torch.Tensor]]) -> None:
    n = len(shards)
    if n == 1:
        save_file(shards[0], out / "model.safetensors", metadata={"format": "pt"})
        return
    weight_map, total = {}, 0
    for i, shard in enumerate(shards, start=1):
        fname = f"model-{i:05d}-of-{n:05d}.safetensors"
        save_file(shard, out / fname, metadata={"format": "pt"})
        for k, v in shard.items():
            weight_map[k] = fname
            total += v.numel() * v.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
