"""`global_step_N/huggingface/`: config, generation config, tokenizer, and with `hf_model` the full weights.

Each parameter is gathered in turn (a collective on every rank) and rank 0 writes safetensors shards of at
most SHARD_BYTES (+ index); LoRA adapters are folded into their base weights under the plain HF names.
A multimodal checkpoint's export is the whole checkpoint again: its original config, its processor files, and
its frozen tensors (vision tower, projector) exactly as the model folder stored them (sft/models/multimodal.py).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file
from torch import nn

from sft.models.lora import is_lora, merged_tensors
from sft.ops.fp8 import plain_tensor

SHARD_BYTES = 5 * 1024**3


def export_hf(
    out: Path,
    model: nn.Module,
    hf_config,
    tokenizer,
    generation_config,
    err: BaseException | None,
    is_main: bool,
    save_contents: set[str],
    hf_dtype: torch.dtype,
) -> BaseException | None:
    """Config + tokenizer always; full weights streamed one parameter at a time to rank 0.

    Returns this rank's first write error (rank 0 writes; a failure there must not skip the gathers
    the other ranks are already in)."""
    if is_main and err is None:
        try:
            out.mkdir(parents=True, exist_ok=True)
            export_config = copy.deepcopy(hf_config)
            export_config.dtype = hf_dtype
            export_config.get_text_config().use_cache = True  # the export is for inference
            export_config.save_pretrained(out)
            for name, data in model.processor_files.items():  # before the tokenizer's, which win where both write
                (out / name).write_bytes(data)
            tokenizer.save_pretrained(out)
            if generation_config is not None:
                generation_config.save_pretrained(out)
        except OSError as exc:
            err = exc
    if "hf_model" not in save_contents:
        return err
    lm = model.lm
    keep = set(lm.state_dict().keys())
    tensors = [(n, plain_tensor(p)) for n, p in lm.named_parameters()]  # deduplicates tied weights; model.fp8: plain
    tensors += [(n, b) for n, b in lm.named_buffers() if n in keep]
    if is_lora(lm):  # plain HF names, each adapter folded into its base weight (still one gather at a time)
        tensors = merged_tensors(lm, tensors)
    dtype = hf_dtype
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0

    def add(name: str, cpu: torch.Tensor) -> None:
        nonlocal size
        if size + cpu.numel() * cpu.element_size() > SHARD_BYTES and shards[-1]:
            shards.append({})
            size = 0
        shards[-1][name] = cpu.contiguous()
        size += cpu.numel() * cpu.element_size()

    for name, t in tensors:
        full = t.full_tensor() if hasattr(t, "full_tensor") else t  # collective: every rank
        if is_main and err is None:
            add(name, full.detach().to(dtype=dtype if full.is_floating_point() else full.dtype, device="cpu"))
        del full
    if is_main and err is None and model.frozen is not None:  # never cast: the bytes the model folder has
        trained = {name for shard in shards for name in shard}
        for name, cpu in model.frozen.tensors.items():
            assert name not in trained, f"frozen tensor {name} is also a trained one"
            add(name, cpu)
    if is_main and err is None:
        try:
            _write_safetensors(out, shards)
        except (OSError, SafetensorError) as exc:  # safetensors reports I/O errors (disk full) as its own
            err = exc
    return err


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
