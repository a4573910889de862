"""`python -m sft.demo train`: fine-tuning shown end to end on a CPU in a few minutes.

Writes the demo assets, grades the untrained tiny model's greedy answers on held-out
conversations, trains it with the real trainer under torchrun, loads the exported
`huggingface/` folder with transformers, grades again and draws the curves. The grading
helpers (`generate_answers`, `evaluate`) are plain functions so tests can run them small.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from sft.demo.assets import FOLLOW_UP, check_answer, write_demo
from sft.plot import plot_runs


def task_name(row: dict[str, Any]) -> str:
    """The kind of the row's graded (last) question: Repeat, Reverse, Sort, Uppercase, Follow-up, Lookup."""
    last_user = [m["content"] for m in row["messages"] if m["role"] == "user"][-1]
    if last_user == FOLLOW_UP:
        return "Follow-up"
    if last_user.startswith("Look up"):
        return "Lookup"
    return last_user.split(":", 1)[0]


@torch.no_grad()
def generate_answers(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    rows: Sequence[dict[str, Any]],
    batch_size: int = 50,
    max_new_tokens: int = 40,
) -> list[str]:
    """Greedy answers to each row's last question, given the conversation before its last turn."""
    prompts = [
        tokenizer.apply_chat_template(
            row["messages"][:-1],
            tools=json.loads(row["tools"]) if row["tools"] else None,
            add_generation_prompt=True,
            tokenize=False,
        )
        for row in rows
    ]
    model.eval()
    answers: list[str] = []
    for start in range(0, len(prompts), batch_size):
        # Left padding: every prompt of a batch ends at the same position, where generation starts.
        batch = prompts[start : start + batch_size]
        enc = tokenizer(batch, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
        out = model.generate(
            **enc,
            do_sample=False,
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            use_cache=True,  # the demo config turns the cache off for training
        )
        new_tokens = out[:, enc["input_ids"].shape[1] :]
        # Generation stops at <|im_end|> (special): dropping special tokens leaves the answer.
        answers += tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    return answers


def evaluate(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, rows: Sequence[dict[str, Any]]
) -> dict[str, tuple[int, int]]:
    """(correct, total) per task and under "all", grading greedy answers with `check_answer`."""
    scores: dict[str, list[int]] = {}
    for row, answer in zip(rows, generate_answers(model, tokenizer, rows)):
        ok = int(check_answer(row, answer))
        for key in (task_name(row), "all"):
            scores.setdefault(key, [0, 0])
            scores[key][0] += ok
            scores[key][1] += 1
    return {key: (c, n) for key, (c, n) in scores.items()}


def _accuracy(score: tuple[int, int]) -> float:
    return score[0] / score[1] if score[1] else 0.0


def format_report(before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]]) -> str:
    """A task | before | after table of accuracies (the "all" row last)."""
    keys = sorted(k for k in after if k != "all") + ["all"]
    lines = [f"{'task':<10} {'n':>4} {'before':>8} {'after':>8}"]
    for key in keys:
        b, a = before.get(key, (0, 0)), after[key]
        lines.append(f"{key:<10} {a[1]:>4} {_accuracy(b):>8.1%} {_accuracy(a):>8.1%}")
    return "\n".join(lines)


def _load(folder: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    return AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)


def train_overrides(work: Path, args: argparse.Namespace) -> list[str]:
    """The trainer's command-line overrides for the demo run (CPU, padded, exported weights)."""
    demo = work / "demo"
    return [
        f"data.train_files={demo}/train.parquet",
        f"data.val_files={demo}/val.parquet",
        "data.multiturn.enable=true",
        "data.max_length=256",
        "data.truncation=right",
        f"data.train_batch_size={args.batch}",
        f"data.micro_batch_size_per_gpu={args.batch // args.nproc}",
        f"model.partial_pretrain={demo}/model",
        "model.enable_gradient_checkpointing=false",
        f"optim.lr={args.lr}",
        "optim.lr_warmup_steps_ratio=0.03",
        f"trainer.total_training_steps={args.steps}",
        "trainer.total_epochs=1000",
        f"trainer.test_freq={max(1, args.steps // 5)}",
        "trainer.resume_mode=disable",
        "trainer.logger=[console,file]",
        "trainer.device=cpu",
        f"trainer.default_local_dir={work}/run",
        "trainer.checkpoint.save_contents=[hf_model]",
        "trainer.checkpoint.hf_dtype=fp32",
    ]


def run_trainer(overrides: list[str], nproc: int) -> None:
    """`torchrun -m sft.fsdp_sft_trainer` in a child process; its console goes to ours."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1"]
    cmd += [f"--nproc_per_node={nproc}", "-m", "sft.fsdp_sft_trainer", *overrides]
    env = dict(os.environ)
    # The package root on the path: the demo runs from a checkout without `pip install -e .`.
    root = str(Path(__file__).resolve().parents[2])  # sft/demo/train.py -> the folder holding sft/
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    # The demo's 64-wide matmuls gain nothing from more threads and slow down badly when the
    # cores are shared (a step takes several times longer with two threads per rank than with one).
    env.setdefault("OMP_NUM_THREADS", "1")
    rc = subprocess.run(cmd, env=env, check=False).returncode
    if rc != 0:
        raise SystemExit(f"sft.demo train: error: the trainer exited with status {rc} (its messages are above)")


def train_and_export(work: Path, overrides: list[str], nproc: int, label: str) -> tuple[Path, Path]:
    """Train into `work/run`; (the last checkpoint's Hugging Face export, the loss-curve plot labelled `label`)."""
    run_trainer(overrides, nproc)
    run_dir = work / "run"
    step = (run_dir / "latest_checkpointed_iteration.txt").read_text().strip()
    curves = plot_runs([run_dir / "metrics.jsonl"], work / "curves.png", labels=[label])
    return run_dir / f"global_step_{step}" / "huggingface", curves


def say(text: str) -> None:
    # Flushed at once: the trainer child writes to the same console in between.
    print(text, flush=True)


def main_train(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m sft.demo train", description=__doc__)
    parser.add_argument("--work", type=Path, help="output folder (default: a new temporary folder)")
    parser.add_argument("--nproc", type=int, default=1, help="CPU processes for torchrun (default 1)")
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--batch", type=int, default=32, help="global batch (samples per step)")
    parser.add_argument("--lr", type=float, default=1e-2)  # a 2-layer, 64-wide model wants a high lr
    parser.add_argument("--n-train", type=int, default=8000)
    parser.add_argument("--n-eval", type=int, default=200, help="held-out conversations graded before and after")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.batch % args.nproc:
        parser.error(f"--batch {args.batch} must be a multiple of --nproc {args.nproc}")
    start = time.perf_counter()
    work = args.work or Path(tempfile.mkdtemp(prefix="sft_demo."))
    if (work / "run").exists():  # metrics.jsonl would mix two runs' curves
        parser.error(f"--work {work} already holds a run ({work / 'run'}); choose a new folder or delete that one")
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    say(f"writing the tiny model and {args.n_train} synthetic conversations to {work}/demo")
    write_demo(work / "demo", args.n_train, args.n_eval, args.seed)
    rows = pq.read_table(work / "demo" / "val.parquet").to_pylist()
    before = evaluate(*_load(work / "demo" / "model"), rows)
    say(f"accuracy before training: {_accuracy(before['all']):.1%} of {len(rows)} held-out conversations")

    say(f"training {args.steps} steps of {args.batch} conversations on {args.nproc} CPU process(es)")
    export, curves = train_and_export(work, train_overrides(work, args), args.nproc, "demo")
    after = evaluate(*_load(export), rows)

    say(f"\ngreedy answers graded by sft.demo.check_answer (model: {export})")
    say(format_report(before, after))
    say(f"loss curves: {curves}")
    say(f"wall time: {time.perf_counter() - start:.0f} s")
    if _accuracy(after["all"]) <= _accuracy(before["all"]):
        print("sft.demo train: accuracy did not rise; train longer (--steps) or check the run above", file=sys.stderr)
        return 1
    return 0
