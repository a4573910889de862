"""See what the trainer will train on: `python -m sft.inspect_data [options] key=value ...`.

Takes the trainer's Hydra overrides, builds the tokenizer (no weights) and the dataset of
one split exactly as training does, and prints the first rows: decoded text with the
trained spans marked (`--format text`), only the trained text, one run of trained tokens a
line (`--format trained`: what happens to reasoning and tool calls at a glance), or their
token ids and loss masks (`--format jsonl`).
Configuration problems print one line and exit 2; problems in the data exit 3.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from torch.utils.data import Dataset
from transformers import PreTrainedTokenizerBase

from sft.cli import compose
from sft.config.errors import ConfigError
from sft.config.schema import SFTConfig
from sft.data.build import build_dataset
from sft.models.loading import load_tokenizer

ANSI_ON, ANSI_OFF = "\x1b[1;32m", "\x1b[0m"
BRACKETS = ("[[", "]]")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m sft.inspect_data",
        description="Print dataset rows as the trainer sees them, with the trained tokens marked.",
    )
    p.add_argument("--split", choices=("train", "val"), default="train")
    p.add_argument("--rows", type=int, default=3, help="number of rows to show (default 3)")
    p.add_argument("--format", choices=("text", "trained", "jsonl"), default="text")
    p.add_argument("overrides", nargs="*", help="the trainer's Hydra overrides, e.g. data.train_files=x.parquet")
    return p


def build_split(cfg: SFTConfig, split: str) -> tuple[PreTrainedTokenizerBase, Dataset]:
    """Tokenizer and dataset of `split` as the trainer builds them."""
    files = cfg.data.train_files if split == "train" else cfg.data.val_files
    if files is None:
        raise ConfigError("data.val_files is not set; pass data.val_files=... or use --split train")
    max_samples = cfg.data.train_max_samples if split == "train" else cfg.data.val_max_samples
    model_dir = cfg.model.partial_pretrain
    if not Path(model_dir).expanduser().is_dir():
        raise ConfigError(
            f"model.partial_pretrain={model_dir}: not a directory; give a local Hugging Face model folder"
        )
    try:
        tokenizer = load_tokenizer(cfg)
    except (OSError, ValueError) as e:
        raise ConfigError(f"model.partial_pretrain={model_dir}: cannot load its tokenizer: {_one_line(e)}") from e
    dataset = build_dataset(files, tokenizer, cfg.data, max_samples, pad_to_max_length=not cfg.use_remove_padding)
    return tokenizer, dataset


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def unpadded(dataset: Dataset, index: int) -> tuple[list[int], list[int]]:
    """(input_ids, loss_mask) of one item without its padding (works for custom classes too)."""
    item = dataset[index]
    keep = item["attention_mask"].to(torch.bool)
    return item["input_ids"][keep].tolist(), item["loss_mask"][keep].tolist()


def render_marked(tokenizer: PreTrainedTokenizerBase, ids: list[int], mask: list[int], colour: bool) -> str:
    """Decoded text with each run of trained tokens wrapped in colour or `[[ ]]`."""
    on, off = (ANSI_ON, ANSI_OFF) if colour else BRACKETS
    parts: list[str] = []
    start = 0
    for t in range(1, len(ids) + 1):
        # Decode whole runs: decoding token by token would split multi-byte characters.
        if t == len(ids) or mask[t] != mask[start]:
            text = tokenizer.decode(ids[start:t], skip_special_tokens=False, clean_up_tokenization_spaces=False)
            parts.append(f"{on}{text}{off}" if mask[start] else text)
            start = t
    return "".join(parts)


def trained_runs(tokenizer: PreTrainedTokenizerBase, ids: list[int], mask: list[int]) -> list[str]:
    """Decoded text of each maximal run of trained tokens, in order."""
    runs: list[str] = []
    start = None
    for t in range(len(ids) + 1):
        on = t < len(ids) and mask[t]
        if on and start is None:
            start = t
        elif not on and start is not None:
            runs.append(tokenizer.decode(ids[start:t], skip_special_tokens=False, clean_up_tokenization_spaces=False))
            start = None
    return runs


def _header(dataset: Dataset, index: int, ids: list[int], mask: list[int]) -> str:
    source = f" ({dataset.where(index)})" if hasattr(dataset, "where") else ""
    return f"=== row {index}{source} | length {len(ids)} | trained {sum(mask)} ==="


def main(argv: Sequence[str] | None = None) -> int:
    # Intermixed: options may come before, between or after the Hydra overrides.
    args = _parser().parse_intermixed_args(argv)
    if args.rows < 0:
        print("sft: config error: --rows must be >= 0", file=sys.stderr)
        return 2
    try:
        cfg = compose(list(args.overrides))
        tokenizer, dataset = build_split(cfg, args.split)
    except ConfigError as e:
        print(f"sft: config error: {_one_line(e)}", file=sys.stderr)
        return 2
    except ValueError as e:
        # Raised while reading and tokenizing the rows: a problem in the data.
        print(f"sft: data error: {_one_line(e)}", file=sys.stderr)
        return 3
    colour = sys.stdout.isatty()
    for i in range(min(args.rows, len(dataset))):
        ids, mask = unpadded(dataset, i)
        if args.format == "jsonl":
            print(json.dumps({"row": i, "input_ids": ids, "loss_mask": mask}))
        elif args.format == "trained":
            print(_header(dataset, i, ids, mask))
            for run in trained_runs(tokenizer, ids, mask):
                print(f"+ {json.dumps(run, ensure_ascii=False)}")
        else:
            print(_header(dataset, i, ids, mask))
            print(render_marked(tokenizer, ids, mask, colour))
    return 0


def _cli() -> None:
    from sft.parallel.distributed import setup_logging

    # Logging is set up only here so that calling main() from tests leaves it untouched.
    setup_logging(0)
    try:
        sys.exit(main())
    except BrokenPipeError:
        # `... | head`: the reader left; nothing more to say.
        sys.stderr.close()
        sys.exit(0)


if __name__ == "__main__":
    _cli()
