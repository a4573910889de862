"""Vision-language SFT on tiny random Qwen2.5-VL, Qwen3-VL, Qwen3-VL-MoE, Qwen3.5 (Gated DeltaNet), Gemma 3 and
Gemma 4 checkpoints (CPU, fp32, real fully_shard on gloo).

Padded (one process) = packed + sp=2 (two processes), and for Qwen2.5-VL, Qwen3-VL, Gemma 3 and Gemma 4 = packed
(one process), on losses and on weights after two steps; the fp32 export loads with the checkpoint's own class and,
run by plain transformers (its own rotary index, its own image merge and Gemma's both-ways image masks, one sample
at a time), reproduces the trainer's validation loss. Planted bugs must break the equality: the image positions of a
packed row's later samples offset by the samples before them, and (Gemma) image tokens attending causally only.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from distributed_helper import run_ranks
from transformers import AutoModelForImageTextToText
from vision_data import write_vision_rows
from vision_models import write_vision_model
from vision_workers import train_jobs

from sft.cli import compose
from sft.data.batch import labels_from_loss_mask
from sft.data.build import build_dataset
from sft.data.images import load_image
from sft.data.processor import load_processor
from sft.models.attention.image_blocks import ImageBlocks
from sft.models.attention.varlen import register_varlen_attention
from sft.models.vision import PIXEL_KEYS

TYPES = ("qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe", "gemma3", "gemma4")
PACKED_TYPES = ("qwen2_5_vl", "qwen3_vl", "gemma3", "gemma4")  # also packed in one process
PLANTED_TYPES = ("qwen2_5_vl", "gemma3")  # multimodal rotary positions, and 1-D positions
# Where each family's vision tower sits (sft/models/vision.py); its weights must train.
TOWER = {t: ".visual." for t in TYPES} | {"gemma3": ".vision_tower.", "gemma4": ".vision_tower."}
# Gemma 4 makes every image about 70 tokens (its smallest setting), so its rows are longer.
MAX_LENGTH = {t: 256 for t in TYPES} | {"gemma4": 512}


def _overrides(model: Path, data: Path, out: Path, *extra: str, max_length: int = 256) -> list[str]:
    return [
        f"data.train_files={data}",
        f"data.val_files={data}",
        "data.multiturn.enable=true",
        f"data.max_length={max_length}",
        "data.train_max_samples=8",
        "data.val_max_samples=4",
        "data.train_batch_size=4",
        "data.micro_batch_size_per_gpu=2",
        "use_remove_padding=false",
        f"model.partial_pretrain={model}",
        "model.enable_gradient_checkpointing=false",
        "optim.lr=1e-3",
        "optim.weight_decay=0.1",
        "optim.clip_grad=1e9",
        "trainer.total_training_steps=2",
        "trainer.resume_mode=disable",
        "trainer.logger=[]",
        f"trainer.default_local_dir={out}",
        "trainer.checkpoint.save_contents=[]",
        *extra,
    ]


@pytest.fixture(scope="module")
def vision_dirs(demo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vision")
    out = {t: write_vision_model(demo_dir / "model", root / t, t) for t in TYPES}
    out["data"] = write_vision_rows(root / "data", 16, seed=0, layout="verl")
    return out


PACKED = ["use_remove_padding=true"]
SP2 = ["ulysses_sequence_parallel_size=2"]
SAVE = ["trainer.save_freq=1", 'trainer.checkpoint.save_contents=["model","optimizer","extra"]']
FROZEN = ["model.freeze_vision_tower=true"]
LORA = ["model.lora_rank=4", "model.lora_alpha=8", "optim.lr=1e-2"]
EXPORT = ['trainer.checkpoint.save_contents=["hf_model"]', "trainer.checkpoint.hf_dtype=fp32"]


@pytest.fixture(scope="module")
def runs(vision_dirs, tmp_path_factory) -> dict[str, dict]:
    tmp = tmp_path_factory.mktemp("vision_runs")
    data = vision_dirs["data"]
    one, two, planted = {}, {}, {}
    for t in TYPES:
        n = MAX_LENGTH[t]
        one[f"padded_{t}"] = _overrides(vision_dirs[t], data, tmp / f"padded_{t}", max_length=n)
        two[f"sp2_{t}"] = _overrides(vision_dirs[t], data, tmp / f"sp2_{t}", *PACKED, *SP2, *EXPORT, max_length=n)
    for t in PACKED_TYPES:
        n = MAX_LENGTH[t]
        one[f"packed_{t}"] = _overrides(vision_dirs[t], data, tmp / f"packed_{t}", *PACKED, *SAVE, max_length=n)
    resume = [
        "trainer.resume_mode=resume_path",
        f"trainer.resume_from_path={tmp / 'packed_qwen2_5_vl' / 'global_step_1'}",
        "trainer.checkpoint.load_contents=[model,optimizer,extra]",
    ]
    one["resumed_qwen2_5_vl"] = _overrides(
        vision_dirs["qwen2_5_vl"], data, tmp / "resumed_qwen2_5_vl", *PACKED, *resume
    )
    for t in PLANTED_TYPES:
        planted[f"planted_{t}"] = _overrides(
            vision_dirs[t], data, tmp / f"planted_{t}", *PACKED, max_length=MAX_LENGTH[t]
        )
    causal = {
        f"causal_{t}": _overrides(vision_dirs[t], data, tmp / f"causal_{t}", *PACKED, max_length=MAX_LENGTH[t])
        for t in ("gemma3", "gemma4")
    }
    one["frozen_qwen3_vl"] = _overrides(vision_dirs["qwen3_vl"], data, tmp / "frozen_qwen3_vl", *PACKED, *FROZEN)
    one["lora_qwen2_5_vl"] = _overrides(
        vision_dirs["qwen2_5_vl"], data, tmp / "lora_qwen2_5_vl", *PACKED, *LORA, *EXPORT
    )
    for world, jobs, plant in ((1, one, None), (2, two, None), (1, planted, "positions"), (1, causal, "causal")):
        run_ranks(train_jobs, world, [(ov, str(tmp / f"{name}.pt")) for name, ov in jobs.items()], world, plant)
    return {
        name: torch.load(tmp / f"{name}.pt", weights_only=False) | {"out": tmp / name}
        for name in [*one, *two, *planted, *causal]
    }


def _steps(run: dict, key: str = "train/loss") -> list[float]:
    return [m[key] for m in run["metrics"] if key in m]


def _differences(ref: dict, got: dict, name: str) -> list[str]:
    bad = []
    for step, (a, b) in enumerate(zip(_steps(ref), _steps(got), strict=True), start=1):
        if b != pytest.approx(a, rel=1e-5):
            bad.append(f"{name} step {step}: loss {a} vs {b}")
    for k, w in ref["weights"].items():
        # atol: a tenth of one AdamW step (lr 1e-3). Adam moves an element by about lr * g / |g|, so where a
        # gradient is all but zero, float rounding of g moves that element by a fraction of lr, whatever the code.
        if not torch.allclose(got["weights"][k], w, rtol=1e-4, atol=1e-4):
            bad.append(f"{name} {k}: max diff {(got['weights'][k] - w).abs().max():.3g}")
    return bad


@pytest.mark.parametrize("model_type", TYPES)
def test_packed_and_sp2_match_padded(runs, model_type):
    ref = runs[f"padded_{model_type}"]
    bad = _differences(ref, runs[f"sp2_{model_type}"], "sp2")
    if f"packed_{model_type}" in runs:  # one process, packed: for two families (sp2 packs too)
        bad += _differences(ref, runs[f"packed_{model_type}"], "packed")
    assert not bad, "\n".join(bad[:20])
    # The vision tower trains: its weights moved, and the optimizer holds them.
    visual = [k for k in ref["weights"] if TOWER[model_type] in k]
    assert visual and any(n for n in ref["optimized"] if TOWER[model_type] in n)


@pytest.mark.parametrize("model_type", PLANTED_TYPES)
def test_planted_position_shift_breaks_equality(runs, model_type):
    assert _differences(runs[f"padded_{model_type}"], runs[f"planted_{model_type}"], "planted")


@pytest.mark.parametrize("model_type", ["gemma3", "gemma4"])
def test_planted_causal_image_blocks_break_equality(runs, model_type):
    """Gemma's image tokens attend to each other both ways: packed rows without the blocks differ from padded."""
    assert _differences(runs[f"padded_{model_type}"], runs[f"causal_{model_type}"], "causal")


def test_gemma4_full_layers_stay_causal(vision_dirs):
    """Gemma 4 lets an image's tokens see each other both ways in its sliding-window layers only. The packed
    decoder (sft's varlen attention with the row's image blocks) gives the hidden states of the model's own wrapper
    (transformers' masks, from mm_token_type_ids) to 1e-5, and blocks applied in every layer would not."""
    model = AutoModelForImageTextToText.from_pretrained(vision_dirs["gemma4"], dtype=torch.float32).eval()
    image, boi, eoi = (model.config.image_token_id, model.config.boi_token_id, model.config.eoi_token_id)
    ids = torch.tensor([[5, 6, 7, boi, *[image] * 20, eoi, *range(30, 50)]])
    n = ids.shape[1]
    g = torch.Generator().manual_seed(0)
    features = torch.randn(1, n, model.config.text_config.hidden_size, generator=g)
    embeds = model.get_input_embeddings()(ids) + features * (ids == image)[..., None]  # stand-in image features
    per_layer = model.model.language_model.get_per_layer_inputs(ids.masked_fill(ids == image, 0), None)
    common = dict(inputs_embeds=embeds, per_layer_inputs=per_layer, position_ids=torch.arange(n)[None])
    with torch.no_grad():
        theirs = model.model(**common, mm_token_type_ids=(ids == image).long(), attention_mask=torch.ones_like(ids))
        model.model.language_model.config._attn_implementation = register_varlen_attention()
        cu = torch.tensor([0, n], dtype=torch.int32)
        packed = dict(common, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=n, max_length_k=n)
        packed["attention_mask"] = torch.ones_like(ids)
        ours, everywhere = (
            model.model.language_model(**packed, image_blocks=ImageBlocks.find(ids[0] == image, [0, n], sliding))
            for sliding in (True, False)
        )
    err = (ours.last_hidden_state - theirs.last_hidden_state).abs().max().item()
    wrong = (everywhere.last_hidden_state - theirs.last_hidden_state)[0, 25:].abs().max().item()
    assert err < 1e-5 and wrong > 100 * err, (err, wrong)


@pytest.mark.parametrize("model_type", TYPES)
def test_export_reproduces_val_loss(runs, vision_dirs, model_type):
    """The export, loaded by its own class and run by plain transformers (the model computes its own multimodal
    positions and merges the image features itself), gives the trainer's validation loss."""
    run = runs[f"sp2_{model_type}"]
    export = run["out"] / "global_step_2" / "huggingface"
    model = AutoModelForImageTextToText.from_pretrained(export, dtype=torch.float32).eval()
    assert (
        type(model).__name__ == AutoModelForImageTextToText.from_pretrained(vision_dirs[model_type]).__class__.__name__
    )
    cfg = compose(
        _overrides(export, vision_dirs["data"], run["out"] / "reload", *PACKED, max_length=MAX_LENGTH[model_type])
    )
    processor = load_processor(str(export), __import__("transformers").AutoTokenizer.from_pretrained(export))
    ds = build_dataset(str(vision_dirs["data"]), processor.tokenizer, cfg.data, 4, False, processor=processor)
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(len(ds)):
            item = ds[i]
            images = [load_image(r, item["where"]) for r in item["images"]]
            out = processor.image_processor(images=images, return_tensors="pt")
            pixels = {k: out[k] for k in PIXEL_KEYS if k in out}
            ids = item["input_ids"][None]
            # Gemma 3 reads its image blocks from token_type_ids; Gemma 4 from mm_token_type_ids, Qwen its rotary index.
            types = "token_type_ids" if model_type == "gemma3" else "mm_token_type_ids"
            kwargs = {types: (ids == model.config.image_token_id).long()}
            logits = model(input_ids=ids, **pixels, **kwargs, use_cache=False).logits.float()
            labels = labels_from_loss_mask(ids, item["loss_mask"][None])
            total += float(F.cross_entropy(logits[0], labels[0], reduction="sum", ignore_index=-100))
            count += int((labels != -100).sum())
    assert _steps(run, "val/loss")[-1] == pytest.approx(total / count, rel=1e-5)


def _initial(folder: Path) -> dict[str, torch.Tensor]:
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32)
    return {f"lm.{k}": v for k, v in model.state_dict().items()}


def test_freeze_vision_tower(runs, vision_dirs):
    """model.freeze_vision_tower: the tower's weights end as they started and the optimizer never holds them; the
    projector (merger, deepstack mergers) and the language model train."""
    run, start = runs["frozen_qwen3_vl"], _initial(vision_dirs["qwen3_vl"])
    projector = (".visual.merger.", ".visual.deepstack_merger_list.")
    tower = [k for k in run["weights"] if ".visual." in k and not any(p in k for p in projector)]
    moved = [k for k in run["weights"] if not torch.equal(run["weights"][k], start[k])]
    assert tower and not set(tower) & set(moved)
    assert any(any(p in k for p in projector) for k in moved) and any(".language_model." in k for k in moved)
    assert not [n for n in run["optimized"] if n in tower]


def test_lora_adapts_the_language_model_only(runs, vision_dirs):
    """LoRA on a vision-language model: adapters in the text decoder only (the tower's MLPs share its leaf names),
    every base weight unchanged, and the merged export differs from the input in the language model only."""
    run, start = runs["lora_qwen2_5_vl"], _initial(vision_dirs["qwen2_5_vl"])
    assert run["optimized"] and all(".lora_" in n and ".language_model." in n for n in run["optimized"])
    base = {k: w for k, w in run["weights"].items() if ".lora_" not in k}
    changed = [k for k, w in base.items() if not torch.equal(w, start[k.replace(".base_layer", "")])]
    assert not changed, changed[:5]
    export = AutoModelForImageTextToText.from_pretrained(run["out"] / "global_step_2" / "huggingface").state_dict()
    merged = [k for k, w in export.items() if not torch.equal(w, start[f"lm.{k}"])]
    assert merged and all(".language_model." in k for k in merged), merged[:5]
    assert (run["out"] / "global_step_2" / "lora_adapter" / "adapter_config.json").is_file()


def test_resume_is_exact(runs):
    """Killed after step 1 and resumed from its checkpoint (the vision tower's weights and optimizer state included):
    step 2 and the final weights are the uninterrupted run's, bit for bit."""
    ref, got = runs["packed_qwen2_5_vl"], runs["resumed_qwen2_5_vl"]
    assert _steps(got) == _steps(ref)[1:]
    assert all(torch.equal(got["weights"][k], w) for k, w in ref["weights"].items())
