"""Merge a sharded training checkpoint into a Hugging Face model folder, on one CPU process.

`python -m sft.merge CKPT/global_step_N OUT [--dtype bf16|fp32] [--shard-size-gb 5]` reads the
model entries of `dcp/` (never the optimizer) a few tensors at a time with DCP's single-process
load, writes safetensors shards (+ index), and copies config, generation config and tokenizer
from `huggingface/`; a LoRA checkpoint's adapters are folded into their base weights
(plain names, scaling from `lora_adapter/adapter_config.json`); a multimodal checkpoint's frozen tensors
(`frozen_weights.safetensors`: vision tower, projector) are written as they are, never cast, so the folder is
the whole checkpoint again. No torchrun or process group;
refusals are one stderr line, exit code 2. Nothing read runs code: DCP through sft/checkpoint/safe_dcp.py,
the adapter config as JSON, the config with AutoConfig (never trust_remote_code).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
import warnings
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from transformers import AutoConfig

from sft.checkpoint.manager import MARKER
from sft.checkpoint.safe_dcp import UnsafeFileError, load_metadata, safe_load
from sft.config.schema import DTYPES, HF_DTYPES
from sft.models.lora import OfflineMerge
from sft.models.multimodal import FROZEN_FILE, is_multimodal, load_frozen

PREFIX = "model.lm."  # "model" is the save_contents entry, "lm." the trainer's wrapper attribute
READ_BYTES = 1024**3  # one dcp.load reads at most this much, so peak memory is ~ one output shard + this
WEIGHT_FILES = ("model.safetensors", "model-", "model.safetensors.index.json", "pytorch_model")


class MergeError(Exception):
    """The input cannot be merged as asked; the message says why."""


def model_entries(dcp_dir: Path) -> list[tuple[str, TensorStorageMetadata]]:
    """(DCP key, metadata) of every model tensor; optimizer entries are never touched."""
    if not (dcp_dir / ".metadata").exists():
        raise MergeError(f"{dcp_dir}: no DCP checkpoint (was 'model' in trainer.checkpoint.save_contents?)")
    meta = load_metadata(dcp_dir / ".metadata")  # allowlisted unpickling: a planted file runs no code
    items = [(k, m) for k, m in meta.state_dict_metadata.items() if k.startswith("model.")]
    if not items:
        raise MergeError(f"{dcp_dir}: no model entries (saved without 'model' in trainer.checkpoint.save_contents)")
    bad = [k for k, m in items if not k.startswith(PREFIX) or not isinstance(m, TensorStorageMetadata)]
    if bad:
        raise MergeError(f"{dcp_dir}: unexpected model entries {bad[:3]} (not tensors under the trainer's 'lm.')")
    return items  # type: ignore[return-value]


def plan_shards(items: list[tuple[str, TensorStorageMetadata]], dtype: torch.dtype, limit: int) -> list[list]:
    """Group entries into output files of at most `limit` bytes (a bigger tensor gets its own file)."""
    shards: list[list] = [[]]
    size = 0
    for key, m in items:
        out_dtype = dtype if m.properties.dtype.is_floating_point else m.properties.dtype
        nbytes = m.size.numel() * out_dtype.itemsize
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append((key, m, out_dtype))
        size += nbytes
    return shards


def read_shard(dcp_dir: Path, entries: list, lora: OfflineMerge | None = None) -> dict[str, torch.Tensor]:
    """Load `entries` from DCP in batches of READ_BYTES and cast each batch at once (LoRA folded in first)."""
    out: dict[str, torch.Tensor] = {}
    batch: dict[str, torch.Tensor] = {}
    casts: dict[str, torch.dtype] = {}

    def flush() -> None:
        with warnings.catch_warnings():  # no_dist=True is the point here; DCP still warns about it
            warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
            safe_load(batch, dcp_dir, no_dist=True)
        for key, t in batch.items():
            name = key[len(PREFIX) :]
            if lora is not None:
                name, t = lora.apply(name, t)
            out[name] = t.to(casts[key]).contiguous()
        batch.clear()

    size = 0
    for key, m, out_dtype in entries:
        batch[key] = torch.empty(m.size, dtype=m.properties.dtype)
        casts[key] = out_dtype
        size += m.size.numel() * m.properties.dtype.itemsize
        if size >= READ_BYTES:
            flush()
            size = 0
    if batch:
        flush()
    return out


def lora_merge(ckpt: Path, items: list[tuple[str, TensorStorageMetadata]]) -> OfflineMerge | None:
    """For a LoRA checkpoint: its (small) adapter tensors, read once, and the scaling; None otherwise."""
    lora = [(k, m, m.properties.dtype) for k, m in items if OfflineMerge.is_lora_key(k)]
    if not lora:
        return None
    try:
        return OfflineMerge(read_shard(ckpt / "dcp", lora), ckpt / "lora_adapter")
    except ValueError as exc:
        raise MergeError(f"{ckpt}: LoRA checkpoint without a readable lora_adapter/ ({exc})") from exc


def frozen_shards(ckpt: Path, config, limit: int) -> list[dict[str, torch.Tensor]]:
    """A multimodal checkpoint's unchanged tensors (as the model folder stored them) in files of at most `limit`
    bytes; [] for a text model."""
    if not is_multimodal(config):
        return []
    if not (ckpt / FROZEN_FILE).is_file():
        raise MergeError(
            f"{ckpt}: a multimodal checkpoint without {FROZEN_FILE} (its vision tensors); merge a checkpoint saved "
            "with 'model' in trainer.checkpoint.save_contents"
        )
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in load_frozen(ckpt / FROZEN_FILE).items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    return [s for s in shards if s]


def merge(ckpt: Path, out: Path, dtype: torch.dtype, shard_bytes: int) -> tuple[int, int, int]:
    """Write the merged folder to `out`; returns (tensors, bytes, files)."""
    if not (ckpt / MARKER).exists():
        raise MergeError(f"{ckpt}: not a complete checkpoint (no {MARKER} marker; the save may have been killed)")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise MergeError(f"{out}: exists and is not empty; refusing to overwrite, choose a new folder")
    hf_dir = ckpt / "huggingface"
    if not (hf_dir / "config.json").exists():
        raise MergeError(f"{hf_dir}: no config.json to copy")
    items = model_entries(ckpt / "dcp")
    config = AutoConfig.from_pretrained(hf_dir)
    if getattr(config, "tie_word_embeddings", False):  # as save_pretrained does: the head is the embedding
        items = [(k, m) for k, m in items if k != PREFIX + "lm_head.weight"]
    lora = lora_merge(ckpt, items)
    if lora is not None:  # adapters are folded into their base weights, not written
        items = [(k, m) for k, m in items if not OfflineMerge.is_lora_key(k)]

    # Build in a hidden sibling and rename at the end, so a crash never leaves a loadable-looking half.
    tmp = out.parent / f".{out.name}.merge-{os.getpid()}"
    tmp.mkdir(parents=True)
    try:
        for p in hf_dir.iterdir():
            if p.name == "config.json" or p.name.startswith(WEIGHT_FILES):
                continue
            (shutil.copytree if p.is_dir() else shutil.copy2)(p, tmp / p.name)
        config.dtype = dtype
        config.save_pretrained(tmp)
        shards = plan_shards(items, dtype, shard_bytes)
        frozen = frozen_shards(ckpt, config, shard_bytes)
        n = len(shards) + len(frozen)
        names = ["model.safetensors"] if n == 1 else [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
        weight_map, total = {}, 0
        for i, name in enumerate(names):
            tensors = read_shard(ckpt / "dcp", shards[i], lora) if i < len(shards) else frozen[i - len(shards)]
            save_file(tensors, tmp / name, metadata={"format": "pt"})
            for k, t in tensors.items():
                assert k not in weight_map, f"{k} written twice"
                weight_map[k] = name
                total += t.numel() * t.element_size()
            del tensors
        if n > 1:
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        if out.exists():
            out.rmdir()  # checked empty above
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return len(weight_map), total, len(names)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sft.merge", description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", type=Path, help="a global_step_N folder")
    ap.add_argument("out_dir", type=Path, help="new (or empty) folder for the Hugging Face model")
    ap.add_argument("--dtype", choices=HF_DTYPES, default="bf16", help="dtype of the written weights")
    ap.add_argument("--shard-size-gb", type=float, default=5.0, help="largest safetensors file (GB)")
    args = ap.parse_args(argv)
    if args.shard_size_gb <= 0:
        ap.error("--shard-size-gb must be positive")
    start = time.perf_counter()
    try:
        n, nbytes, files = merge(args.checkpoint, args.out_dir, DTYPES[args.dtype], int(args.shard_size_gb * 1024**3))
    except (MergeError, UnsafeFileError) as e:
        print(f"sft.merge: error: {e}", file=sys.stderr)
        return 2
    secs = time.perf_counter() - start
    print(f"merged {n} tensors, {nbytes / 1e6:.1f} MB {args.dtype}, {files} file(s) -> {args.out_dir} in {secs:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
