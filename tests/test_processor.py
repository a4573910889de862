"""sft/data/processor.py: each family's processor loads around sft's own tokenizer, with or without torchvision.

Tiny Qwen2.5-VL, Qwen3-VL and Gemma 3 folders (tests/vision_models.py): the processor is the folder's class, its
tokenizer is the very object sft passed in (pad token and chat template kept), its chat template and image sizes
come from the folder. Without torchvision the Qwen classes cannot load through AutoProcessor, are rebuilt without
a video processor, save under their own class name and pickle. Broken folders fail in one line naming the folder.
"""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
from transformers import AutoProcessor, AutoTokenizer, Gemma3Processor, Qwen2_5_VLProcessor, Qwen3VLProcessor
from transformers.utils import is_torchvision_available
from vision_models import CHAT_TEMPLATES, GEMMA_SIZE, GEMMA_TOKENS, MAX_PIXELS, MIN_PIXELS, write_vision_model

from sft.data.processor import load_processor

CLASSES = {"qwen2_5_vl": Qwen2_5_VLProcessor, "qwen3_vl": Qwen3VLProcessor, "gemma3": Gemma3Processor}
QWEN = ("qwen2_5_vl", "qwen3_vl")


@pytest.fixture(scope="module")
def folders(demo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vision_processor")
    return {t: write_vision_model(demo_dir / "model", root / t, t) for t in CLASSES}


def sft_tokenizer(folder: Path):
    """The tokenizer as sft prepares it: its own pad token and a `data.chat_template` override."""
    tok = AutoTokenizer.from_pretrained(folder)
    tok.pad_token = "<|im_start|>"
    tok.chat_template = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
    return tok


@pytest.mark.parametrize("model_type", list(CLASSES))
def test_processor_keeps_sft_tokenizer(folders, model_type):
    tok = sft_tokenizer(folders[model_type])
    processor = load_processor(str(folders[model_type]), tok)
    assert isinstance(processor, CLASSES[model_type]) and type(processor).__name__ == CLASSES[model_type].__name__
    assert processor.tokenizer is tok
    assert processor.tokenizer.pad_token == "<|im_start|>" and processor.tokenizer.chat_template == tok.chat_template
    assert processor.chat_template == CHAT_TEMPLATES[model_type]  # the folder's, for the processor's own rendering
    ip = processor.image_processor
    if model_type == "gemma3":
        assert (ip.size["height"], ip.size["width"], processor.image_seq_length) == (
            GEMMA_SIZE,
            GEMMA_SIZE,
            GEMMA_TOKENS,
        )
    else:
        assert (ip.size["shortest_edge"], ip.size["longest_edge"], ip.merge_size) == (MIN_PIXELS, MAX_PIXELS, 2)
    if not is_torchvision_available():
        assert type(ip).__name__.endswith("Pil")  # AutoImageProcessor's PIL backend


@pytest.mark.skipif(is_torchvision_available(), reason="the fallback is for hosts without torchvision")
@pytest.mark.parametrize("model_type", QWEN)
def test_qwen_without_torchvision(folders, model_type, tmp_path):
    folder = folders[model_type]
    with pytest.raises(ImportError):  # the premise: transformers alone cannot build it here
        AutoProcessor.from_pretrained(folder)
    tok = sft_tokenizer(folder)
    processor = load_processor(str(folder), tok)
    assert getattr(processor, "video_processor", None) is None
    text = "<|vision_start|><|image_pad|><|vision_end|>hi"
    # Saved, it names the family's own class (a host with torchvision loads the full processor from it).
    processor.save_pretrained(tmp_path)
    assert (
        json.loads((tmp_path / "processor_config.json").read_text())["processor_class"] == CLASSES[model_type].__name__
    )
    # Data-loader workers receive it pickled.
    copy = pickle.loads(pickle.dumps(processor))
    assert type(copy) is type(processor) and copy.chat_template == processor.chat_template
    assert copy.tokenizer(text)["input_ids"] == tok(text)["input_ids"]
    assert copy.image_processor.to_dict() == processor.image_processor.to_dict()


def test_refusals(folders, demo_dir, tmp_path):
    tok = AutoTokenizer.from_pretrained(folders["qwen2_5_vl"])
    cases = []
    # A text-only model: AutoProcessor hands back a tokenizer.
    cases.append((demo_dir / "model", "no image processor"))
    cases.append((tmp_path / "absent", "not a folder"))
    broken = shutil.copytree(folders["qwen2_5_vl"], tmp_path / "broken_json")
    (broken / "processor_config.json").write_text("{broken")
    cases.append((broken / "processor_config.json", "cannot read it as JSON"))
    # A bad image processor breaks the normal path and the rebuild alike: one cause, said once.
    bad = shutil.copytree(folders["qwen2_5_vl"], tmp_path / "bad_size")
    config = json.loads((bad / "processor_config.json").read_text())
    config["image_processor"]["size"] = {"height": 3}
    (bad / "processor_config.json").write_text(json.dumps(config))
    cases.append((bad, "cannot load Qwen2_5_VLProcessor (ValueError: size must have"))
    for folder, message in cases:
        target = folder.parent if folder.name.endswith(".json") else folder
        with pytest.raises(ValueError) as e:
            load_processor(str(target), tok)
        assert str(e.value).startswith(str(folder)) and message in str(e.value), str(e.value)
        assert "\n" not in str(e.value) and str(e.value).count("size must have") <= 1
