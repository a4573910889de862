"""Model families (sft/models/families.py) on real fully_shard over gloo: for every family in the table,
padded (1 process) == remove-padding (1 process) == remove-padding + sp=2 (2 processes) on losses and
weights after 2 steps, with samples far longer than the 8-token sliding window (so windows cut across
SP slices); the HF export reproduces the trainer's validation loss; the attention features match an
independent reference (the model's own eager attention on single unpacked samples); a model type outside
the table trains when sft's packing probe measures it exact (exaone4 here; the refusals: tests/test_probe.py),
and what the probe cannot measure is refused before loading. One spawned run per mode covers all families."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import base_overrides, export_val_loss, two_steps
from distributed_helper import run_ranks
from family_models import COMMON, FAMILY_TYPES, PROBED_TYPES, rotated_part, write_family_model
from family_workers import train_many
from transformers import AutoConfig, AutoModelForCausalLM

from sft.cli import compose
from sft.config.checks import validate_config
from sft.config.errors import ConfigError
from sft.models.attention.varlen import ATTN_NAME, register_varlen_attention
from sft.models.families import FAMILIES, unsupported_reason

MODES = {
    "padded": (1, []),
    "rmpad": (1, ["use_remove_padding=true"]),
    "sp2": (2, ["use_remove_padding=true", "ulysses_sequence_parallel_size=2"]),
}


AC = ("qwen3_moe", "gpt_oss", "gemma4_text")  # router hooks, and Gemma 4's shared KV, under recompute


@pytest.fixture(scope="module")
def family_dirs(demo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    return {t: write_family_model(demo_dir / "model", root / t, t) for t in FAMILY_TYPES}


def _overrides(demo: Path, model: Path, out: Path, extra: list[str]) -> list[str]:
    return two_steps(demo, model, out, *extra)


@pytest.fixture(scope="module")
def runs(family_dirs, demo_dir, tmp_path_factory) -> dict[str, dict[str, dict]]:
    """mode -> family -> {weights, metrics}; the rmpad run also exports the HF model."""
    tmp = tmp_path_factory.mktemp("family_runs")
    results: dict[str, dict[str, dict]] = {}
    for mode, (world, extra) in MODES.items():
        if mode == "rmpad":
            extra = extra + ['trainer.checkpoint.save_contents=["hf_model"]', "trainer.checkpoint.hf_dtype=fp32"]
        jobs = [
            (_overrides(demo_dir, family_dirs[t], tmp / mode / t, extra), str(tmp / f"{mode}_{t}.pt"))
            for t in FAMILY_TYPES
        ]
        if mode == "sp2":  # MoE router hooks under activation-checkpoint recompute, with SP
            ac = ["model.enable_gradient_checkpointing=true"]
            jobs += [
                (_overrides(demo_dir, family_dirs[t], tmp / "ac" / t, extra + ac), str(tmp / f"ac_{t}.pt")) for t in AC
            ]
        run_ranks(train_many, world, jobs, world)
        if mode == "sp2":
            results["sp2_ac"] = {t: torch.load(tmp / f"ac_{t}.pt", weights_only=False) for t in AC}
        results[mode] = {
            t: torch.load(f, weights_only=False) | {"out": tmp / mode / t} for (_, f), t in zip(jobs, FAMILY_TYPES)
        }
    return results


def _steps(run: dict) -> list[dict]:
    return [m for m in run["metrics"] if "train/loss" in m]


@pytest.mark.parametrize("mode", ["rmpad", "sp2", "sp2_ac"])
def test_family_equivalence(runs, mode):
    bad = []
    for t in runs[mode]:
        ref, got = runs["padded"][t], runs[mode][t]
        for a, b in zip(_steps(ref), _steps(got), strict=True):
            for key in ("train/loss", "train/aux_loss"):
                if key in a and b[key] != pytest.approx(a[key], rel=1e-5):
                    bad.append(f"{t} step {a['step']} {key}: {a[key]} vs {b[key]}")
        for k, w in ref["weights"].items():
            w, g = _effective(t, k, w), _effective(t, k, got["weights"][k])
            if not torch.allclose(g, w, rtol=1e-4, atol=5e-5):
                bad.append(f"{t} {k}: max diff {(g - w).abs().max():.3g}")
    assert not bad, "\n".join(bad[:20])


def _effective(model_type: str, name: str, w: torch.Tensor) -> torch.Tensor:
    """The entries of `w` that can change the model's output: GLM-4 rotates the first half of each head only."""
    if model_type == "glm4" and name.endswith("self_attn.k_proj.bias"):
        return rotated_part(w, COMMON["head_dim"], COMMON["head_dim"] // 2)
    return w


def test_rows_pack_samples_and_sp_cuts_inside_one(runs):
    """What the equivalences rest on: a packed row holds at least 3 samples, and an SP slice boundary falls
    inside a sample (the sp2 rows are padded to an even length; cu_seq_lens cover the whole row)."""
    for t in FAMILY_TYPES:
        assert max(len(cu) - 1 for cu in runs["rmpad"][t]["rows"]) >= 3, t
        assert any(cu[-1] // 2 not in cu for cu in runs["sp2"][t]["rows"]), t


def test_moe_metrics_logged(runs):
    moe = ("qwen3_moe", "mixtral", "gpt_oss", "qwen2_moe", "gemma4_text", "glm4_moe", "minimax_m2", "deepseek_v3")
    new = (
        "deepseek_v2",
        "glm4_moe_lite",
        "dots1",
        "olmoe",
        "ernie4_5_moe",
        "exaone_moe",
        "afmoe",
        "hy_v3",
        "solar_open",
    )
    new += ("sarvam_moe", "sarvam_mla", "param2moe", "flex_olmo", "granitemoe")
    for t in (*moe, *new):
        for m in _steps(runs["padded"][t]):
            # 2 of 4 experts per token: a balanced router gives aux = top_k = 2 and max load 1.0.
            assert 1.0 < m["train/aux_loss"] < 4.0 and 1.0 <= m["train/moe_max_load"] <= 2.0, (t, m)
    assert "train/aux_loss" not in _steps(runs["padded"]["qwen2"])[0]


def test_export_reproduces_val_loss(runs, demo_dir):
    """Each family's HF export, loaded by plain transformers (its own attention), gives the trainer's val/loss."""
    for t in FAMILY_TYPES:
        run = runs["rmpad"][t]
        val = [m["val/loss"] for m in run["metrics"] if "val/loss" in m][-1]
        hf = run["out"] / "global_step_2" / "huggingface"
        assert export_val_loss(hf, demo_dir, run["out"]) == pytest.approx(val, rel=1e-5), t


@pytest.mark.parametrize(
    "model_type", ["gemma2", "gemma3_text", "gpt_oss", "mistral", "gemma4_text", "deepseek_v3", "glm4_moe_lite"]
)
def test_attention_matches_eager_on_single_samples(family_dirs, model_type):
    """Packed varlen forward (window, soft-cap, sinks, Gemma 4's per-layer widths and shared KV, MLA's narrower
    value heads) == the model's eager forward on each sample alone."""
    path = family_dirs[model_type]
    eager = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    packed = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation=register_varlen_attention()
    ).eval()
    assert packed.config._attn_implementation == ATTN_NAME
    gen = torch.Generator().manual_seed(0)
    lengths = [23, 5, 31]  # longer than the 8-token window, and one shorter
    ids = [torch.randint(0, 500, (n,), generator=gen) for n in lengths]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    with torch.no_grad():
        got = packed(
            torch.cat(ids)[None],
            position_ids=pos,
            cu_seq_lens_q=cu,
            cu_seq_lens_k=cu,
            max_length_q=max(lengths),
            max_length_k=max(lengths),
        ).logits[0]
        want = torch.cat([eager(x[None]).logits[0] for x in ids])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_family_table_rows():
    for t in FAMILY_TYPES:
        assert (t in FAMILIES) == (t not in PROBED_TYPES), t  # probed types train without a row
        assert unsupported_reason(AutoConfig.for_model(t).to_dict()) is None, t


@pytest.mark.parametrize(
    "model_type,extra,expect",
    [
        # Outside the table the packing probe decides (tests/test_probe.py), but not for what sft's loss must apply.
        ("falcon", {"final_logit_softcapping": 30.0}, "not in sft's table of tested families and its config"),
        ("helium", {"num_experts": 4}, "mixture-of-experts routing.* needs a row"),
        # Routers that the packing probe passes (its forward is exact) but whose aux loss sft would not apply.
        ("laguna", {}, r"config.num_experts=256 \(mixture-of-experts routing\) needs a row"),
        ("aria_text", {}, r"config.moe_num_experts=8 \(mixture-of-experts"),
        ("helium", {"num_experts_per_tok": 2}, r"config.num_experts_per_tok=2 \(mixture-of-experts"),
        ("deepseek_v3", {"final_logit_softcapping": 30.0}, "final-logit soft-capping"),
        ("gemma3_text", {"use_bidirectional_attention": True}, "attends to later tokens"),
        ("qwen3", {"logit_scale": 0.0625}, "scaled logits"),  # only the Cohere rows declare logit_scale
        ("llama", {"final_logit_softcapping": 30.0}, "final-logit soft-capping"),
        ("qwen2", {"num_experts": 4}, "mixture-of-experts"),
        ("gemma3", {"text_config": {}}, "multimodal"),
        # Random in training only, in a layout that follows the split: refused like dropout (PhiMoE ships 0.01).
        ("mixtral", {"router_jitter_noise": 0.01}, r"sets router_jitter_noise=0.01: dropout and router jitter are"),
    ],
)
def test_untabled_models_refused_before_loading(demo_dir, tmp_path, model_type, extra, expect):
    import json

    folder = tmp_path / "m"
    folder.mkdir()
    for f in (demo_dir / "model").iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    cfg_json = json.loads((folder / "config.json").read_text())
    cfg_json = {**AutoConfig.for_model(model_type).to_dict(), **cfg_json}  # the type's own keys, as released
    cfg_json.update(model_type=model_type, **extra)
    (folder / "config.json").write_text(json.dumps(cfg_json))
    cfg = compose(base_overrides(demo_dir, tmp_path / "out") + [f"model.partial_pretrain={folder}"])
    from sft.parallel.distributed import WorldInfo

    with pytest.raises(ConfigError, match=expect):
        validate_config(cfg, WorldInfo(rank=0, world_size=1, local_rank=0, local_world_size=1))


@pytest.mark.parametrize("model_type,swiglu", [("phi3", True), ("qwen3_moe", False), ("mixtral", False)])
def test_liger_never_swaps_moe_experts(monkeypatch, model_type, swiglu):
    """Liger's `swiglu` patch of an MoE family replaces the experts by its fused-MoE kernel (a host sync
    per layer, minutes of autotuning, and `model.experts_implementation` ignored): sft asks for its
    RoPE kernel only. Phi-3's fused gate_up MLP keeps Liger's patch. A stand-in for liger-kernel records
    what `apply_liger` asks for (the dense families' MLPs: tests/test_kernels.py)."""
    import sys
    import types

    from sft.ops.patch import apply_liger

    asked: dict = {}

    def fake_apply(
        model=None, rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=True
    ):
        asked.update(rope=rope, rms_norm=rms_norm, swiglu=swiglu, fce=fused_linear_cross_entropy)

    mod = types.ModuleType("liger_kernel.transformers.monkey_patch")
    mod.MODEL_TYPE_TO_APPLY_LIGER_FN = {model_type: fake_apply}
    for name in ("liger_kernel", "liger_kernel.transformers"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers.monkey_patch", mod)
    lm = types.SimpleNamespace(config=types.SimpleNamespace(model_type=model_type), modules=lambda: [])
    apply_liger(lm)
    # rms_norm=False: these families' norms run on PyTorch's fused kernel instead (tests/test_kernels.py)
    assert asked == {"rope": True, "rms_norm": False, "swiglu": swiglu, "fce": False}


LONGROPE = {"rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": 64}


def test_longrope_picks_frequencies_by_the_longest_sample_of_a_batch():
    """Why the check below exists: Phi-3's longrope (as transformers computes it) switches every position of a batch
    to its long factors once the batch's longest sequence passes original_max_position_embeddings, so a short
    sample's logits change with the samples beside it."""
    rope = dict(LONGROPE, short_factor=[1.0] * 4, long_factor=[4.0] * 4, original_max_position_embeddings=16)
    cfg = AutoConfig.for_model(
        "phi3",
        **dict(COMMON, vocab_size=100, max_position_embeddings=64, pad_token_id=0, rope_parameters=rope),
        original_max_position_embeddings=16,  # Phi-3's config writes its own key over the rope parameters'
    )
    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_config(cfg).eval()
    short, long = torch.randint(1, 100, (1, 10)), torch.randint(1, 100, (1, 30))
    alone = lm(short).logits[0]
    with_long = lm(torch.cat([torch.nn.functional.pad(short, (0, 20)), long])).logits[0, :10]
    with_short = lm(torch.cat([short, short])).logits[0]
    assert torch.allclose(with_short, alone, atol=1e-6) and (with_long - alone).abs().max() > 1e-4


@pytest.mark.parametrize(
    "kind,max_length,refused",
    [("dynamic", 256, True), ("dynamic", 64, False), ("longrope", 256, False)],  # longrope: per sample, test_longrope
)
def test_frequency_switching_rope_refused_where_samples_can_pass_the_switch(
    demo_dir, tmp_path, kind, max_length, refused
):
    import json

    from sft.parallel.distributed import WorldInfo

    folder = tmp_path / "m"
    folder.mkdir()
    for f in (demo_dir / "model").iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    cfg_json = json.loads((folder / "config.json").read_text())
    head = cfg_json["hidden_size"] // cfg_json["num_attention_heads"] // 2
    if kind == "longrope":
        rope = dict(LONGROPE, short_factor=[1.0] * head, long_factor=[2.0] * head)
        cfg_json.update(model_type="phi3", max_position_embeddings=1024, original_max_position_embeddings=64)
    else:  # dynamic NTK rescales past max_position_embeddings
        rope = {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}
        cfg_json.update(max_position_embeddings=64)
    cfg_json.update(rope_parameters=rope)
    (folder / "config.json").write_text(json.dumps(cfg_json))
    cfg = compose(
        base_overrides(demo_dir, tmp_path / "out")
        + [f"model.partial_pretrain={folder}", f"data.max_length={max_length}"]
    )
    one = WorldInfo(rank=0, world_size=1, local_rank=0, local_world_size=1)
    if refused:
        with pytest.raises(ConfigError, match=rf"rotary embedding \({kind}\) switches .* data.max_length<=64$"):
            validate_config(cfg, one)
    else:
        validate_config(cfg, one)
