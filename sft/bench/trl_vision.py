"""TRL's SFTTrainer on image chats, in its own process: the baseline of `python -m sft.bench.vision`.

`python -m sft.bench.trl_vision --model DIR --data FILE --out-dir D ...` trains the model folder's own class
(Qwen2_5_VLForConditionalGeneration, what AutoModelForImageTextToText loads) on the same verl-layout rows, turned
into TRL's vision format (content lists with {"type": "image"} parts, `images` as HF Image features), with the
folder's processor built as sft builds it (no video processor) and a template that renders as ours does, with
`{% generation %}` markers for TRL's assistant-only loss (transformers >= 5.18 only; older ones train every
token). TRL 1.16 refuses packing and padding-free for vision datasets, so batches are padded; its fused LM head
keeps the logits out of memory. D/steps.jsonl gets one line per optimizer step, written as the step ends (GPU
synchronized), in the step probe's format (sft/bench/profiling.py), so a run stopped by a time limit keeps what it
did. trl and datasets are optional: imported here only.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

TRL_MISSING = (
    "sft.bench.vision: the TRL baseline needs the optional packages trl and datasets: pip install trl datasets"
)


def trl_available() -> bool:
    return all(importlib.util.find_spec(m) is not None for m in ("trl", "datasets"))


def liger_available() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None


def as_parts(messages: list[dict[str, Any]], tag: str = "<image>") -> list[dict[str, Any]]:
    """verl's string contents with `<image>` placeholders -> content lists of text and image parts, in place."""
    out = []
    for m in messages:
        parts: list[dict[str, Any]] = []
        for k, piece in enumerate(m["content"].split(tag)):
            if k:
                parts.append({"type": "image", "text": None})
            if piece:
                parts.append({"type": "text", "text": piece})
        out.append({"role": m["role"], "content": parts})
    return out


def trl_dataset(parquet: Path) -> Any:
    """The rows as a `datasets.Dataset`: messages of parts, images decoded to PIL by HF's Image feature on access."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(parquet, columns=["messages", "images"])
    part = pa.struct([("type", pa.string()), ("text", pa.string())])
    message = pa.struct([("role", pa.string()), ("content", pa.list_(part))])
    messages = pa.array([as_parts(m) for m in table.column("messages").to_pylist()], pa.list_(message))
    ds = datasets.Dataset(pa.table({"messages": messages, "images": table.column("images").combine_chunks()}))
    return ds.cast_column("images", datasets.List(datasets.Image()))


def _counts(inputs: dict[str, Any]) -> list[float]:
    """[real tokens, trained tokens, padded slots] of one micro-batch, from its host tensors (no GPU sync)."""
    mask, labels = inputs["attention_mask"], inputs["labels"]
    return [float(mask.sum()), float((labels[..., 1:] != -100).sum()), float(mask.numel())]


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    import transformers
    import trl
    from packaging.version import Version
    from transformers import AutoTokenizer, TrainerCallback

    from sft.bench.vision_assets import TRL_CHAT_TEMPLATE
    from sft.data.processor import load_processor

    cuda = torch.cuda.is_available()
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    steps_file = out_dir / "steps.jsonl"
    steps_file.write_text("")
    processor = load_processor(args.model, AutoTokenizer.from_pretrained(args.model))
    processor.chat_template = TRL_CHAT_TEMPLATE
    # TRL refuses assistant-only loss on images before transformers 5.18 (the processor's assistant mask).
    assistant_only = Version(transformers.__version__) >= Version("5.18.0.dev0")
    accum = max(1, args.global_batch // args.per_device)
    if accum * args.per_device != args.global_batch:
        raise ValueError(f"--global-batch {args.global_batch} is not a multiple of --per-device {args.per_device}")
    dtype = {"bf16": "bfloat16", "fp32": "float32"}[args.dtype]
    # transformers 5.25 renames gradient_checkpointing to activation_checkpointing (the old name warns).
    fields = {f.name for f in dataclasses.fields(trl.SFTConfig)}
    ckpt = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    config = trl.SFTConfig(
        output_dir=str(out_dir / "trainer"),
        max_steps=args.steps,
        per_device_train_batch_size=args.per_device,
        gradient_accumulation_steps=accum,
        max_length=args.max_length,
        assistant_only_loss=assistant_only,
        bf16=cuda,
        use_cpu=not cuda,
        **{ckpt: args.gradient_checkpointing, f"{ckpt}_kwargs": {"use_reentrant": False}},
        learning_rate=args.lr,
        weight_decay=args.weight_decay,
        adam_beta1=args.betas[0],
        adam_beta2=args.betas[1],
        max_grad_norm=args.clip_grad,
        lr_scheduler_type="cosine",
        warmup_steps=0,
        dataloader_num_workers=args.workers,
        use_liger_kernel=args.liger,
        logging_steps=args.steps,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=args.seed,
        model_init_kwargs={"dtype": dtype, "attn_implementation": args.attn},
    )
    pending: list[list[float]] = []  # this step's micro-batch counts
    losses: list[Any] = []
    state = {"step": 0}

    class Counting(trl.SFTTrainer):
        def training_step(self, model, inputs, *rest, **kw):
            pending.append(_counts(inputs))  # host tensors: the trainer moves them to the GPU inside
            loss = super().training_step(model, inputs, *rest, **kw)
            losses.append(loss)
            return loss

    class StepLines(TrainerCallback):
        def on_step_end(self, args_, st, control, **kw):
            if cuda:
                torch.cuda.synchronize()
            t = time.time()
            state["step"] += 1
            tokens, trained, slots = (sum(col) for col in zip(*pending)) if pending else (0.0, 0.0, 0.0)
            line = {
                "step": state["step"],
                "t": t,
                "world_size": 1,
                "total_tokens": tokens,
                "trained_tokens": trained,
                "padded_tokens": slots,
                "padding_frac": 1.0 - tokens / slots if slots else None,
                "loss": sum(float(x) for x in losses),  # each micro-batch's share of the step's mean
                "peak_mem_gb": torch.cuda.max_memory_allocated() / 1024**3 if cuda else None,
            }
            with open(steps_file, "a") as f:
                f.write(json.dumps(line) + "\n")
            pending.clear()
            losses.clear()

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer = Counting(
        model=args.model,
        args=config,
        train_dataset=trl_dataset(Path(args.data)),
        processing_class=processor,
        callbacks=[StepLines()],
    )
    trainer.train()
    return {
        "steps": state["step"],
        "assistant_only_loss": assistant_only,
        "transformers": transformers.__version__,
        "trl": trl.__version__,
        "per_device_batch": args.per_device,
        "grad_accum": accum,
        "attn": args.attn,
        "liger": args.liger,
        "dataloader_workers": args.workers,
        "dtype": args.dtype,
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m sft.bench.trl_vision", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--out-dir", required=True)
    p.add_argument("--steps", type=int, required=True, help="optimizer steps")
    p.add_argument("--global-batch", type=int, default=32, help="rows per optimizer step")
    p.add_argument("--per-device", type=int, default=4, help="rows per micro-batch (padded to its longest)")
    p.add_argument("--max-length", type=int, default=8192)
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16", help="master weights (compute is bf16)")
    p.add_argument("--attn", default="sdpa", help="attn_implementation")
    p.add_argument("--liger", action="store_true", help="TRL's use_liger_kernel=True (layer kernels)")
    p.add_argument("--workers", type=int, default=4, help="dataloader_num_workers (image decoding and processing)")
    p.add_argument("--no-gradient-checkpointing", dest="gradient_checkpointing", action="store_false")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--betas", type=float, nargs=2, default=(0.9, 0.95))
    p.add_argument("--clip-grad", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if not trl_available():
        print(TRL_MISSING, file=sys.stderr)
        return 2
    import transformers

    transformers.utils.logging.set_verbosity_error()
    info = run(args)
    (Path(args.out_dir) / "info.json").write_text(json.dumps(info))
    print(json.dumps(info), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
