"""Every documented command runs: the tools print their usage, both trainer layouts print the config.

Importing torch and transformers takes seconds, so the commands run one after another in one fresh
interpreter, each the way `python -m` runs it (`runpy.run_module(..., run_name="__main__")`, with its own
argv and captured output); one cheap tool also runs as a real `python -m` process.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

HELP = {
    "sft.bench": ["--help"],
    "sft.demo": ["--help"],
    "sft.demo train": ["train", "--help"],
    "sft.merge": ["--help"],
    "sft.convert_checkpoint": ["--help"],
    "sft.inspect_data": ["--help"],
    "sft.plot": ["--help"],
}
# --cfg needs only the keys without a default; nothing is read from these paths.
CFG = {
    "sft.fsdp_sft_trainer": ["--cfg", "job", "data.train_files=rows.parquet", "model.partial_pretrain=some/model"],
    "sft.sft_trainer": ["--cfg", "job", "data.train_files=rows.parquet", "model.path=some/model"],
}

RUNNER = """
import contextlib, io, json, runpy, sys
results = {}
for name, (module, argv) in json.loads(sys.argv[1]).items():
    out, err = io.StringIO(), io.StringIO()
    sys.argv = [module, *argv]
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except BaseException as exc:  # reported with the command's name, not as the runner's crash
            code, err = 1, io.StringIO(f"{type(exc).__name__}: {exc}")
    results[name] = {"code": code, "out": out.getvalue(), "err": err.getvalue()}
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def ran() -> dict[str, dict]:
    commands = {name: (name.split()[0], argv) for name, argv in {**HELP, **CFG}.items()}
    r = subprocess.run(
        [sys.executable, "-c", RUNNER, json.dumps(commands)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", sorted(HELP))
def test_tool_help_prints_usage(ran, name):
    got = ran[name]
    assert got["code"] == 0, f"python -m {name} --help exited {got['code']}: {got['err'][-2000:]}"
    prog = "python -m " + name
    assert got["out"].startswith("usage:") and prog in got["out"].splitlines()[0], got["out"][:300]


@pytest.mark.parametrize("name", sorted(CFG))
def test_cfg_job_prints_the_config(ran, name):
    got = ran[name]
    assert got["code"] == 0, f"python -m {name} --cfg job exited {got['code']}: {got['err'][-2000:]}"
    out = got["out"]
    assert "train_files: rows.parquet" in out and "partial_pretrain: some/model" in out, out[:500]
    # Each layout's own default: verl's newer layout (sft/config/verl_layout.py) schedules a constant lr.
    scheduler = "constant" if name == "sft.sft_trainer" else "cosine"
    assert "ulysses_sequence_parallel_size: 1" in out and f"lr_scheduler: {scheduler}" in out


def test_a_real_python_dash_m_process():
    r = subprocess.run(
        [sys.executable, "-m", "sft.plot", "--help"], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert r.returncode == 0 and r.stdout.startswith("usage: python -m sft.plot"), r.stderr[-2000:]


def test_trainer_entry_exports():
    from sft.fsdp_sft_trainer import FSDPSFTTrainer, main
    from sft.trainer import FSDPSFTTrainer as Trainer

    assert FSDPSFTTrainer is Trainer and callable(main)
