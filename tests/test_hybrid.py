"""Hybrid models (sft/models/recurrent/) on real fully_shard over gloo: Gated DeltaNet (Qwen3.5, Qwen3.5-MoE,
Qwen3-Next), the short convolution (LFM2) and Mamba-2 (Nemotron-H, Granite 4, Falcon-H1), fp32.

padded (1 process) == remove-padding (1 process) == remove-padding + sp=2 (2 processes) on losses and on
weights after 2 steps, with packed rows of at least 3 samples, samples longer than the convolution window and
the recurrent chunk (64 for Gated DeltaNet, 16 for Mamba-2 here), and the SP cut inside a sample; LoRA on
all linear layers with activation checkpointing under SP; the HF export reproduces the trainer's val/loss. An
independent check: the packed forward's logits equal the HF model's on each sample alone. A planted leak (the
boundaries hidden from the recurrent layers) fails the same checks. One spawned run per world size."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import base_overrides, export_val_loss, two_steps
from distributed_helper import run_ranks
from hybrid_models import HYBRID_TYPES, write_hybrid_model
from hybrid_workers import leaking_rows, train_hybrids
from transformers import AutoConfig, AutoModelForCausalLM

from sft.cli import compose
from sft.config.checks import validate_config
from sft.config.errors import ConfigError
from sft.loop.budget import activation_bytes_per_token
from sft.models.attention.varlen import register_varlen_attention
from sft.models.families import moe_spec, recurrent_spec
from sft.models.recurrent.install import install_packed_mixers, mixer_bytes_per_token
from sft.models.recurrent.packed import NoMasks
from sft.parallel.distributed import WorldInfo

RMPAD = ["use_remove_padding=true"]
SP2 = [*RMPAD, "ulysses_sequence_parallel_size=2"]
LORA = ["model.lora_rank=4", "model.lora_alpha=8", "model.target_modules=all-linear"]
LORA_TYPE = LEAK_TYPE = "qwen3_5_text"
ADAM_NOISE = 2 * 2 * 1e-3  # 2 steps of at most lr (optim.lr=1e-3), either sign


@pytest.fixture(scope="module")
def hybrid_dirs(demo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hybrids")
    return {t: write_hybrid_model(demo_dir / "model", root / t, t) for t in HYBRID_TYPES}


def _overrides(demo: Path, model: Path, out: Path, extra: list[str]) -> list[str]:
    # Packed rows of up to 4 x 96 tokens: 3 samples or more; 16 samples are the 2 steps' (tokenising more costs time).
    return two_steps(demo, model, out, *extra, samples=16, batch=8)


@pytest.fixture(scope="module")
def runs(hybrid_dirs, demo_dir, tmp_path_factory) -> dict[str, dict[str, dict]]:
    """mode -> model type -> {weights, metrics, rows}; the rmpad runs also export the HF model."""
    tmp = tmp_path_factory.mktemp("hybrid_runs")
    export = ['trainer.checkpoint.save_contents=["hf_model"]', "trainer.checkpoint.hf_dtype=fp32"]
    plan = {  # mode -> (world size, [(model type, extra overrides, leak)])
        1: {
            "padded": [(t, [], False) for t in HYBRID_TYPES] + [(LORA_TYPE, LORA, False)],
            "rmpad": [(t, RMPAD + export, False) for t in HYBRID_TYPES],
            "leak": [(LEAK_TYPE, RMPAD, True)],
        },
        2: {
            "sp2": [(t, SP2, False) for t in HYBRID_TYPES]
            + [(LORA_TYPE, SP2 + LORA + ["model.enable_gradient_checkpointing=true"], False)]
        },
    }
    results: dict[str, dict[str, dict]] = {}
    for world, modes in plan.items():
        jobs, names = [], []
        for mode, entries in modes.items():
            for t, extra, leak in entries:
                name = f"{mode}_{t}" + ("_lora" if LORA[0] in extra else "")
                out = tmp / name
                jobs.append((_overrides(demo_dir, hybrid_dirs[t], out, extra), str(tmp / f"{name}.pt"), leak))
                names.append((mode, t + ("_lora" if LORA[0] in extra else ""), out))
        run_ranks(train_hybrids, world, jobs, world)
        for (mode, key, out), (_, f, _) in zip(names, jobs):
            results.setdefault(mode, {})[key] = torch.load(f, weights_only=False) | {"out": out}
    return results


def _steps(run: dict) -> list[dict]:
    return [m for m in run["metrics"] if "train/loss" in m]


def _differences(ref: dict, got: dict, key: str) -> list[str]:
    bad = []
    for a, b in zip(_steps(ref), _steps(got), strict=True):
        for k in ("train/loss", "train/aux_loss"):
            if k in a and b[k] != pytest.approx(a[k], rel=1e-5):
                bad.append(f"{key} step {a['step']} {k}: {a[k]} vs {b[k]}")
    for name, w in ref["weights"].items():
        g = got["weights"][name]
        off = ~torch.isclose(g, w, rtol=1e-4, atol=5e-5)
        # AdamW's first updates are ~g/|g|: an entry whose gradient is float noise (nothing in the batch pulls on
        # it) moves by up to lr per step either way. A handful of those may differ; anything else may not.
        noise = off.sum() <= max(1, w.numel() // 1000) and bool(((g - w).abs()[off] <= ADAM_NOISE).all())
        if off.any() and not noise:
            bad.append(f"{key} {name}: {int(off.sum())} entries differ, max diff {(g - w).abs().max():.3g}")
    return bad


@pytest.mark.parametrize("mode", ["rmpad", "sp2"])
def test_hybrid_equivalence(runs, mode):
    bad = []
    for key, got in runs[mode].items():
        bad += _differences(runs["padded"][key], got, key)
    assert not bad, "\n".join(bad[:20])


def test_rows_pack_several_samples_and_sp_cuts_inside_one(runs):
    """What the equivalence is measured on: rows of 3+ samples, samples past the chunk sizes, SP cuts mid-sample."""
    for mode in ("rmpad", "sp2"):
        for key, run in runs[mode].items():
            rows = run["rows"]
            assert rows and max(len(cu) - 1 for cu in rows) >= 3, (mode, key, rows)
            assert max(b - a for cu in rows for a, b in zip(cu[:-1], cu[1:])) > 64, (mode, key)
    for key, run in runs["sp2"].items():
        inside = [cu[-1] // 2 not in cu for cu in run["rows"]]
        assert any(inside), (key, run["rows"])


def test_router_metrics_where_the_model_routes(runs):
    """MoE hybrids log the router aux loss (compared across modes above); dense ones and Nemotron-H without an MoE
    layer do not."""
    for t in ("qwen3_5_moe_text", "qwen3_next", "nemotron_h", "granitemoehybrid", "lfm2_moe"):
        assert all(1.0 <= m["train/aux_loss"] < 4.0 for m in _steps(runs["padded"][t])), t
    for t in ("qwen3_5_text", "lfm2", "falcon_h1"):
        assert "train/aux_loss" not in _steps(runs["padded"][t])[0], t
    dense = AutoConfig.for_model("nemotron_h", layers_block_type=["linear_attention", "full_attention", "mlp"])
    assert moe_spec(dense) is None and moe_spec(AutoConfig.for_model("nemotron_h")) is not None


def test_lora_adapts_the_recurrent_projections(runs):
    names = runs["sp2"][f"{LORA_TYPE}_lora"]["weights"]
    projections = ("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a", "out_proj")
    for proj in (*(f"linear_attn.{p}" for p in projections), "self_attn.q_proj"):
        assert any(f"{proj}.lora_A" in n for n in names), proj


def test_planted_leak_breaks_the_equivalence(runs):
    """The same training with the boundaries hidden from the recurrent layers: the checks above must fail."""
    bad = _differences(runs["padded"][LEAK_TYPE], runs["leak"][LEAK_TYPE], LEAK_TYPE)
    assert any("train/loss" in b for b in bad) and len(bad) > 10, bad


def test_export_reproduces_val_loss(runs, demo_dir):
    """Each hybrid's HF export, loaded by plain transformers (its own layers, one sample at a time), gives the
    trainer's val/loss."""
    for t in HYBRID_TYPES:
        run = runs["rmpad"][t]
        val = [m["val/loss"] for m in run["metrics"] if "val/loss" in m][-1]
        hf = run["out"] / "global_step_2" / "huggingface"
        assert json.loads((hf / "config.json").read_text())["model_type"] == t
        assert export_val_loss(hf, demo_dir, run["out"]) == pytest.approx(val, rel=1e-5), t


def _packed_vs_single(single: torch.nn.Module, packed: torch.nn.Module) -> float:
    """Max |packed logits - logits of the HF model on each sample alone| / max |logits| over a row of 4 samples."""
    gen = torch.Generator().manual_seed(0)
    lengths = [70, 3, 41, 90]  # past the chunks and the window, and one shorter than the window
    ids = [torch.randint(0, 500, (n,), generator=gen) for n in lengths]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    with torch.no_grad():
        got = packed(
            torch.cat(ids)[None],
            position_ids=pos,
            attention_mask=NoMasks(),
            cu_seq_lens_q=cu,
            cu_seq_lens_k=cu,
            max_length_q=max(lengths),
            max_length_k=max(lengths),
            use_cache=False,
        ).logits[0]
        want = torch.cat([single(x[None], use_cache=False).logits[0] for x in ids])
    return float((got - want).abs().max() / want.abs().max())


@pytest.mark.parametrize("model_type", HYBRID_TYPES)
def test_packed_forward_matches_single_samples(hybrid_dirs, model_type):
    """Independent of the trainer: each sample's logits in a packed row are the HF model's on that sample alone;
    with the boundaries hidden (a planted leak) they are not."""
    path = hybrid_dirs[model_type]
    single = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    packed = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation=register_varlen_attention()
    ).eval()
    install_packed_mixers(packed, recurrent_spec(model_type))
    assert _packed_vs_single(single, packed) < 1e-5
    with leaking_rows():
        assert _packed_vs_single(single, packed) > 1e-2


def test_token_budget_counts_the_mixers(hybrid_dirs):
    """The token budget's per-layer activation estimate grows by the recurrent mixers' own activations."""
    for t in HYBRID_TYPES:
        cfg = AutoConfig.from_pretrained(hybrid_dirs[t])
        with torch.device("meta"):
            lm = AutoModelForCausalLM.from_config(cfg)
        assert mixer_bytes_per_token(lm) == 0  # nothing installed: padded runs keep the model's own layers
        install_packed_mixers(lm, recurrent_spec(t))
        mixer = mixer_bytes_per_token(lm)
        assert mixer > 10 * cfg.hidden_size, t
        assert activation_bytes_per_token(cfg, 0, mixer=mixer) > activation_bytes_per_token(cfg, 0) + mixer, t


def test_sp_size_that_cannot_split_the_recurrent_heads_is_refused(demo_dir, tmp_path):
    """Qwen3.5 with 2 key heads in its Gated DeltaNet layers cannot be split 4 ways: refused before loading."""
    model = write_hybrid_model(demo_dir / "model", tmp_path / "m", "qwen3_5_text")
    cfg = compose(base_overrides(demo_dir, tmp_path / "out") + [f"model.partial_pretrain={model}", *RMPAD])
    cfg.ulysses_sequence_parallel_size = 4
    with pytest.raises(ConfigError, match=r"ulysses_sequence_parallel_size=4 cannot split the gated_delta layers"):
        validate_config(cfg, WorldInfo(rank=0, world_size=4, local_rank=0, local_world_size=4))


def test_fla_that_cannot_run_its_backward_here_is_not_used(monkeypatch):
    """fla on Hopper with a Triton whose gated backward is wrong (and no TileLang): the exact reference runs, and the
    start-up line says why and what to install. A fake fla stands in (CPU machines have none)."""
    import importlib.machinery
    import sys
    import types

    from sft.models.recurrent import kernels

    def fake(name: str, **attrs) -> None:
        mod = types.ModuleType(name)
        mod.__spec__ = importlib.machinery.ModuleSpec(name, None)
        mod.__dict__.update(attrs)
        monkeypatch.setitem(sys.modules, name, mod)

    fake("fla")
    fake("fla.ops")
    fake("fla.ops.gated_delta_rule", chunk_gated_delta_rule=lambda *a, **k: None)
    fake("fla.ops.simple_gla", chunk_simple_gla=lambda *a, **k: None)
    fake("triton", __version__="3.6.0")
    cuda = torch.device("cuda")
    for flags, usable in (((True, True, False), False), ((True, True, True), True), ((False, True, False), True)):
        hopper, above_340, above_371 = flags
        fake("fla.utils", IS_NVIDIA_HOPPER=hopper, TRITON_ABOVE_3_4_0=above_340, TRITON_ABOVE_3_7_1=above_371)
        for fn in (kernels._fla, kernels._usable_fla):
            fn.cache_clear()
        said = kernels.backend_for(cuda)
        assert (kernels._usable_fla() is not None) == usable, flags
        assert said.startswith("flash-linear-attention") == usable, said
        if not usable:
            assert "Triton 3.6.0" in said and "tilelang" in said, said
    for fn in (kernels._fla, kernels._usable_fla):
        fn.cache_clear()


def test_a_hybrid_config_without_recurrent_layers_builds_as_attention_only(demo_dir, tmp_path):
    """LFM2's config class lists only attention layers by default: nothing to install, the packed model builds (it
    raised "no recurrent modules" at the model build). A model whose listed recurrent layers are not found still
    fails loudly."""
    from dataclasses import replace

    from sft.models.loading import build_meta_model
    from sft.models.recurrent import install

    model = write_hybrid_model(
        demo_dir / "model", tmp_path / "m", "lfm2", layer_types=["full_attention"] * 3, conv_bias=False
    )
    hf_config = AutoConfig.from_pretrained(model)
    cfg = compose(base_overrides(demo_dir, tmp_path / "out") + [f"model.partial_pretrain={model}", *RMPAD])
    assert build_meta_model(hf_config, cfg).recurrent is False
    conv = AutoConfig.from_pretrained(write_hybrid_model(demo_dir / "model", tmp_path / "c", "lfm2"))
    with torch.device("meta"):
        lm = AutoModelForCausalLM.from_config(conv)
    with pytest.raises(ValueError, match="no recurrent modules"):
        install.install_packed_mixers(lm, replace(recurrent_spec("lfm2"), module_suffix="renamedconv"))
