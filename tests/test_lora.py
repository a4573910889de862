"""LoRA through peft: config refusals, module targeting, and one 2-process run (dp=1 x sp=2, packed rows)
whose adapter loads with PeftModel.from_pretrained and agrees with the merged export (plain names, also
from `sft.merge`), whose resume is exact, and whose adapter `model.lora_adapter_path` continues from."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import base_overrides
from distributed_helper import run_ranks
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM

from sft.cli import compose
from sft.config.checks import validate_config
from sft.config.errors import ConfigError
from sft.merge import main as merge_main
from sft.models.loading import build_meta_model
from sft.models.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, adapter_config, add_lora, lora_layers
from sft.parallel.distributed import WorldInfo

WORLD2 = WorldInfo(rank=0, local_rank=0, world_size=2, local_world_size=2)
RANK, ALPHA = 4, 8


def lora_overrides(demo: Path, out: Path) -> list[str]:
    return base_overrides(demo, out) + [
        "data.train_max_samples=16",
        "data.train_batch_size=4",
        "data.micro_batch_size_per_gpu=2",
        "optim.lr=1e-2",
        "trainer.total_training_steps=4",
        "trainer.save_freq=2",
        'trainer.logger=["file"]',
        'trainer.checkpoint.save_contents=["model","optimizer","extra","hf_model"]',
        "trainer.checkpoint.hf_dtype=fp32",
        "use_remove_padding=true",
        "ulysses_sequence_parallel_size=2",
        f"model.lora_rank={RANK}",
        f"model.lora_alpha={ALPHA}",
    ]


# ----- in-process: config and targeting -----
def test_lora_options_without_lora_fail_before_loading(demo_dir, tmp_path):
    base = base_overrides(demo_dir, tmp_path / "o")
    for extra, needle in [
        ("model.lora_adapter_path=/a", "model.lora_adapter_path='/a' is set but model.lora_rank=0"),
        ("model.target_modules=[q_proj]", "model.target_modules=['q_proj'] is set but model.lora_rank=0"),
    ]:
        with pytest.raises(ConfigError, match="set model.lora_rank>0 to use LoRA") as e:
            validate_config(compose([*base, extra]), WORLD2)
        assert needle in str(e.value)
    empty = tmp_path / "adapter"
    empty.mkdir()
    (empty / ADAPTER_CONFIG).write_text(json.dumps({"r": 8, "lora_alpha": 16}))
    lora = [*base, "model.lora_rank=4", f"model.lora_adapter_path={empty}"]
    with pytest.raises(ConfigError, match=f"lora_adapter_path={empty}: no {ADAPTER_WEIGHTS} in it"):
        validate_config(compose(lora), WORLD2)
    save_file({}, empty / ADAPTER_WEIGHTS)
    with pytest.raises(ConfigError, match="the adapter has r=8 but model.lora_rank=4; set model.lora_rank=8"):
        validate_config(compose(lora), WORLD2)
    with pytest.raises(ConfigError, match="model.lora_alpha=0: must be > 0"):
        validate_config(compose([*base, "model.lora_rank=4", "model.lora_alpha=0"]), WORLD2)


def test_target_modules_are_checked_on_the_meta_model(demo_dir, tmp_path):
    hf_config = AutoConfig.from_pretrained(demo_dir / "model")
    base = [*base_overrides(demo_dir, tmp_path / "o"), "model.lora_rank=4"]
    with pytest.raises(ValueError, match="'q_prj' matches no module of Qwen2ForCausalLM; its linear layers are named"):
        build_meta_model(hf_config, compose([*base, "model.target_modules=[q_proj,q_prj]"]))
    with pytest.raises(ValueError, match="'lm_head' matches lm_head .*not the LM head"):
        build_meta_model(hf_config, compose([*base, "model.target_modules=[lm_head]"]))
    with pytest.raises(ValueError, match="'embed_tokens' matches model.embed_tokens \\(Embedding\\)"):
        build_meta_model(hf_config, compose([*base, "model.target_modules=[embed_tokens]"]))

    model = build_meta_model(hf_config, compose([*base, "model.target_modules=[q_proj,v_proj]"]))
    layers = lora_layers(model.lm)
    assert sorted(layers) == [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert sorted(adapter_config(model.lm, "m").target_modules) == ["q_proj", "v_proj"]
    every = build_meta_model(hf_config, compose(base))  # all-linear: every decoder linear layer, not the head
    assert len(lora_layers(every.lm)) == 2 * 7 and "lm_head" not in lora_layers(every.lm)


@pytest.mark.parametrize("family", ["qwen3_moe", "qwen2_moe", "gemma4_text", "deepseek_v3"])
def test_all_linear_on_moe_models_adapts_linears_not_experts_or_routers(demo_dir, tmp_path, family):
    """peft's own all-linear wraps MoE experts and routers as parameter wrappers (and sft then failed on them):
    sft's all-linear is every nn.Linear outside the routers (as the family table finds them) and the LM head."""
    from family_models import write_family_model

    from sft.models.families import moe_spec

    folder = write_family_model(demo_dir / "model", tmp_path / family, family)
    hf_config = AutoConfig.from_pretrained(folder)
    model = build_meta_model(hf_config, compose([*base_overrides(demo_dir, tmp_path / "o"), "model.lora_rank=4"]))
    suffix = moe_spec(hf_config).router_suffix
    modules = dict(model.lm.named_modules())
    routers = [n for n, m in modules.items() if type(m).__name__.lower().endswith(suffix)]
    assert routers, family
    adapted = sorted(lora_layers(model.lm))
    want = sorted(
        n
        for n, m in modules.items()
        if type(m).__name__ == "Linear"
        and not n.endswith(".base_layer")
        and "lora_" not in n
        and n != "lm_head"
        and not any(n.startswith(r + ".") for r in routers)
    )
    assert adapted == want and adapted, (family, adapted, want)
    assert not any(type(modules[n].get_base_layer()).__name__ != "Linear" for n in adapted)


def test_adapter_of_other_modules_is_refused(demo_dir, tmp_path):
    cfg = compose([*base_overrides(demo_dir, tmp_path / "o"), "model.lora_rank=4", "model.target_modules=[q_proj]"])
    lm = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(demo_dir / "model"))
    key = "base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight"
    (tmp_path / "ad").mkdir()
    save_file({key: torch.zeros(4, 64)}, tmp_path / "ad" / ADAPTER_WEIGHTS)
    cfg.model.lora_adapter_path = str(tmp_path / "ad")
    with pytest.raises(ValueError, match="the adapter lacks .*set model.target_modules to the adapter's"):
        add_lora(lm, cfg.model, load_adapter=True)


# ----- one spawned 2-process run: train, resume, continue from the adapter -----
def lora_runs(demo: Path, root: Path) -> None:
    """A: 4 steps saving at 2 and 4. B: resume A's step 2 into another folder. C: a fresh run from A's
    step-4 adapter (built, not trained); rank 0 saves C's LoRA tensors as the trainer holds them."""
    from sft.models.lora import adapter_state
    from sft.parallel.distributed import init_distributed, teardown
    from sft.trainer import FSDPSFTTrainer

    ctx = init_distributed("cpu", 2)
    try:
        resume = ["trainer.resume_mode=resume_path", f"trainer.resume_from_path={root}/a/global_step_2"]
        for name, extra in (("a", []), ("b", resume)):
            cfg = compose(lora_overrides(demo, root / name) + extra)
            validate_config(cfg, WorldInfo.from_env())
            FSDPSFTTrainer(cfg, ctx).fit()
        cfg = compose(
            lora_overrides(demo, root / "c") + [f"model.lora_adapter_path={root}/a/global_step_4/lora_adapter"]
        )
        validate_config(cfg, WorldInfo.from_env())
        trainer = FSDPSFTTrainer(cfg, ctx)
        state = adapter_state(trainer.model.lm)
        trainer.metrics.close()
        trainer.preemption.close()
        if ctx.rank == 0:
            torch.save(state, root / "c_initial.pt")
    finally:
        teardown()


def losses(out: Path) -> dict[int, float]:
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in recs if "train/loss" in r}


def test_lora_train_export_resume_and_continue(demo_dir, tmp_path):
    from peft import PeftModel  # here, not at the top: the spawned ranks import this module and need no peft

    run_ranks(lora_runs, 2, demo_dir, tmp_path)
    a4, b4 = tmp_path / "a" / "global_step_4", tmp_path / "b" / "global_step_4"

    # The adapter: PEFT's layout with the real alpha; loads on the base model; it trained.
    saved_cfg = json.loads((a4 / "lora_adapter" / ADAPTER_CONFIG).read_text())
    assert (saved_cfg["r"], saved_cfg["lora_alpha"]) == (RANK, ALPHA)
    assert saved_cfg["base_model_name_or_path"] == str(demo_dir / "model")
    adapter = load_file(str(a4 / "lora_adapter" / ADAPTER_WEIGHTS))
    assert len(adapter) == 2 * 2 * 7 and all(k.startswith("base_model.model.model.layers.") for k in adapter)
    ids = torch.randint(3, 600, (2, 48), generator=torch.Generator().manual_seed(0))
    base = AutoModelForCausalLM.from_pretrained(demo_dir / "model", dtype=torch.float32).eval()
    base_sd = {k: v.clone() for k, v in base.state_dict().items()}
    with torch.no_grad():
        base_logits = base(ids).logits
        peft_logits = PeftModel.from_pretrained(base, a4 / "lora_adapter").eval()(ids).logits
    merged = AutoModelForCausalLM.from_pretrained(a4 / "huggingface", dtype=torch.float32).eval()
    with torch.no_grad():
        merged_logits = merged(ids).logits
    assert (peft_logits - base_logits).abs().max() > 1e-2  # the adapter changed the model
    torch.testing.assert_close(merged_logits, peft_logits, rtol=1e-4, atol=1e-4)

    # The merged export: exactly the base model's names; weights without an adapter are the base's own.
    export = load_file(str(a4 / "huggingface" / "model.safetensors"))
    assert sorted(export) == sorted(k for k in base_sd if k != "lm_head.weight")  # tied head, as save_pretrained
    for k, v in export.items():
        adapted = any(
            k.endswith(f"{p}.weight")
            for p in ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "gate_proj", "down_proj")
        )
        assert torch.equal(v, base_sd[k]) != adapted, k
    # Offline merge of the sharded checkpoint gives the same folder.
    assert merge_main([str(a4), str(tmp_path / "merged"), "--dtype", "fp32"]) == 0
    offline = load_file(str(tmp_path / "merged" / "model.safetensors"))
    assert offline.keys() == export.keys()
    for k in export:
        torch.testing.assert_close(offline[k], export[k], rtol=0, atol=1e-6)

    # Resume from step 2 continues exactly: same losses, bitwise-equal adapter and export.
    la, lb = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert sorted(lb) == [3, 4] and [lb[s] for s in (3, 4)] == pytest.approx([la[3], la[4]], rel=1e-6)
    resumed = load_file(str(b4 / "lora_adapter" / ADAPTER_WEIGHTS))
    assert all(torch.equal(resumed[k], adapter[k]) for k in adapter)
    assert all(torch.equal(v, export[k]) for k, v in load_file(str(b4 / "huggingface" / "model.safetensors")).items())

    # model.lora_adapter_path: the new run starts from exactly the saved adapter.
    initial = torch.load(tmp_path / "c_initial.pt")
    assert initial.keys() == adapter.keys() and all(torch.equal(initial[k], adapter[k]) for k in adapter)
