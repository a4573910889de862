"""`python -m sft.demo vision`: vision-language fine-tuning shown end to end on a CPU in a few minutes.

Writes the vision demo assets (a tiny random Qwen2.5-VL, images of one coloured shape), grades the untrained model
on held-out images, trains it with the real trainer under torchrun, loads the exported `huggingface/` folder with
its own class and processor, and grades again: exact match of the colour whose answer the model finds most likely
(chance, 25%, for a model blind to the image) and of its greedy answer, and the right answer's negative
log-likelihood, which no model blind to the image can bring below `blind_nll`. `report.json` keeps the numbers.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import torch
import transformers
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoTokenizer, PreTrainedModel, ProcessorMixin

from sft.data.images import load_image
from sft.data.processor import load_processor
from sft.data.vision_rows import vision_messages
from sft.demo.train import say, train_and_export
from sft.demo.train import train_overrides as text_train_overrides
from sft.demo.vision_assets import COLOURS, answer_of, write_vision_demo


def prompt_of(processor: ProcessorMixin, row: dict[str, Any], where: str) -> tuple[str, list[Image.Image]]:
    """The row's conversation up to its last answer, rendered with a generation prompt, and its decoded images.

    The row goes through the trainer's own reading of verl's layout, so grading sees what training saw."""
    messages, refs = vision_messages(row["messages"], row["images"], where, "messages", "images", Path("."))
    text = processor.tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=False)
    return text, [load_image(ref, where) for ref in refs]


def _encode(processor: ProcessorMixin, texts: list[str], images: list[Image.Image], side: str) -> dict:
    # The processor expands each image pad to the image's token count and runs the image processor.
    return processor(
        text=texts, images=images, return_tensors="pt", padding=True, padding_side=side, add_special_tokens=False
    )


@torch.no_grad()
def answer_logprobs(
    model: PreTrainedModel, processor: ProcessorMixin, rows: Sequence[dict[str, Any]], batch_size: int = 16
) -> torch.Tensor:
    """[rows, colours]: the log-likelihood of each colour's answer (its name and the end-of-turn token, the tokens
    training targets), colours in `sorted(COLOURS)` order."""
    tok = processor.tokenizer
    answers = [tok(name + tok.eos_token, add_special_tokens=False)["input_ids"] for name in sorted(COLOURS)]
    model.eval()
    out = []
    for start in range(0, len(rows), batch_size):
        texts, images, targets = [], [], []
        for i, row in enumerate(rows[start : start + batch_size], start):
            prompt, row_images = prompt_of(processor, row, f"row {i}")
            for name, ids in zip(sorted(COLOURS), answers):  # one sequence per candidate, each with the images
                texts.append(prompt + name + tok.eos_token)
                images += row_images
                targets.append(ids)
        # Right padding: each sequence's answer is its last real tokens.
        enc = _encode(processor, texts, images, "right")
        logp = model(**enc).logits.float().log_softmax(-1)  # [b, s, vocab]
        ends = enc["attention_mask"].sum(-1).tolist()
        scores = []
        for b, (ids, end) in enumerate(zip(targets, ends)):
            at = end - len(ids)
            # The template ends the prompt with a newline, which BPE never merges into the next word.
            assert enc["input_ids"][b, at:end].tolist() == ids, "the answer tokenizes differently after the prompt"
            # Token t is predicted at position t - 1.
            scores.append(logp[b, at - 1 : end - 1].gather(-1, torch.tensor(ids)[:, None]).sum())
        out.append(torch.stack(scores).view(-1, len(answers)))
    return torch.cat(out)


@torch.no_grad()
def generate_answers(
    model: PreTrainedModel,
    processor: ProcessorMixin,
    rows: Sequence[dict[str, Any]],
    batch_size: int = 32,
    max_new_tokens: int = 8,
) -> list[str]:
    """Greedy answers to each row's question about its image."""
    tok = processor.tokenizer
    model.eval()
    answers: list[str] = []
    for start in range(0, len(rows), batch_size):
        prompts = [prompt_of(processor, row, f"row {i}") for i, row in enumerate(rows[start : start + batch_size])]
        # Left padding: every prompt of a batch ends where generation starts.
        enc = _encode(processor, [p for p, _ in prompts], [im for _, ims in prompts for im in ims], "left")
        out = model.generate(
            **enc, do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id, use_cache=True
        )
        # Generation stops at <|im_end|> (special): dropping special tokens leaves the answer.
        answers += tok.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    return answers


def accuracy(rows: Sequence[dict[str, Any]], answers: Sequence[str]) -> float:
    """Exact-match share of `answers` (stripped) against the rows' colours."""
    assert len(rows) == len(answers), "one answer per row"
    return sum(a.strip() == answer_of(r) for r, a in zip(rows, answers)) / max(1, len(rows))


def blind_nll(rows: Sequence[dict[str, Any]]) -> float:
    """The lowest mean answer_nll a model that ignores the images can reach on `rows`: the entropy of their colours
    (its best is to give each colour its share of the rows; ln 4 when the four are equally frequent)."""
    counts = [sum(answer_of(r) == name for r in rows) for name in sorted(COLOURS)]
    return -sum(c / len(rows) * math.log(c / len(rows)) for c in counts if c)


def evaluate(model: PreTrainedModel, processor: ProcessorMixin, rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Accuracy of the most likely colour ("scored") and of the greedy answer ("generated"), and the mean negative
    log-likelihood of the right answer ("answer_nll", in nats; compare with `blind_nll(rows)`)."""
    names = sorted(COLOURS)
    logprobs = answer_logprobs(model, processor, rows)
    right = torch.tensor([names.index(answer_of(r)) for r in rows])
    return {
        "scored": accuracy(rows, [names[k] for k in logprobs.argmax(-1).tolist()]),
        "generated": accuracy(rows, generate_answers(model, processor, rows)),
        "answer_nll": -logprobs[torch.arange(len(rows)), right].mean().item(),
    }


def load(folder: Path) -> tuple[PreTrainedModel, ProcessorMixin]:
    """The checkpoint with its own class, and its processor as the trainer loads it (no torchvision needed)."""
    processor = load_processor(str(folder), AutoTokenizer.from_pretrained(folder))
    return AutoModelForImageTextToText.from_pretrained(folder), processor


def train_overrides(work: Path, args: argparse.Namespace) -> list[str]:
    """The text demo's trainer overrides (CPU, exported fp32 weights) with this demo's changes: short rows that are
    never truncated (sft refuses to cut an image), packed, a longer warm-up."""
    changed = {"data.max_length": "128", "optim.lr_warmup_steps_ratio": "0.05", "use_remove_padding": "true"}
    kept = [o for o in text_train_overrides(work, args) if o.split("=", 1)[0] not in (*changed, "data.truncation")]
    return kept + [f"{k}={v}" for k, v in changed.items()]


def format_report(before: dict[str, float], after: dict[str, float], rows: Sequence[dict[str, Any]]) -> str:
    """A grading | before | after table on the held-out `rows`: accuracies, then the answer loss."""
    lines = [f"{f'grading ({len(rows)} images)':<32} {'before':>8} {'after':>8}"]
    for key, label in (("scored", "accuracy, most likely colour"), ("generated", "accuracy, greedy answer")):
        lines.append(f"{label:<32} {before[key]:>8.1%} {after[key]:>8.1%}")
    label = f"answer loss, nats (blind: {blind_nll(rows):.3f})"
    lines.append(f"{label:<32} {before['answer_nll']:>8.3f} {after['answer_nll']:>8.3f}")
    return "\n".join(lines)


def main_vision(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m sft.demo vision", description=__doc__)
    parser.add_argument("--out", type=Path, help="output folder (default: a new temporary folder)")
    parser.add_argument("--nproc", type=int, default=1, help="CPU processes for torchrun (default 1)")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch", type=int, default=32, help="global batch (samples per step)")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--n-train", type=int, default=4000)
    parser.add_argument("--n-eval", type=int, default=200, help="held-out images graded before and after")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.batch % args.nproc:
        parser.error(f"--batch {args.batch} must be a multiple of --nproc {args.nproc}")
    work = args.out or Path(tempfile.mkdtemp(prefix="sft_vision_demo."))
    if (work / "run").exists():  # metrics.jsonl would mix two runs' curves
        parser.error(f"--out {work} already holds a run ({work / 'run'}); choose a new folder or delete that one")
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    # Grading's tiny matmuls gain nothing from a second thread and slow down several-fold when the cores are
    # shared (the trainer child runs with one thread for the same reason).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run_demo(work, args)
    finally:
        torch.set_num_threads(threads)


def run_demo(work: Path, args: argparse.Namespace) -> int:
    """Assets, grading before, training, grading after, report; 0 when the accuracy rose."""
    start = time.perf_counter()
    say(f"writing the tiny Qwen2.5-VL model and {args.n_train} shape images to {work}/demo")
    paths = write_vision_demo(work / "demo", args.n_train, args.n_eval, args.seed)
    rows = pq.read_table(paths["val"]).to_pylist()
    before = evaluate(*load(paths["model"]), rows)
    say(f"accuracy before training: {before['scored']:.1%} of {len(rows)} held-out images (chance: 25%)")

    say(f"training {args.steps} steps of {args.batch} images on {args.nproc} CPU process(es)")
    export, curves = train_and_export(work, train_overrides(work, args), args.nproc, "vision demo")
    after = evaluate(*load(export), rows)

    report = {"before": before, "after": after, "blind_nll": blind_nll(rows), "n_eval": len(rows), "model": str(export)}
    (work / "report.json").write_text(json.dumps(report, indent=2) + "\n")

    say(f"\n'What colour is the shape?' on held-out images (model: {export})")
    say(format_report(before, after, rows))
    say(f"loss curves: {curves}")
    say(f"wall time: {time.perf_counter() - start:.0f} s")
    if after["scored"] <= before["scored"]:
        print("sft.demo vision: accuracy did not rise; train longer (--steps) or check the run above", file=sys.stderr)
        return 1
    return 0
