"""sft/plot.py: metrics.jsonl parsing (re-run steps, cut-off last line) and the rendered PNG."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from sft.plot import default_labels, main, plot_runs, read_metrics


def _write(path: Path, records: list[dict], tail: str = "") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + tail)
    return path


def _train(step: int, loss: float) -> dict:
    return {
        "step": step,
        "train/loss": loss,
        "train/lr": 1e-3 * step,
        "train/grad_norm": 1.0 / step,
        "train/tokens_per_s_per_gpu": 1000.0 + step,
    }


def test_read_metrics_later_line_wins_and_cut_line_is_skipped(tmp_path) -> None:
    records = [_train(1, 3.0), _train(2, 2.5), _train(3, 2.0), {"step": 3, "val/loss": 2.2}, _train(2, 2.4)]
    path = _write(tmp_path / "metrics.jsonl", records, tail='{"step": 4, "train/lo')
    series = read_metrics(path)
    assert series["train/loss"] == [(1, 3.0), (2, 2.4), (3, 2.0)]  # step 2 re-run after a resume
    assert series["val/loss"] == [(3, 2.2)]
    assert "step" not in series


def test_bad_line_names_file_and_line(tmp_path) -> None:
    path = _write(tmp_path / "m.jsonl", [_train(1, 3.0)], tail="not json\n" + json.dumps(_train(2, 2.0)) + "\n")
    with pytest.raises(ValueError, match=r"m.jsonl line 2: not a metrics record"):
        read_metrics(path)
    with pytest.raises(ValueError, match=r"missing.jsonl: file not found"):
        read_metrics(tmp_path / "missing.jsonl")


def test_png_shows_both_runs(tmp_path) -> None:
    a = _write(tmp_path / "run_a" / "metrics.jsonl", [_train(s, 3.0 / s) for s in range(1, 21)])
    b = _write(tmp_path / "run_b" / "metrics.jsonl", [_train(s, 4.0 / s) for s in range(1, 11)])
    assert default_labels([a, b]) == ["run_a", "run_b"]
    out = plot_runs([a, b], tmp_path / "plots" / "curves.png")
    from matplotlib.image import imread

    image = imread(out)  # RGBA floats
    assert image.shape[:2] == (1100, 1200)
    rgb = (image[..., :3] * 255).round().astype(int)
    # Matplotlib's first two cycle colours: run_a is C0 (#1f77b4), run_b is C1 (#ff7f0e).
    for colour in ((0x1F, 0x77, 0xB4), (0xFF, 0x7F, 0x0E)):
        assert np.all(rgb == colour, axis=-1).sum() > 500, colour


def test_cli(tmp_path, capsys) -> None:
    path = _write(tmp_path / "run" / "metrics.jsonl", [_train(1, 2.0), {"step": 1, "val/loss": 2.1}])
    assert main([str(path), "-o", str(tmp_path / "c.png"), "--labels", "mine"]) == 0
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "wrote" in capsys.readouterr().out
    assert main([str(path), "--labels", "x", "y"]) == 2
    assert "--labels gives 2 names for 1 files" in capsys.readouterr().err
    empty = _write(tmp_path / "other.jsonl", [{"step": 1, "note": "no metrics"}])
    assert main([str(empty), "-o", str(tmp_path / "d.png")]) == 2
    assert "no train/ or val/ metrics" in capsys.readouterr().err
