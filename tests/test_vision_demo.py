"""The vision demo: its assets (processor counts, template, rows only the image answers), its grading helpers
against plain transformers, and `python -m sft.demo vision` run short, which must beat every image-blind model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from sft.data.images import load_image
from sft.data.vision_dataset import image_token_count
from sft.data.vision_rows import vision_messages
from sft.demo.__main__ import main
from sft.demo.vision_assets import COLOURS, MERGE, QUESTION, VISION_TOKENS, answer_of, make_rows, write_vision_demo
from sft.demo.vision_train import (
    accuracy,
    answer_logprobs,
    blind_nll,
    generate_answers,
    load,
    prompt_of,
)

PROMPT = "<|im_start|>user\nWhat colour is the shape? <|vision_start|><|image_pad|><|vision_end|><|im_end|>\n"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread, as the demo grades: tiny matmuls slow down several-fold on a second, shared thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_vision_demo(tmp_path_factory.mktemp("vision_demo"), n_train=8, n_val=12, seed=0)


@pytest.fixture(scope="module")
def val_rows(assets) -> list[dict]:
    return pq.read_table(assets["val"]).to_pylist()


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    """`python -m sft.demo vision`, short (40 steps of 32 images): its folder and exit status."""
    out = tmp_path_factory.mktemp("vision_demo_run")
    argv = ["vision", "--out", str(out), "--steps", "40", "--n-train", "1280", "--n-eval", "40"]
    return out, main(argv)


@pytest.fixture(scope="module")
def trained(demo_run):
    """The demo's trained export and the first held-out rows: its answers depend on the image."""
    out, _ = demo_run
    rows = pq.read_table(out / "demo" / "val.parquet").to_pylist()[:6]
    return load(out / "run" / "global_step_40" / "huggingface"), rows


def test_assets_load_and_image_tokens_match_the_processor(assets, val_rows):
    model, processor = load(assets["model"])
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert type(processor).__name__ == "Qwen2_5_VLProcessor" and processor.image_token == VISION_TOKENS["image"]
    tok, cfg = processor.tokenizer, model.config
    ids = {name: tok.convert_tokens_to_ids(t) for name, t in VISION_TOKENS.items()}
    assert (cfg.image_token_id, cfg.video_token_id) == (ids["image"], ids["video"])
    assert (cfg.vision_start_token_id, cfg.vision_end_token_id) == (ids["vision_start"], ids["vision_end"])
    assert all(tok(t, add_special_tokens=False)["input_ids"] == [ids[n]] for n, t in VISION_TOKENS.items())
    assert cfg.vision_config.out_hidden_size == cfg.text_config.hidden_size
    counts = set()
    for i, row in enumerate(val_rows):
        prompt, images = prompt_of(processor, row, f"row {i}")
        assert prompt == PROMPT + "<|im_start|>assistant\n"
        enc = processor(text=[prompt], images=images, return_tensors="pt")
        n = int((enc["input_ids"] == ids["image"]).sum())
        width, height = images[0].size
        # The processor's expansion, its grid and the count the trainer reads from the image header agree.
        assert n == int(enc["image_grid_thw"][0].prod()) // MERGE**2 == image_token_count(processor, height, width)
        counts.add(n)
        with torch.no_grad():
            assert torch.isfinite(model(**enc).logits).all()
    assert len(counts) > 2 and counts <= set(range(1, 10))  # images of 1x1 to 3x3 merged tokens
    # The whole conversation renders as the trainer sees it: the answer and its end-of-turn token last.
    messages, _ = vision_messages(val_rows[0]["messages"], val_rows[0]["images"], "row 0", "messages", "images", Path())
    full = tok.apply_chat_template(messages, tokenize=False)
    assert full == PROMPT + f"<|im_start|>assistant\n{answer_of(val_rows[0])}<|im_end|>\n"


def test_rows_only_the_image_tells_the_colour():
    rows = make_rows(40, seed=3)
    assert {r["messages"][0]["content"] for r in rows} == {QUESTION}  # the text is the same for every colour
    assert sorted(answer_of(r) for r in rows) == sorted(list(COLOURS) * 10)  # balanced: blind guessing is 25%
    for i, row in enumerate(rows):
        (ref,) = vision_messages(row["messages"], row["images"], f"row {i}", "messages", "images", Path())[1]
        pixels = list(load_image(ref, f"row {i}").getdata())
        coloured = [p for p in pixels if len(set(p)) > 1]  # the background is grey
        assert set(coloured) == {COLOURS[answer_of(row)]}
        assert len(coloured) > 0.1 * len(pixels)
    again = make_rows(40, seed=3)
    assert [r["images"] for r in again] == [r["images"] for r in rows]
    assert [r["images"] for r in make_rows(40, seed=4)] != [r["images"] for r in rows]


def test_blind_nll_and_accuracy():
    rows = make_rows(8, seed=0)
    assert blind_nll(rows) == pytest.approx(math.log(4))
    two = [{"messages": [{"role": "assistant", "content": c}]} for c in ("red", "blue", "red", "blue")]
    assert blind_nll(two) == pytest.approx(math.log(2)) and blind_nll(two[:1]) == 0.0
    answers = [answer_of(r) for r in rows]
    assert accuracy(rows, answers) == 1.0
    assert accuracy(rows, [f" {a}\n" for a in answers[:4]] + ["purple"] * 4) == 0.5


def test_answer_logprobs_are_the_models_own_loss(trained):
    """Batched, right-padded scoring of images of different sizes = the model's own loss on one sequence."""
    (model, processor), rows = trained
    tok = processor.tokenizer
    got = answer_logprobs(model, processor, rows, batch_size=3)
    assert got.shape == (6, len(COLOURS))
    for i, row in enumerate(rows):
        prompt, images = prompt_of(processor, row, f"row {i}")
        for k, name in enumerate(sorted(COLOURS)):
            enc = processor(text=[prompt + name + tok.eos_token], images=images, return_tensors="pt")
            n = len(tok(name + tok.eos_token, add_special_tokens=False)["input_ids"])
            labels = torch.full_like(enc["input_ids"], -100)
            labels[:, -n:] = enc["input_ids"][:, -n:]
            with torch.no_grad():
                loss = model(**enc, labels=labels).loss
            assert got[i, k].item() == pytest.approx(-n * loss.item(), rel=1e-4, abs=1e-4)
    assert len(set(got.argmax(-1).tolist())) > 1  # the choice depends on the image


def test_batched_generation_equals_one_by_one(trained):
    """Left-padded prompts of different image sizes generate what each prompt generates alone."""
    (model, processor), rows = trained
    batched = generate_answers(model, processor, rows, batch_size=3, max_new_tokens=4)
    assert len(set(batched)) > 1
    assert batched == generate_answers(model, processor, rows, batch_size=1, max_new_tokens=4)


def test_vision_demo_learns_the_colours(demo_run):
    """After 40 steps the right answer's loss is far below what any model blind to the images can reach, and most
    answers are right; before, the model was blind."""
    out, status = demo_run
    assert status == 0
    report = json.loads((out / "report.json").read_text())
    before, after, blind = report["before"], report["after"], report["blind_nll"]
    assert blind == pytest.approx(math.log(4)) and report["n_eval"] == 40
    # A model blind to the image answers every row alike (the text is the same): 25% on balanced rows.
    assert before["scored"] <= 0.35 and before["answer_nll"] > blind
    assert after["answer_nll"] < 0.75 * blind and after["scored"] >= 0.8 and after["generated"] >= 0.8
    export = out / "run" / "global_step_40" / "huggingface"
    assert report["model"] == str(export) and (export / "processor_config.json").is_file()
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
