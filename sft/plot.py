"""Training curves from `metrics.jsonl` files, for people who would rather look than read.

`python -m sft.plot RUN/metrics.jsonl [MORE.jsonl ...] -o curves.png` draws train/val loss,
learning rate, gradient norm, throughput, token accuracy and useful MFU against the step, one colour per run (labelled
by its folder). Uses matplotlib's Agg canvas through `Figure` (no pyplot, no display).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

logger = logging.getLogger("sft")

# (panel title, [(metric key, line style)], log-scale y)
PANELS: tuple[tuple[str, list[tuple[str, str]], bool], ...] = (
    ("loss", [("train/loss", "-"), ("val/loss", "o--")], True),
    ("learning rate", [("train/lr", "-")], False),
    ("grad norm (before clipping)", [("train/grad_norm", "-")], True),
    ("tokens/s per GPU", [("train/tokens_per_s_per_gpu", "-")], False),
    ("token accuracy", [("train/token_accuracy", "-"), ("val/token_accuracy", "o--")], False),
    ("useful MFU", [("train/mfu", "-")], False),
)

Series = dict[str, list[tuple[int, float]]]


def read_metrics(path: str | Path) -> Series:
    """Per metric key, the (step, value) points of one metrics.jsonl, sorted by step.

    A step logged twice (re-run after a resume) keeps its later value. A last line cut off
    by a crash is skipped with a warning; any other unreadable line is an error.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: file not found; pass the metrics.jsonl of a run (trainer.logger with 'file')")
    lines = path.read_text(encoding="utf-8").split("\n")
    by_key: dict[str, dict[int, float]] = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            step = int(record["step"])
        except (ValueError, KeyError, TypeError) as exc:
            if number == len(lines):  # no trailing newline: the writer died mid-line
                logger.warning("%s line %d is incomplete (%s); skipped", path, number, exc)
                continue
            raise ValueError(
                f"{path} line {number}: not a metrics record ({exc!r}); each line must be a JSON object with 'step'"
            ) from exc
        for key, value in record.items():
            if key != "step" and isinstance(value, int | float) and not isinstance(value, bool):
                by_key.setdefault(key, {})[step] = float(value)
    return {key: sorted(points.items()) for key, points in by_key.items()}


def default_labels(paths: Sequence[str | Path]) -> list[str]:
    """The run folder's name for `.../RUN/metrics.jsonl`, else the file name; full paths if they clash."""
    names = [Path(p).parent.name if Path(p).name == "metrics.jsonl" else Path(p).stem for p in paths]
    names = [n or str(p) for n, p in zip(names, paths)]
    return names if len(set(names)) == len(names) else [str(p) for p in paths]


def plot_runs(paths: Sequence[str | Path], out: str | Path, labels: Sequence[str] | None = None) -> Path:
    """Draw every run of `paths` into the 3x2 figure written to `out` (PNG, or the suffix's format)."""
    from matplotlib.figure import Figure  # lazy: only plotting pays for matplotlib

    if labels is not None and len(labels) != len(paths):
        raise ValueError(f"--labels gives {len(labels)} names for {len(paths)} files; give one per file")
    runs = [read_metrics(p) for p in paths]
    wanted = {key for _, keys, _ in PANELS for key, _ in keys}
    if not any(wanted & run.keys() for run in runs):
        raise ValueError(f"{', '.join(map(str, paths))}: no train/ or val/ metrics to plot; is this a metrics.jsonl?")
    labels = list(labels) if labels is not None else default_labels(paths)
    fig = Figure(figsize=(12, 11), layout="constrained")
    axes = fig.subplots(3, 2).flatten()
    for ax, (title, keys, log_y) in zip(axes, PANELS):
        drawn = False
        for i, (run, label) in enumerate(zip(runs, labels)):
            colour = f"C{i % 10}"  # one colour per run across all panels
            for key, style in keys:
                points = run.get(key)
                if not points:
                    continue
                steps, values = zip(*points)
                name = label if len(keys) == 1 else f"{label} {key.split('/')[0]}"
                # Validation points are few: large markers with a dark edge stay visible over the train line.
                ax.plot(steps, values, style, color=colour, label=name, markersize=6, markeredgecolor="black")
                drawn = True
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if not drawn:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes)
            continue
        if log_y:
            ax.set_yscale("log")
        ax.legend(fontsize="small")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sft.plot", description=__doc__)
    parser.add_argument("files", nargs="+", help="metrics.jsonl files (several runs are overlaid)")
    parser.add_argument("-o", "--out", default="curves.png", help="output image (default: curves.png)")
    parser.add_argument("--labels", nargs="+", help="one legend name per file (default: the run folder)")
    args = parser.parse_args(argv)
    try:
        out = plot_runs(args.files, args.out, args.labels)
    except ValueError as exc:
        print(f"sft.plot: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
