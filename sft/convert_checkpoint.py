"""Convert old checkpoints' pickled extra state (`extra_state_rank_R.pt`) to the JSON + safetensors format.

`python -m sft.convert_checkpoint DIR [--trust-pickle]`: DIR is a `global_step_N` folder or an output
folder holding several. Each `.pt` without a `.json` beside it is read with `weights_only=True` and the
numpy allowlist; only with `--trust-pickle` is a file that needs more unpickled in full, which runs
whatever code it holds: use it only for checkpoints you wrote yourself. The new files are written
under temporary names and renamed into place, read back and compared (RNG states bitwise); the `.pt`
files are kept (no longer read) for you to delete. Errors are one stderr line, exit code 2.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sft.checkpoint import extra_state
from sft.checkpoint.safe_dcp import UnsafeFileError

LEGACY = re.compile(r"^extra_state_rank_(\d+)\.pt$")


class ConvertError(Exception):
    """The folder cannot be converted; the message says why."""


def step_folders(root: Path) -> list[Path]:
    if any(LEGACY.match(p.name) for p in root.iterdir()):
        return [root]
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("global_step_"))


def _same(a: Any, b: Any) -> bool:
    """Equal values, with tuples and lists alike (JSON has no tuple) and tensors/arrays bitwise."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return np.array_equal(a, b) and np.asarray(a).dtype == np.asarray(b).dtype
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def convert_file(file: Path, trust_pickle: bool) -> str:
    """Convert one `.pt`; returns a line describing what was done."""
    rank = int(LEGACY.match(file.name).group(1))  # type: ignore[union-attr]
    folder = file.parent
    if (folder / extra_state.json_name(rank)).exists():
        return f"skipped {file}: {extra_state.json_name(rank)} already exists"
    try:
        extra = extra_state.read_legacy(file)
    except UnsafeFileError as exc:
        if not trust_pickle:
            raise ConvertError(str(exc)) from None
        extra = torch.load(file, weights_only=False, map_location="cpu")  # the user asked for it, knowingly
    extra_state.write_atomic(folder, rank, extra)
    back = extra_state.read_new(folder, rank)
    if not _same(back, extra):
        raise ConvertError(f"{file}: the converted state does not read back equal; {folder} left with both files")
    return f"converted {file} -> {extra_state.json_name(rank)} + {extra_state.rng_name(rank)} (kept the .pt)"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sft.convert_checkpoint", description=__doc__.splitlines()[0])
    ap.add_argument("folder", type=Path, help="a global_step_N folder, or the output folder holding them")
    ap.add_argument(
        "--trust-pickle",
        action="store_true",
        help="unpickle files that weights_only=True refuses; RUNS THEIR CODE: only for checkpoints you wrote",
    )
    args = ap.parse_args(argv)
    try:
        if not args.folder.is_dir():
            raise ConvertError(f"{args.folder}: not a folder")
        files = [p for d in step_folders(args.folder) for p in sorted(d.iterdir()) if LEGACY.match(p.name)]
        if not files:
            raise ConvertError(f"{args.folder}: no extra_state_rank_R.pt to convert")
        if args.trust_pickle:
            print("sft.convert_checkpoint: --trust-pickle: files that need it are unpickled in full", file=sys.stderr)
        for f in files:
            print(convert_file(f, args.trust_pickle))
    except (ConvertError, OSError, ValueError) as exc:
        print(f"sft.convert_checkpoint: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
