"""`python -m sft.bench.vision` on CPU: its assets (the published Qwen2.5-VL-3B dimensions, a processor that loads
without torchvision, image chats whose token counts are the processor's), the sft side end to end on a tiny
variant, and the TRL side where trl is installed (its token counts equal sft's on the same rows)."""

from __future__ import annotations

import io
import json
import shlex
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import transformers
from packaging.version import Version
from PIL import Image
from transformers import AutoTokenizer

from sft.bench import vision as bench
from sft.bench.trl_vision import as_parts, trl_available
from sft.bench.vision_assets import (
    CHAT_TEMPLATE,
    IMAGE_TAG,
    MAX_SIDE,
    MIN_SIDE,
    TRL_CHAT_TEMPLATE,
    VISION_TOKENS,
    build_vision_tokenizer,
    vision_config,
    write_vision_model,
    write_vision_rows,
)
from sft.data.images import image_refs, load_image
from sft.data.processor import load_processor
from sft.data.vision_dataset import image_token_count

# Test-only widths: the shape's layout (window and full-attention blocks, multimodal rotary) at toy sizes.
TINY = {
    "text": dict(
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=1088,
        rope_parameters=dict(rope_type="default", rope_theta=1_000_000.0, mrope_section=[2, 3, 3]),
    ),
    "vision": dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, fullatt_block_indexes=[1]),
}  # fmt: skip


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bench_vision")
    return {
        "model": write_vision_model(root / "model", layers=1, widths=TINY),
        "rows": write_vision_rows(root / "rows.parquet", 6, seed=1, workers=1),  # the released image sizes
        "small": write_vision_rows(root / "small.parquet", 4, seed=2, min_side=28, max_side=84, workers=1),
    }


@pytest.fixture
def fresh_world(monkeypatch):
    for key in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)


def test_shape_is_qwen2_5_vl_3b():
    cfg = vision_config("qwen2.5-vl-3b", build_vision_tokenizer())
    text, vision = cfg.text_config, cfg.vision_config
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads) == (
        2048,
        36,
        16,
        2,
    )
    assert (text.intermediate_size, text.vocab_size, cfg.tie_word_embeddings) == (11008, 151936, True)
    assert text.rope_parameters["mrope_section"] == [16, 24, 24] and text.rope_parameters["rope_theta"] == 1e6
    assert (vision.depth, vision.hidden_size, vision.num_heads, vision.intermediate_size) == (32, 1280, 16, 3420)
    assert (vision.out_hidden_size, vision.window_size, vision.fullatt_block_indexes) == (2048, 112, [7, 15, 23, 31])
    assert (vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size) == (14, 2, 2)
    assert vision_config("qwen2.5-vl-3b", build_vision_tokenizer(), layers=8).text_config.num_hidden_layers == 8
    with pytest.raises(ValueError, match="--layers 37"):
        vision_config("qwen2.5-vl-3b", build_vision_tokenizer(), layers=37)


def test_assets_load_and_count_like_the_processor(tiny):
    folder = tiny["model"]
    tok = AutoTokenizer.from_pretrained(folder)
    processor = load_processor(str(folder), tok)
    assert type(processor).__name__ == "Qwen2_5_VLProcessor" and processor.tokenizer is tok
    size = processor.image_processor.size
    assert (size["shortest_edge"], size["longest_edge"]) == (3136, 12845056)  # what Qwen2.5-VL ships
    assert all(tok.convert_tokens_to_ids(t) != tok.unk_token_id for t in VISION_TOKENS.values())
    rows = pq.read_table(tiny["rows"]).to_pylist()
    pad = tok.convert_tokens_to_ids(VISION_TOKENS["image"])
    counts = []
    for i, row in enumerate(rows):
        n_tags = sum(m["content"].count(IMAGE_TAG) for m in row["messages"])
        assert 1 <= n_tags <= 3 and n_tags == len(row["images"])
        refs = image_refs(row["images"], f"row {i}", "images", tiny["rows"].parent)
        images = [load_image(r, f"row {i}") for r in refs]
        for im, raw in zip(images, row["images"]):
            assert Image.open(io.BytesIO(raw["bytes"])).format == "JPEG"
            assert MIN_SIDE <= min(im.size) and max(im.size) <= MAX_SIDE
        expected = [image_token_count(processor, im.height, im.width) for im in images]
        text = processor.apply_chat_template(as_parts(row["messages"]), tokenize=False)
        out = processor(text=[text], images=images, return_tensors="np")
        assert [int(g.prod()) // 4 for g in out["image_grid_thw"]] == expected
        assert int((out["input_ids"][0] == pad).sum()) == sum(expected)
        words = sum(len(m["content"].replace(IMAGE_TAG, " ").split()) for m in row["messages"])
        assert 70 <= words <= 800  # a few hundred text tokens around the images
        counts += expected
    assert min(counts) >= 64 and max(counts) <= 1400 and max(counts) > 3 * min(counts)  # mixed sizes
    again = write_vision_rows(tiny["rows"].parent / "again.parquet", 6, seed=1, workers=2)
    assert pq.read_table(again).to_pylist() == rows  # deterministic, whatever the worker count


def test_trl_template_renders_like_ours(tiny):
    tok = AutoTokenizer.from_pretrained(tiny["model"])
    assert tok.chat_template == CHAT_TEMPLATE
    trl_tok = AutoTokenizer.from_pretrained(tiny["model"])
    trl_tok.chat_template = TRL_CHAT_TEMPLATE
    for row in pq.read_table(tiny["rows"]).to_pylist():
        for messages in (row["messages"], as_parts(row["messages"])):  # verl strings and TRL's parts
            text = tok.apply_chat_template(messages, tokenize=False)
            assert trl_tok.apply_chat_template(messages, tokenize=False) == text
        assert text.count("<|vision_start|><|image_pad|><|vision_end|>") == len(row["images"])
        enc = trl_tok.apply_chat_template(
            as_parts(row["messages"]), tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        replies = [m["content"] for m in row["messages"] if m["role"] == "assistant"]
        assert sum(enc["assistant_masks"]) == sum(len(tok(r)["input_ids"]) + 1 for r in replies)  # + <|im_end|>


def test_sft_side_runs_the_users_command(tiny, tmp_path, capsys, monkeypatch, fresh_world):
    cmd = bench.sft_command(
        bench.parse_args(["--dtype", "bf16"])[0], Path("/m"), Path("/d.parquet"), Path("/w"), ["optim.lr=2e-5"]
    )
    assert cmd.startswith(f"{bench.launcher()} -m sft.fsdp_sft_trainer ") and "--nproc_per_node=1" in cmd
    argv = shlex.split(cmd)
    assert "optim.lr=2e-5" in argv
    for key in ("use_remove_padding=true", "data.micro_batch_size_per_gpu=2", "model.fsdp_config.model_dtype=bf16"):
        assert key in argv  # verl's production keys, as a user types them
    # The same command on CPU without torchrun's start-up (one process either way). One intra-op thread: on a
    # 2-core machine, two threads beside the loader's image thread make these tiny steps ten times slower.
    monkeypatch.setattr(bench, "launcher", lambda: shlex.quote(sys.executable))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    args = ["--model", str(tiny["model"]), "--data", str(tiny["small"]), "--baseline", "none", "--steps", "1",
            "--warmup", "1", "--batch", "2", "--trl-batch", "2", "--dtype", "fp32", "--max-length", "2048",
            "--workdir", str(tmp_path), "--out", str(tmp_path / "out.json")]  # fmt: skip
    assert bench.main(args) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out == json.loads((tmp_path / "out.json").read_text())
    assert out["exit_status"] == 0 and out["run"] == "sft" and out["device"] == "cpu"
    assert out["timed_steps"] == 1 and out["profiled_step"] == 3  # warm-up 1, timed 1, profiled 1
    assert out["tokens_per_s_per_gpu"] > out["trained_tokens_per_s_per_gpu"] > 0
    assert out["time_to_first_step_s"] > 0 and out["step_time_s_median"] > 0 and len(out["losses"]) == 3
    stats = out["data_stats"]
    assert stats["rows"] == 4 and 1 <= stats["images_per_row"] <= 3 and stats["image_tokens_per_row"] > 0
    assert out["tokens_per_step"] > stats["image_tokens_per_row"]  # two rows, their image tokens counted
    assert out["baseline_runs"] == [] and out["speedup_vs_baseline"] is None
    assert (tmp_path / "logs" / "sft.log").read_text().count("step 3/3") == 1


def test_refusals(capsys, monkeypatch, tmp_path):
    for argv, message in (
        (["trainer.total_training_steps=3"], "set by the benchmark"),
        (["--model", "/m"], "--model and --data go together"),
        (["--batch", "30", "--trl-batch", "4"], "multiple of --trl-batch"),
    ):
        with pytest.raises(SystemExit) as exc:
            bench.parse_args(argv)
        assert exc.value.code == 2 and message in capsys.readouterr().err
    monkeypatch.setattr("sft.bench.trl_vision.trl_available", lambda: False)
    assert bench.main(["--workdir", str(tmp_path)]) == 2
    assert "pip install trl datasets" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # refused before writing anything


needs_trl = pytest.mark.skipif(not trl_available(), reason="the TRL baseline needs trl and datasets")
# TRL's assistant-only loss on images needs the processor's assistant mask of transformers 5.18+; before, TRL
# trains every token (the benchmark says so in `assistant_only_loss`).
ASSISTANT_MASKS = Version(transformers.__version__) >= Version("5.18.0.dev0")


@needs_trl
def test_trl_counts_tokens_like_sft(tiny):
    """TRL's collator on the bench's rows: the same ids as sft's dataset, and the same trained tokens."""
    from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

    from sft.bench.trl_vision import trl_dataset
    from sft.config.schema import DataConfig
    from sft.data.build import build_dataset

    folder = tiny["model"]
    processor = load_processor(str(folder), AutoTokenizer.from_pretrained(folder))
    cfg = DataConfig(train_files=str(tiny["rows"]), max_length=8192)
    cfg.multiturn.enable = True
    ours = build_dataset(str(tiny["rows"]), processor.tokenizer, cfg, pad_to_max_length=False, processor=processor)
    trl_processor = load_processor(str(folder), AutoTokenizer.from_pretrained(folder))
    trl_processor.chat_template = TRL_CHAT_TEMPLATE
    collate = DataCollatorForVisionLanguageModeling(trl_processor, max_length=8192, assistant_only_loss=ASSISTANT_MASKS)
    examples = list(trl_dataset(tiny["rows"]))
    for i, example in enumerate(examples):
        batch = collate([example])
        ids, mask = ours.token_ids(i)
        assert batch["input_ids"][0].tolist() == ids.tolist()
        trained = int((batch["labels"][0, 1:] != -100).sum())
        assert trained == (int(mask.sum()) if ASSISTANT_MASKS else len(ids) - 1)


@needs_trl
def test_trl_side_runs(tiny, tmp_path, capsys, monkeypatch, fresh_world):
    monkeypatch.setattr(bench, "launcher", lambda: shlex.quote(sys.executable))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    args = ["--model", str(tiny["model"]), "--data", str(tiny["small"]), "--steps", "1", "--warmup", "1",
            "--batch", "2", "--trl-batch", "1", "--trl-workers", "0", "--trl-liger", "off", "--dtype", "fp32",
            "--max-length", "2048", "--workdir", str(tmp_path)]  # fmt: skip
    assert bench.main(args) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    (trl,) = out["baseline_runs"]
    assert trl["name"] == "trl-sdpa" and trl["exit_status"] == 0 and trl["timed_steps"] == 1
    assert trl["per_device_batch"] == 1 and trl["grad_accum"] == 2
    assert trl["assistant_only_loss"] == ASSISTANT_MASKS
    assert trl["tokens_per_s_per_gpu"] > trl["trained_tokens_per_s_per_gpu"] > 0  # the first token is no target
    assert trl["padding_frac"] == 0.0  # one row per micro-batch: nothing padded
    assert out["speedup_vs_baseline"] == pytest.approx(out["tokens_per_s_per_gpu"] / trl["tokens_per_s_per_gpu"])
