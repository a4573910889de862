"""`python -m sft.merge`: a 2-process FSDP2 checkpoint becomes a Hugging Face folder, on one CPU
process, bitwise equal to the trainer's own fp32 export; bf16 output; checkpoints without
`hf_model` weights; refusals (incomplete checkpoint, no model entries, non-empty out_dir)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from conftest import base_overrides
from safetensors.torch import load_file
from test_e2e import ROOT, torchrun
from transformers import AutoModelForCausalLM, AutoTokenizer

from sft.merge import main as merge_main


def run_overrides(demo: Path, out: Path, contents: str) -> list[str]:
    return base_overrides(demo, out) + [
        "data.train_batch_size=4",
        "data.micro_batch_size_per_gpu=2",
        "trainer.total_training_steps=1",
        "trainer.save_freq=1",
        f"trainer.checkpoint.save_contents={contents}",
        "trainer.checkpoint.hf_dtype=fp32",
    ]


@pytest.fixture(scope="module")
def ckpts(demo_dir, tmp_path_factory) -> tuple[Path, Path]:
    """(step-1 checkpoint with the trainer's fp32 export, same run saved with only `model`)."""
    root = tmp_path_factory.mktemp("merge")
    full = run_overrides(demo_dir, root / "full", '["model","optimizer","extra","hf_model"]')
    bare = run_overrides(demo_dir, root / "bare", '["model"]')
    with ThreadPoolExecutor(2) as pool:  # two independent launches: halves the wall time
        results = list(pool.map(lambda ov: torchrun(2, ov), [full, bare]))
    for r in results:
        assert r.returncode == 0, r.stderr[-3000:]
    return root / "full" / "global_step_1", root / "bare" / "global_step_1"


def logits(folder: Path) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(folder)
    chat = [
        {"role": "user", "content": "Repeat: paper light ocean"},
        {"role": "assistant", "content": "paper light ocean"},
    ]
    ids = tok(tok.apply_chat_template(chat, tokenize=False), return_tensors="pt", add_special_tokens=False).input_ids
    with torch.no_grad():
        return model(ids).logits


def test_fp32_merge_equals_trainer_export(ckpts, tmp_path):
    full, _ = ckpts
    out = tmp_path / "hf"
    r = subprocess.run(
        [sys.executable, "-m", "sft.merge", str(full), str(out), "--dtype", "fp32"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "merged 26 tensors" in r.stdout
    ref = load_file(str(full / "huggingface" / "model.safetensors"))
    got = load_file(str(out / "model.safetensors"))
    assert sorted(got) == sorted(ref)  # HF names, tied lm_head dropped
    for k in ref:
        assert got[k].dtype == torch.float32 and torch.equal(got[k], ref[k]), k
    assert (out / "tokenizer.json").read_bytes() == (full / "huggingface" / "tokenizer.json").read_bytes()
    assert (out / "generation_config.json").exists()
    assert torch.equal(logits(out), logits(full / "huggingface"))


def test_bf16_and_sharded_output(ckpts, tmp_path):
    full, _ = ckpts
    out = tmp_path / "bf16"
    assert merge_main([str(full), str(out), "--shard-size-gb", "0.0001"]) == 0  # bf16 is the default
    index = (out / "model.safetensors.index.json").read_text()
    files = sorted(out.glob("model-*.safetensors"))
    assert len(files) > 1 and all(f.name in index for f in files)
    ref = load_file(str(full / "huggingface" / "model.safetensors"))
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.dtype == torch.bfloat16
    sd = model.state_dict()
    for k in ref:
        assert sd[k].dtype == torch.bfloat16 and torch.equal(sd[k], ref[k].to(torch.bfloat16)), k


def test_checkpoint_without_hf_weights_merges(ckpts, tmp_path):
    full, bare = ckpts
    assert not list((bare / "huggingface").glob("*.safetensors"))
    out = tmp_path / "hf"
    assert merge_main([str(bare), str(out), "--dtype", "fp32"]) == 0
    # The same run (same seed and data) saved with less: the weights are the same.
    ref = load_file(str(full / "huggingface" / "model.safetensors"))
    got = load_file(str(out / "model.safetensors"))
    assert sorted(got) == sorted(ref)
    for k in ref:
        assert torch.equal(got[k], ref[k]), k
    assert torch.isfinite(logits(out)).all()


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_refusals(ckpts, tmp_path, capsys):
    full, _ = ckpts
    incomplete = tmp_path / "global_step_9"
    shutil.copytree(full, incomplete)
    (incomplete / "COMPLETE").unlink()
    assert merge_main([str(incomplete), str(tmp_path / "a")]) == 2
    assert "no COMPLETE marker" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()

    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    assert merge_main([str(full), str(taken)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert [p.name for p in taken.iterdir()] == ["keep.txt"]

    # A checkpoint whose DCP holds the optimizer only (save_contents without "model").
    no_model = tmp_path / "global_step_5"
    no_model.mkdir()
    shutil.copytree(full / "huggingface", no_model / "huggingface")
    (no_model / "COMPLETE").write_text("{}")
    dcp.save({"optimizer": {"state": {"w": torch.zeros(2)}}}, checkpoint_id=str(no_model / "dcp"), no_dist=True)
    assert merge_main([str(no_model), str(tmp_path / "b")]) == 2
    assert "no model entries" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()
