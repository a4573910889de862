"""Checks of a finished smoke-test run, printed as PASS/FAIL lines (used by scripts/smoke_test.sh).

`python -m sft.demo.smoke_check OUTDIR LOGFILE EXIT_CODE` reads `OUTDIR/metrics.jsonl` and the
checkpoint folders; the exit status is 0 only when every check passes.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path


def checks(out_dir: Path, log_text: str, rc: int) -> list[tuple[str, bool, str]]:
    rows = []
    metrics_file = out_dir / "metrics.jsonl"
    records = [json.loads(line) for line in metrics_file.read_text().splitlines()] if metrics_file.exists() else []
    losses = [r["train/loss"] for r in records if "train/loss" in r]
    bad_words = [w for w in ("Traceback", "out of memory", "OutOfMemoryError") if w in log_text]
    rows.append(("no crash or OOM", rc == 0 and not bad_words, f"exit code {rc}, {bad_words or 'clean log'}"))
    finite = bool(losses) and all(math.isfinite(x) for x in losses)
    rows.append(("finite training loss", finite, f"{len(losses)} steps logged"))
    falls = finite and len(losses) >= 2 and min(losses[-3:]) < losses[0]
    detail = f"first {losses[0]:.4f}, last {losses[-1]:.4f}" if losses else "no loss logged"
    rows.append(("loss falls", falls, detail))
    step5 = out_dir / "global_step_5"
    hf = step5 / "huggingface"
    ok = (step5 / "COMPLETE").exists() and (hf / "config.json").exists() and any(hf.glob("*.safetensors"))
    rows.append(("global_step_5/ with huggingface/", ok, str(step5)))
    val5 = [r["val/loss"] for r in records if r.get("step") == 5 and "val/loss" in r]
    rows.append(("val loss logged at step 5", bool(val5), f"{val5[0]:.4f}" if val5 else "missing"))
    return rows


def main(argv: list[str] | None = None) -> int:
    out_dir, log_file, rc = (argv if argv is not None else sys.argv[1:])[:3]
    log_text = Path(log_file).read_text(errors="replace") if Path(log_file).exists() else ""
    rows = checks(Path(out_dir), log_text, int(rc))
    for name, ok, detail in rows:
        print(f"{'PASS' if ok else 'FAIL'}  {name}  ({detail})")
    passed = all(ok for _, ok, _ in rows)
    print("smoke test:", "PASS" if passed else "FAIL")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
