"""See what the trainer will train on: `python -m sft.inspect_data [options] key=value ...`.

Takes the trainer's Hydra overrides, builds the tokenizer (no weights) and the dataset of
one split exactly as training does, and prints the first rows: decoded text with the
trained spans marked (`--format text`), only the trained text, one run of trained tokens a
line (`--format trained`: what happens to reasoning and tool calls at a glance), or their
token ids and loss masks (`--format jsonl`). With images in the data the processor is built as the trainer
builds it; each image's run of image tokens shows as one marker with its size and token count in `--format text`,
and `--format jsonl` adds each image's first token, token count and size.
Configuration problems print one line and exit 2; problems in the data exit 3.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset
from transformers import PreTrainedTokenizerBase

from sft.cli import compose
from sft.config.errors import ConfigError, one_line
from sft.config.schema import SFTConfig
from sft.data.build import build_dataset
from sft.data.images import image_size
from sft.data.processor import vision_processor
from sft.data.vision_dataset import image_token_count
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
        raise ConfigError(f"model.partial_pretrain={model_dir}: cannot load its tokenizer: {one_line(e)}") from e
    processor = build_processor(cfg, tokenizer)
    dataset = build_dataset(
        files, tokenizer, cfg.data, max_samples, pad_to_max_length=not cfg.use_remove_padding, processor=processor
    )
    return tokenizer, dataset


def build_processor(cfg: SFTConfig, tokenizer: PreTrainedTokenizerBase) -> Any:
    """The model's processor when the training files hold images, else None: the trainer's choice
    (sft/trainer.py `_build_processor`), so both splits are read as training reads them."""
    key = "model.tokenizer_path" if cfg.model.tokenizer_path else "model.partial_pretrain"
    try:
        return vision_processor(cfg, tokenizer)
    except ValueError as e:
        raise ConfigError(f"{key}: {one_line(e)}") from e  # the message names the folder and the processor


def unpadded(dataset: Dataset, index: int) -> tuple[list[int], list[int], list[dict[str, Any]]]:
    """(input_ids, loss_mask, images) of one item without its padding (works for custom classes too); `images` as
    `image_runs` gives them."""
    item = dataset[index]
    keep = item["attention_mask"].to(torch.bool)
    ids, mask = item["input_ids"][keep].tolist(), item["loss_mask"][keep].tolist()
    return ids, mask, image_runs(dataset, item, ids)


def image_runs(dataset: Dataset, item: dict[str, Any], ids: list[int]) -> list[dict[str, Any]]:
    """Each image of a vision-language item, in order: its first token, its token count (the processor's, for its
    header size, as the dataset expanded it) and its size in pixels. [] for text datasets."""
    refs, token = item.get("images"), getattr(dataset, "image_token_id", None)
    if not refs or token is None:
        return []
    where = item["where"]
    at = [t for t, i in enumerate(ids) if i == token]
    runs, k = [], 0
    for n, ref in enumerate(refs, start=1):
        width, height = image_size(ref, where)
        count = image_token_count(dataset.processor, height, width)
        # The dataset places each image's tokens in one run, and never truncates an image.
        run = at[k : k + count]
        assert len(run) == count and run == list(range(run[0], run[0] + count)), f"{where}: image {n} not in one run"
        runs.append({"start": run[0], "tokens": count, "width": width, "height": height})
        k += count
    assert k == len(at), f"{where}: {len(at)} image tokens, {k} for its images"
    return runs


def image_marker(n: int, run: dict[str, Any]) -> str:
    return f"<image {n}: {run['width']}x{run['height']} px -> {run['tokens']} tokens>"


def render_marked(
    tokenizer: PreTrainedTokenizerBase,
    ids: list[int],
    mask: list[int],
    colour: bool,
    images: Sequence[dict[str, Any]] = (),
) -> str:
    """Decoded text with each run of trained tokens wrapped in colour or `[[ ]]`, and each image's run of image
    tokens (`images`, as `image_runs` gives them) shown as one `image_marker`."""
    on, off = (ANSI_ON, ANSI_OFF) if colour else BRACKETS
    parts: list[str] = []
    lo = 0
    for n, run in enumerate([*images, None], start=1):
        # The text between images, then the image's marker (image tokens are never trained).
        hi = len(ids) if run is None else run["start"]
        start = lo
        for t in range(lo + 1, hi + 1):
            # Decode whole runs: decoding token by token would split multi-byte characters.
            if t == hi or mask[t] != mask[start]:
                text = tokenizer.decode(ids[start:t], skip_special_tokens=False, clean_up_tokenization_spaces=False)
                parts.append(f"{on}{text}{off}" if mask[start] else text)
                start = t
        if run is not None:
            parts.append(image_marker(n, run))
            lo = run["start"] + run["tokens"]
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
        print(f"sft: config error: {one_line(e)}", file=sys.stderr)
        return 2
    except ValueError as e:
        # Raised while reading and tokenizing the rows: a problem in the data.
        print(f"sft: data error: {one_line(e)}", file=sys.stderr)
        return 3
    colour = sys.stdout.isatty()
    for i in range(min(args.rows, len(dataset))):
        ids, mask, images = unpadded(dataset, i)
        if args.format == "jsonl":
            extra = {"images": images} if hasattr(dataset, "image_token_id") else {}
            print(json.dumps({"row": i, "input_ids": ids, "loss_mask": mask, **extra}))
        elif args.format == "trained":
            print(_header(dataset, i, ids, mask))
            for run in trained_runs(tokenizer, ids, mask):
                print(f"+ {json.dumps(run, ensure_ascii=False)}")
        else:
            print(_header(dataset, i, ids, mask))
            print(render_marked(tokenizer, ids, mask, colour, images))
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
