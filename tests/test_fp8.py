"""`model.fp8` on CPU: torchao's float8 training in emulation (FP8 values, fp32 GEMMs; the trainer emulates when the
device is not CUDA, which validation refuses for real runs).

- which layers convert (decoder linears yes; LM head, embeddings, routers, widths off 16 no);
- one-line refusals before loading: the value, LoRA, CPU, torchao missing, widths not multiples of 16;
- training: FP8 losses within 1e-3 relative of the fp32 run over 4 steps; checkpoints hold plain fp32 tensors
  (no torchao class pickled) and a bf16 HF export with the plain model's names; resume without FP8 continues, and
  resume with FP8 on 2 ranks (FP8 all-gather across shards) repeats the uninterrupted run's steps.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from conftest import base_overrides
from distributed_helper import run_ranks
from fp8_workers import train_runs
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from sft.checkpoint.safe_dcp import load_metadata
from sft.cli import compose
from sft.config.checks import validate_config
from sft.config.errors import ConfigError
from sft.data.loader import MicroBatchBuilder
from sft.models.families import FAMILIES
from sft.ops.fp8 import TOKEN_MULTIPLE, TRUE_RECIPE, convert_to_fp8, fp8_recipe
from sft.parallel.distributed import WorldInfo

needs_torchao = pytest.mark.skipif(
    importlib.util.find_spec("torchao") is None, reason="needs torchao (pip install 'sft[fp8]')"
)

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
WORLD1 = WorldInfo(rank=0, local_rank=0, world_size=1, local_world_size=1)
# FP8 (e4m3 values, 3 mantissa bits) against fp32 on the demo model, 4 steps: measured 3.7e-4 at most.
LOSS_RTOL = 1e-3


def _tiny(model_type: str, **kw) -> nn.Module:
    cfg = AutoConfig.for_model(
        model_type,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        vocab_size=128,
        **kw,
    )
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(cfg)


def _kinds(lm: nn.Module) -> dict[str, str]:
    return {n: type(m).__name__ for n, m in lm.named_modules() if isinstance(m, nn.Linear)}


@needs_torchao
def test_decoder_linears_convert_and_the_rest_stays():
    # Qwen2-MoE: router (not an nn.Linear), shared expert (converted) and its 1-wide gate (widths off 16: kept).
    lm = _tiny(
        "qwen2_moe", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32
    )
    assert convert_to_fp8(lm, "tensorwise", FAMILIES["qwen2_moe"].moe.router_suffix, emulate=True) == (7, 1)
    kinds = _kinds(lm)
    assert kinds.pop("lm_head") == "Linear" and kinds.pop("model.layers.0.mlp.shared_expert_gate") == "Linear"
    assert set(kinds.values()) == {"Float8Linear"}, kinds
    assert {n.rsplit(".", 1)[-1] for n in kinds} == set(PROJECTIONS)
    assert type(lm.model.embed_tokens) is nn.Embedding
    assert type(lm.model.layers[0].mlp.gate).__name__ == "Qwen2MoeTopKRouter"
    # Gemma 4: the router holds an nn.Linear (16 experts: FP8-able widths) that the family table's suffix keeps out.
    lm = _tiny("gemma4_text", enable_moe_block=True, num_experts=16, top_k_experts=2, moe_intermediate_size=32)
    convert_to_fp8(lm, "rowwise", FAMILIES["gemma4_text"].moe.router_suffix, emulate=True)
    kinds = _kinds(lm)
    assert kinds["model.layers.0.router.proj"] == "Linear" and kinds["model.layers.0.mlp.down_proj"] == "Float8Linear"
    assert kinds["lm_head"] == "Linear" and kinds["model.per_layer_model_projection"] == "Linear"  # outside the layers
    assert fp8_recipe(True) == TRUE_RECIPE and fp8_recipe("rowwise") == "rowwise" and fp8_recipe(False) is None


@needs_torchao
def test_one_rank_export_and_checkpoint_state_are_plain(single_rank, demo_tokenizer, tmp_path):
    """On one rank a DTensor's full tensor is its local one: the FP8-gathered weight's wrapper must be taken off
    for the HF export (safetensors cannot write it) and the DCP state (torchao's class would be pickled)."""
    from torch.distributed.fsdp import fully_shard

    from sft.checkpoint.hf_export import export_hf
    from sft.checkpoint.manager import _dcp_state

    single_rank("cpu")
    lm = _tiny("qwen2")
    convert_to_fp8(lm, "tensorwise", None, emulate=True)
    for layer in lm.model.layers:
        fully_shard(layer)
    model = nn.Module()
    model.lm, model.frozen = lm, None
    fully_shard(model)
    lm.to_empty(device="cpu")
    wrapped = [n for n, p in lm.named_parameters() if type(p._local_tensor).__name__ != "Tensor"]
    assert len(wrapped) == 7, wrapped  # the FP8-gathered weights
    state, _, _ = _dcp_state(model, torch.optim.AdamW(model.parameters()), {"model"})
    assert {type(v._local_tensor) for v in state["model"].values()} == {torch.Tensor}
    assert export_hf(tmp_path, model, lm.config, demo_tokenizer, None, None, True, {"hf_model"}, torch.bfloat16) is None
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        dtypes, names = {f.get_slice(k).get_dtype() for k in f.keys()}, set(f.keys())
    assert dtypes == {"BF16"} and names == set(_tiny("qwen2").state_dict())


def _item(n: int, width: int | None = None) -> dict[str, torch.Tensor]:
    """A sample of n tokens (right-padded to `width` for padded mode), every token after the first trained."""
    w = width or n
    ids = torch.arange(1, w + 1) * (torch.arange(w) < n)
    mask = (torch.arange(w) < n).long()
    return {"input_ids": ids, "attention_mask": mask, "position_ids": torch.arange(w) * mask, "loss_mask": mask}


@pytest.mark.parametrize("packed,sp", [(True, 1), (True, 2), (False, 1)])
def test_micro_batches_hold_a_multiple_of_16_tokens_per_rank(packed, sp):
    """FP8's weight-gradient GEMM runs over the tokens: each rank's count is padded to 16, without new targets."""
    # Padded rows 20 wide: 18 tokens round up to 32 columns, past the items' own width.
    items = [_item(n, None if packed else 20) for n in (5, 18, 7)]
    for indices in ([0, 1, 2], [1], []):
        counts = {}
        for multiple in (1, TOKEN_MULTIPLE):
            mbs = [MicroBatchBuilder(items, packed, 0, r, sp, token_multiple=multiple)(indices) for r in range(sp)]
            if multiple > 1:
                assert all(mb.inputs["input_ids"].numel() % multiple == 0 for mb in mbs), (packed, sp, indices)
            counts[multiple] = (sum(mb.targets for mb in mbs), sum(mb.real_tokens for mb in mbs), mbs[0].sample_lens)
        assert counts[1] == counts[TOKEN_MULTIPLE], counts


def _cfg(demo_dir: Path, tmp_path: Path, *extra: str):
    return compose([*base_overrides(demo_dir, tmp_path), "trainer.device=cpu", *extra])


@pytest.mark.parametrize(
    "extra,message",
    [
        (
            ["model.fp8=fast"],
            r"^model.fp8='fast': choose false, true \(sft's choice, tensorwise\), tensorwise or rowwise$",
        ),
        (
            ["model.fp8=true", "model.lora_rank=4"],
            r"^model.fp8=true with model.lora_rank=4: .*set model.fp8=false for LoRA$",
        ),
        (
            ["model.fp8=rowwise"],
            r"^model.fp8=rowwise: FP8 GEMMs need an NVIDIA GPU .*\(this run uses cpu\); set model.fp8=false$",
        ),
    ],
)
def test_refusals_name_the_key(demo_dir, tmp_path, extra, message):
    with pytest.raises(ConfigError, match=message):
        validate_config(_cfg(demo_dir, tmp_path, *extra), WORLD1)


def test_refusals_past_the_device(demo_dir, tmp_path, monkeypatch):
    """On an FP8 GPU (pretended): torchao missing, then widths that are not multiples of 16."""
    import sft.config.checks as checks

    monkeypatch.setattr(checks, "device_reason", lambda *args: None)
    monkeypatch.setattr(checks, "torchao_reason", lambda: None)  # (torchao itself is not needed by this test)
    validate_config(_cfg(demo_dir, tmp_path, "model.fp8=true"), WORLD1)  # the demo model's widths are fine
    bad = _cfg(demo_dir, tmp_path, "model.fp8=true", "+model.override_config.intermediate_size=100")
    with pytest.raises(
        ConfigError, match=r"^model.fp8=true: .*multiples of 16.* intermediate_size=100; set model.fp8=false$"
    ):
        validate_config(bad, WORLD1)
    monkeypatch.undo()
    monkeypatch.setattr(checks, "device_reason", lambda *args: None)
    real_import = importlib.import_module

    def no_torchao(name: str, *args):
        if name.startswith("torchao"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args)

    monkeypatch.setattr(importlib, "import_module", no_torchao)
    with pytest.raises(
        ConfigError,
        match=r"^model.fp8=true: torchao's float8 training does not import .*pip install 'sft\[fp8\]' .*; or set model.fp8=false$",
    ):
        validate_config(_cfg(demo_dir, tmp_path, "model.fp8=true"), WORLD1)


def _overrides(demo_dir: Path, out: Path, *extra: str) -> list[str]:
    return base_overrides(demo_dir, out) + [
        "use_remove_padding=true",
        "data.train_max_samples=32",
        "data.train_batch_size=8",
        "data.micro_batch_size_per_gpu=2",
        "trainer.total_training_steps=4",
        "trainer.save_freq=2",
        'trainer.checkpoint.save_contents=["model","optimizer","extra","hf_model"]',
        *extra,
    ]


def _close(a: list[float], b: list[float], rtol: float) -> bool:
    return len(a) == len(b) and all(abs(x - y) <= rtol * abs(y) for x, y in zip(a, b))


@needs_torchao
def test_fp8_training_matches_fp32_checkpoints_stay_plain_and_resume(demo_dir, tmp_path):
    """On 2 ranks (FSDP2 gathers each layer's FP8 shards): fp32, FP8 saving at steps 2 and 4, resumed at step 2
    without FP8, and with it (scales from the loaded weights, refreshed at start)."""
    step2 = tmp_path / "fp8" / "global_step_2"
    resume = [
        "trainer.resume_mode=resume_path",
        f"trainer.resume_from_path={step2}",
        "trainer.checkpoint.save_contents=[]",
    ]
    resume += ["trainer.checkpoint.load_contents=[model,optimizer,extra]"]  # (its default follows save_contents)
    runs = [
        _overrides(demo_dir, tmp_path / "fp32", "trainer.checkpoint.save_contents=[]"),
        _overrides(demo_dir, tmp_path / "fp8", "model.fp8=true"),
        _overrides(demo_dir, tmp_path / "plain_resume", *resume),
        _overrides(demo_dir, tmp_path / "fp8_resume", "model.fp8=true", *resume),
    ]
    run_ranks(train_runs, 2, runs, str(tmp_path / "results.pt"))
    ref, fp8, plain_resume, fp8_resume = torch.load(tmp_path / "results.pt")
    assert ref["fp8"] == 0 and fp8["fp8"] == 14  # 7 linears in each of the 2 decoder layers
    gap = max(abs(a - b) / b for a, b in zip(fp8["losses"], ref["losses"]))
    print(f"model.fp8=true (emulated) vs fp32 on CPU, 2 ranks, 4 steps: max relative |loss diff| = {gap:.1e}")
    assert _close(fp8["losses"], ref["losses"], LOSS_RTOL) and fp8["losses"] != ref["losses"], (fp8, ref)
    assert _close(plain_resume["losses"], fp8["losses"][2:], LOSS_RTOL) and plain_resume["fp8"] == 0
    assert fp8_resume["losses"] == fp8["losses"][2:] and fp8_resume["fp8"] == 14  # exact, as any resume

    for f in (step2 / "dcp").iterdir():  # plain tensors: readable with or without torchao (and no class pickled)
        assert b"torchao" not in f.read_bytes(), f
    dcp_dtypes = {
        m.properties.dtype
        for k, m in load_metadata(step2 / "dcp" / ".metadata").state_dict_metadata.items()
        if k.startswith("model.") and hasattr(m, "properties")
    }
    assert dcp_dtypes == {torch.float32}  # model.fsdp_config.model_dtype
    meta = json.loads((step2 / "huggingface" / "config.json").read_text())
    with safe_open(step2 / "huggingface" / "model.safetensors", "pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
        names = set(f.keys())
    plain = AutoModelForCausalLM.from_pretrained(demo_dir / "model")
    # trainer.checkpoint.hf_dtype (transformers 5 writes `dtype`, 4 `torch_dtype`)
    assert dtypes == {"BF16"} and meta.get("dtype", meta.get("torch_dtype")) == "bfloat16"
    assert names == set(plain.state_dict()) - {"lm_head.weight"}  # tied head: saved once, as HF does
    AutoModelForCausalLM.from_pretrained(step2 / "huggingface")
