"""Multimodal checkpoints trained on text (sft/models/multimodal.py), on real fully_shard over gloo.

Tiny Gemma 3, Qwen3-VL and Gemma 4 checkpoints (tests/multimodal_models.py) train 2 steps padded (1 process) and
remove-padding + sp=2 (2 processes): same losses and weights; a Mistral 3 one trains with LoRA. The vision side
never reaches the model, the optimizer or the update; the export is the whole checkpoint again (its own class loads
it, processor file copied, vision tensors bit-identical to the input's under their own names and dtypes, language
model trained) and gives the trainer's validation loss; resume, and `sft.merge` of the LoRA run, keep all of that;
what cannot be done is refused in one line before loading.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import base_overrides, two_steps
from distributed_helper import run_ranks
from family_models import rotated_part
from multimodal_models import PROCESSOR_FILE, VISION_DTYPE, write_multimodal_model
from multimodal_workers import train_jobs
from safetensors import safe_open
from transformers import AutoModelForImageTextToText, AutoTokenizer

from sft.cli import compose
from sft.config.checks import validate_config
from sft.config.errors import ConfigError
from sft.data.batch import labels_from_loss_mask
from sft.data.build import build_dataset
from sft.merge import main as merge_main
from sft.models.families import FAMILIES
from sft.models.loading import build_meta_model, load_hf_config
from sft.models.multimodal import FROZEN_FILE
from sft.parallel.distributed import WorldInfo

# Trained padded and with remove-padding + sp=2: Gemma 3, Qwen3-VL, GLM-4.1V and GLM-4.5V (partial multimodal RoPE),
# and Gemma 4 (its text model: per-layer
# embeddings, shared KV, an MoE block, final soft-capping) while its row is in the table, else Mistral 3.
# Mistral 3 trains with LoRA (remove-padding, one process) and goes through sft.merge.
EQUIV = ("gemma3", "qwen3_vl", "glm4v", "glm4v_moe") + (("gemma4",) if "gemma4_text" in FAMILIES else ("mistral3",))
TYPES = (*EQUIV, "mistral3") if "mistral3" not in EQUIV else EQUIV
ONE = WorldInfo(rank=0, local_rank=0, world_size=1, local_world_size=1)
ALL_CONTENTS = 'trainer.checkpoint.save_contents=["model","optimizer","extra","hf_model"]'


def _overrides(demo: Path, model: Path, out: Path, extra: list[str]) -> list[str]:
    return two_steps(demo, model, out, ALL_CONTENTS, *extra, samples=8)


@pytest.fixture(scope="module")
def mm_dirs(demo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("multimodal")
    return {t: write_multimodal_model(demo_dir / "model", root / t, t) for t in TYPES}


@pytest.fixture(scope="module")
def runs(mm_dirs, demo_dir, tmp_path_factory) -> dict[str, dict]:
    """name -> {weights, metrics, optimized, params, buffers, frozen, out}. One process: padded runs (the Gemma 3 one
    saves every step), a resume of that one from step 1, the Mistral 3 LoRA run; two processes: remove-padding + sp=2
    with an fp32 export."""
    tmp = tmp_path_factory.mktemp("multimodal_runs")
    one = {f"padded_{t}": _overrides(demo_dir, mm_dirs[t], tmp / f"padded_{t}", []) for t in EQUIV}
    one["padded_gemma3"].append("trainer.save_freq=1")
    one["resumed_gemma3"] = _overrides(
        demo_dir,
        mm_dirs["gemma3"],
        tmp / "resumed_gemma3",
        ["trainer.resume_mode=resume_path", f"trainer.resume_from_path={tmp / 'padded_gemma3' / 'global_step_1'}"],
    )
    lora = ["use_remove_padding=true", "model.lora_rank=4", "model.lora_alpha=8", "optim.lr=1e-2"]
    one["lora_mistral3"] = _overrides(demo_dir, mm_dirs["mistral3"], tmp / "lora_mistral3", lora)
    sp2 = ["use_remove_padding=true", "ulysses_sequence_parallel_size=2", "trainer.checkpoint.hf_dtype=fp32"]
    two = {f"sp2_{t}": _overrides(demo_dir, mm_dirs[t], tmp / f"sp2_{t}", sp2) for t in EQUIV}
    for world, jobs in ((1, one), (2, two)):
        run_ranks(train_jobs, world, [(ov, str(tmp / f"{name}.pt")) for name, ov in jobs.items()], world)
    return {name: torch.load(tmp / f"{name}.pt", weights_only=False) | {"out": tmp / name} for name in [*one, *two]}


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            out.update({k: st.get_tensor(k) for k in st.keys()})
    return out


def _vision(names) -> list[str]:
    """The vision-side tensors of these three checkpoints: everything outside the language model and its head."""
    return sorted(n for n in names if "language_model" not in n and not n.startswith("lm_head"))


def _model_type(run_name: str) -> str:
    return run_name.split("_", 1)[1]


def _steps(run: dict) -> list[dict]:
    return [m for m in run["metrics"] if "train/loss" in m]


def test_sp2_remove_padding_matches_padded(runs):
    bad = []
    for t in EQUIV:
        ref, got = runs[f"padded_{t}"], runs[f"sp2_{t}"]
        for a, b in zip(_steps(ref), _steps(got), strict=True):
            if b["train/loss"] != pytest.approx(a["train/loss"], rel=1e-5):
                bad.append(f"{t} step {a['step']}: {a['train/loss']} vs {b['train/loss']}")
        for k, w in ref["weights"].items():
            g, w = _effective(t, k, got["weights"][k]), _effective(t, k, w)
            if not torch.allclose(g, w, rtol=1e-4, atol=5e-5):
                bad.append(f"{t} {k}: max diff {(g - w).abs().max():.3g}")
    assert not bad, "\n".join(bad[:20])


def _effective(model_type: str, name: str, w: torch.Tensor) -> torch.Tensor:
    """The entries of `w` that can change the output: GLM-4.1V and GLM-4.5V rotate half of each 16-wide head."""
    if model_type.startswith("glm4v") and name.endswith("self_attn.k_proj.bias"):
        return rotated_part(w, 16, 8)
    return w


def test_vision_side_outside_model_and_optimizer(runs, mm_dirs):
    """The trained model holds the language model and its head only, and the optimizer all its trainable
    parameters (the vision side is in neither); the frozen tensors are exactly the input's vision tensors."""
    for name, run in runs.items():
        assert run["frozen"] == _vision(_tensors(mm_dirs[_model_type(name)])), name
        for n in run["params"] + run["buffers"]:
            assert n.startswith(("lm.model.language_model.", "lm.lm_head.")), (name, n)
        trainable = [n for n in run["params"] if ".lora_" in n] if "lora" in name else run["params"]
        assert sorted(run["optimized"]) == sorted(trainable), name


def _exports(runs) -> dict[str, Path]:
    return {name: run["out"] / "global_step_2" / "huggingface" for name, run in runs.items()}


def test_export_keeps_vision_tensors_bit_identical(runs, mm_dirs):
    """Every vision/projector tensor of each export is the input's: same name, dtype and bytes (bf16 vision through
    an fp32 export, fp32 vision through a bf16 export); no other tensor outside the language model is written."""
    for name, hf in _exports(runs).items():
        t = _model_type(name)
        inputs, exported = _tensors(mm_dirs[t]), _tensors(hf)
        want = _vision(inputs)
        assert _vision(exported) == want, name
        for k in want:
            assert exported[k].dtype == inputs[k].dtype == VISION_DTYPE[t], (name, k, exported[k].dtype)
            assert torch.equal(exported[k].view(torch.uint8), inputs[k].view(torch.uint8)), (name, k)


def test_export_is_the_whole_checkpoint(runs, mm_dirs):
    """Loads with the checkpoint's own class (no missing or unexpected weights), with the original multimodal
    config and the processor file; its language model was trained."""
    for name, hf in _exports(runs).items():
        t = _model_type(name)
        src = json.loads((mm_dirs[t] / "config.json").read_text())
        got = json.loads((hf / "config.json").read_text())
        for key in ("model_type", "architectures", "vision_config"):
            assert got[key] == src[key], (name, key)
        assert {k: v for k, v in got["text_config"].items() if k not in ("use_cache", "dtype")} == {
            k: v for k, v in src["text_config"].items() if k not in ("use_cache", "dtype")
        }, name
        assert (hf / PROCESSOR_FILE).read_bytes() == (mm_dirs[t] / PROCESSOR_FILE).read_bytes(), name
        model, info = AutoModelForImageTextToText.from_pretrained(hf, dtype=torch.float32, output_loading_info=True)
        assert type(model).__name__ == src["architectures"][0], name
        assert not info["missing_keys"] and not info["unexpected_keys"], (name, info)
        before = AutoModelForImageTextToText.from_pretrained(mm_dirs[t], dtype=torch.float32)
        a, b = before.get_decoder().state_dict(), model.get_decoder().state_dict()
        changed = [k for k in a if not torch.equal(a[k], b[k])]
        assert len(changed) > len(a) // 2, (name, len(changed), len(a))
        va, vb = before.state_dict(), model.state_dict()
        assert all(torch.equal(va[k], vb[k]) for k in _vision(va)), name


def test_export_reproduces_val_loss(runs, demo_dir):
    """The fp32 export, run by transformers through the checkpoint's own forward (its own positions: Qwen3-VL
    builds multimodal RoPE positions from the ids), gives the trainer's val/loss."""
    for t in EQUIV:
        run = runs[f"sp2_{t}"]
        val = [m["val/loss"] for m in run["metrics"] if "val/loss" in m][-1]
        hf = run["out"] / "global_step_2" / "huggingface"
        model = AutoModelForImageTextToText.from_pretrained(hf, dtype=torch.float32).eval()
        cfg = compose(_overrides(demo_dir, hf, run["out"], []))
        ds = build_dataset(f"{demo_dir}/val.parquet", AutoTokenizer.from_pretrained(hf), cfg.data, 4, False)
        total, count = 0.0, 0
        with torch.no_grad():
            for i in range(len(ds)):
                item = ds[i]
                labels = labels_from_loss_mask(item["input_ids"][None], item["loss_mask"][None])
                logits = model(input_ids=item["input_ids"][None]).logits.float()
                total += float(F.cross_entropy(logits[0], labels[0], reduction="sum", ignore_index=-100))
                count += int((labels != -100).sum())
        assert total / count == pytest.approx(val, rel=1e-5), t


def test_resume_from_checkpoint(runs):
    """Resumed at step 1, the run ends where the uninterrupted one did, and its export is still whole."""
    ref, got = runs["padded_gemma3"], runs["resumed_gemma3"]
    assert [m["train/loss"] for m in _steps(got)] == pytest.approx([_steps(ref)[-1]["train/loss"]], rel=1e-6)
    for k, w in ref["weights"].items():
        torch.testing.assert_close(got["weights"][k], w, rtol=1e-6, atol=1e-7)
    assert (ref["out"] / "global_step_1" / FROZEN_FILE).is_file()


def test_merge_writes_the_whole_checkpoint(runs, mm_dirs, tmp_path):
    """`python -m sft.merge` of a LoRA checkpoint: the same tensors as the online export, vision bytes included."""
    run = runs["lora_mistral3"]
    ckpt = run["out"] / "global_step_2"
    out = tmp_path / "merged"
    assert merge_main([str(ckpt), str(out)]) == 0
    merged, online = _tensors(out), _tensors(ckpt / "huggingface")
    assert merged.keys() == online.keys()
    for k in merged:
        assert merged[k].dtype == online[k].dtype and torch.equal(merged[k], online[k]), k
    inputs = _tensors(mm_dirs["mistral3"])
    assert all(torch.equal(merged[k], inputs[k]) and merged[k].dtype == inputs[k].dtype for k in _vision(inputs))
    assert (out / PROCESSOR_FILE).is_file()
    model, info = AutoModelForImageTextToText.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
    assert type(model).__name__ == "Mistral3ForConditionalGeneration" and not info["missing_keys"]
    # The adapter names language-model modules by path (Pixtral has q_proj too) and gives the merged logits.
    from peft import PeftModel

    base = AutoModelForImageTextToText.from_pretrained(mm_dirs["mistral3"], dtype=torch.float32)
    peft = PeftModel.from_pretrained(base, ckpt / "lora_adapter").eval()
    adapted = [n for n, m in peft.named_modules() if hasattr(m, "lora_A")]
    assert adapted and all(".language_model." in n for n in adapted)
    ids = torch.arange(3, 40)[None]
    with torch.no_grad():
        got, merged_logits = peft(input_ids=ids).logits, model.eval()(input_ids=ids).logits
        with peft.disable_adapter():
            untrained = peft(input_ids=ids).logits
    # The merge is bf16 (its default): far closer to base + adapter than the adapter's own effect.
    assert (got - merged_logits).abs().max() < 0.1 * (got - untrained).abs().max()
    # Without its frozen tensors the checkpoint cannot be merged whole: refused, not written half.
    (ckpt / FROZEN_FILE).unlink()
    assert merge_main([str(ckpt), str(tmp_path / "half")]) == 2
    assert not (tmp_path / "half").exists()


def _edited(mm_dir: Path, tmp_path: Path, edit) -> Path:
    folder = tmp_path / "m"
    shutil.copytree(mm_dir, folder)
    cfg = json.loads((folder / "config.json").read_text())
    edit(cfg)
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


@pytest.mark.parametrize(
    "model_type,edit,expect",
    [
        # A text model sft cannot train: the whole checkpoint is refused.
        (
            "gemma3",
            lambda c: c["text_config"].update(model_type="gemma3n_text"),
            "text_config.model_type='gemma3n_text'",
        ),
        # Gemma 3's class does not apply its text model's final soft-capping: training with it would not be exact.
        (
            "gemma3",
            lambda c: c["text_config"].update(final_logit_softcapping=30.0),
            "text_config.final_logit_softcapping",
        ),
        ("mistral3", lambda c: c["text_config"].update(num_local_experts=4), "mixture-of-experts"),
        (
            "qwen3_vl",
            lambda c: c.update(architectures=["NoSuchModel"], model_type="no_such_vlm"),
            "has no class for model_type='no_such_vlm'",
        ),
    ],
)
def test_refused_before_loading(mm_dirs, demo_dir, tmp_path, model_type, edit, expect):
    folder = _edited(mm_dirs[model_type], tmp_path, edit)
    cfg = compose(base_overrides(demo_dir, tmp_path / "out") + [f"model.partial_pretrain={folder}"])
    with pytest.raises(ConfigError, match=expect) as info:
        validate_config(cfg, ONE)
    assert "\n" not in str(info.value)


def test_a_tower_this_environment_cannot_build_is_refused_before_loading(mm_dirs, demo_dir, tmp_path):
    """Perception LM's and FastVLM's vision towers are timm models: without timm the checkpoint's class cannot be
    built, which loading would say only after the data is tokenised. The checks build each tower on the meta device."""
    import importlib.util

    from transformers import AutoConfig

    if importlib.util.find_spec("timm") is not None:
        pytest.skip("timm is installed here, so the tower builds")
    timm_tower = AutoConfig.for_model("timm_wrapper").to_dict()
    folder = _edited(mm_dirs["mistral3"], tmp_path, lambda c: c.update(vision_config=timm_tower))
    cfg = compose(base_overrides(demo_dir, tmp_path / "out") + [f"model.partial_pretrain={folder}"])
    with pytest.raises(
        ConfigError, match=r"its vision_config \(timm_wrapper\) cannot be built: TimmWrapperModel "
    ) as info:
        validate_config(cfg, ONE)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("implementation", ["grouped_mm", "eager"])
def test_experts_implementation_reaches_the_text_model_of_any_wrapper(demo_dir, tmp_path, implementation):
    """Kimi K2.5's wrapper refuses `experts_implementation` at its top level (its module does not declare it), which
    failed at load after tokenisation; sft addresses the choice to the text model, whose experts take it."""
    folder = write_multimodal_model(demo_dir / "model", tmp_path / "kimi", "kimi_k25")
    cfg = compose(
        base_overrides(demo_dir, tmp_path / "out")
        + [f"model.partial_pretrain={folder}", f"model.experts_implementation={implementation}"]
    )
    validate_config(cfg, ONE)
    model = build_meta_model(load_hf_config(cfg), cfg)
    experts = [m for name, m in model.named_modules() if name.endswith("mlp.experts")]
    assert experts and {m.config._experts_implementation for m in experts} == {implementation}


def test_packed_attention_is_the_text_models_only(demo_dir, tmp_path):
    """DeepSeek-VL-Hybrid's SAM encoder looks its attention class up by the model's attention name: sft's packed
    attention, given to the whole checkpoint, failed with a KeyError when the model was built, after tokenising.
    The text model alone takes it."""
    from sft.models.attention.varlen import ATTN_NAME

    folder = write_multimodal_model(demo_dir / "model", tmp_path / "dsvl", "deepseek_vl_hybrid")
    cfg = compose(
        base_overrides(demo_dir, tmp_path / "out") + [f"model.partial_pretrain={folder}", "use_remove_padding=true"]
    )
    validate_config(cfg, ONE)
    model = build_meta_model(load_hf_config(cfg), cfg)
    assert model.lm.get_decoder().config._attn_implementation == ATTN_NAME


def test_a_weights_layout_sft_cannot_map_is_refused_before_the_data(mm_dirs, demo_dir, tmp_path):
    """A checkpoint whose files name the vision tensors in a layout of their own (Cosmos 3 Omni's save writes
    `blocks.N.*`): sft cannot tell which stored tensors to keep, and says so in the checks, before tokenising."""
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "m"
    shutil.copytree(mm_dirs["mistral3"], folder)
    weights = load_file(folder / "model.safetensors")
    renamed = {k.replace("vision_tower.", "blocks."): v for k, v in weights.items()}
    assert renamed.keys() != weights.keys()
    save_file(renamed, folder / "model.safetensors", metadata={"format": "pt"})
    cfg = compose(base_overrides(demo_dir, tmp_path / "out") + [f"model.partial_pretrain={folder}"])
    with pytest.raises(ConfigError, match="cannot tell this checkpoint's vision tensors apart") as info:
        validate_config(cfg, ONE)
    assert "\n" not in str(info.value)


def test_bin_weights_refused(mm_dirs, demo_dir, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(mm_dirs["mistral3"], folder)
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    cfg = compose(base_overrides(demo_dir, tmp_path / "out") + [f"model.partial_pretrain={folder}"])
    with pytest.raises(ConfigError, match="needs safetensors weights"):
        validate_config(cfg, ONE)


@pytest.mark.parametrize(
    "extra,expect",
    [
        # LoRA on a module that only the vision tower has (Pixtral's patch convolution, SigLIP's out_proj).
        (["model.lora_rank=4", "model.target_modules=[patch_conv]"], "outside the language model"),
        (["+model.override_config.vision_config={hidden_size: 8}"], "vision_config cannot be replaced"),
    ],
)
def test_vision_side_keys_refused(mm_dirs, demo_dir, tmp_path, extra, expect):
    cfg = compose(
        base_overrides(demo_dir, tmp_path / "out") + [f"model.partial_pretrain={mm_dirs['mistral3']}", *extra]
    )
    with pytest.raises(ValueError, match=expect) as info:
        build_meta_model(load_hf_config(cfg), cfg)
    assert "\n" not in str(info.value)


def test_text_override_reaches_text_config(mm_dirs, demo_dir, tmp_path):
    """+model.override_config.<key> of a text-model entry sets the text config (the wrapper has no such key)."""
    cfg = compose(
        base_overrides(demo_dir, tmp_path / "out")
        + [f"model.partial_pretrain={mm_dirs['qwen3_vl']}", "+model.override_config.attention_dropout=0.0"]
    )
    hf = load_hf_config(cfg)
    assert hf.text_config.attention_dropout == 0.0 and not hf.text_config.use_cache
    assert "attention_dropout" not in hf.to_diff_dict()
