"""Multimodal checkpoints (a `text_config` in config.json) trained on text: what is trained, what stays as it was.

The model is the checkpoint's own class (its `architectures` entry, else AutoModelForImageTextToText's), so the
weight names are the checkpoint's own. Only its language model and LM head stay in the module tree: every other
module or tensor (vision tower, projector, audio tower) is removed before sharding, so FSDP, LoRA, the optimizer,
the loss and the checkpoints see a text decoder. The removed tensors are `FrozenPart.tensors`: rank 0 reads them
from the safetensors files as stored (names, dtypes, bytes), and every checkpoint and HF export writes them back
unchanged, next to the checkpoint's processor files.
"""

from __future__ import annotations

import copy
import fnmatch
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

logger = logging.getLogger("sft")

# In a `global_step_N/` folder: the frozen tensors, for `python -m sft.merge` (resume reads the model folder again).
FROZEN_FILE = "frozen_weights.safetensors"
# Files of the model folder that a processor reads (images, video, audio, chat template): copied into every export.
PROCESSOR_PATTERNS = ("*processor*.json", "chat_template.json", "chat_template.jinja")
WEIGHTS_INDEX = "model.safetensors.index.json"


def is_multimodal(config: Any) -> bool:
    """A config.json dict or a PretrainedConfig whose text model is nested in `text_config`."""
    if isinstance(config, dict):
        return isinstance(config.get("text_config"), dict)
    return "text_config" in (getattr(config, "sub_configs", None) or {})


def text_config(hf_config: Any) -> Any:
    """The text model's config (the config itself for a text-only model)."""
    return hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config


def model_class_name(config: dict[str, Any]) -> str | None:
    """The class that loads a multimodal checkpoint: its `architectures` entry when transformers has it, else the
    AutoModelForImageTextToText class of its model_type; None when transformers has neither."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    for name in config.get("architectures") or []:
        if isinstance(getattr(transformers, name, None), type):
            return name
    return MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES.get(config.get("model_type"))


def model_class(hf_config: Any) -> type:
    name = model_class_name(hf_config.to_dict())
    if name is None:  # checked from config.json before anything loads (sft/config/model_checks.py)
        raise ValueError(
            f"model.partial_pretrain: transformers has no class for model_type={hf_config.model_type!r} "
            f"(architectures={hf_config.architectures}); upgrade transformers"
        )
    return getattr(transformers, name)


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files transformers loads (the index's shards, else model.safetensors); [] when none."""
    index = folder / WEIGHTS_INDEX
    if index.is_file():
        return [folder / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    single = folder / "model.safetensors"
    return [single] if single.is_file() else []


def _paths_of(lm: nn.Module) -> tuple[str, str]:
    """Module paths of the text decoder and the LM head inside `lm`."""
    decoder, head = lm.get_decoder(), lm.get_output_embeddings()
    names = {id(m): n for n, m in lm.named_modules()}
    found = decoder is not lm and id(decoder) in names and head is not None and id(head) in names
    if not found or names[id(head)].startswith(names[id(decoder)] + "."):
        # sft runs the decoder and applies the head itself (sft/models/loading.py::CausalLMWithLoss).
        raise ValueError(
            f"model.partial_pretrain: {type(lm).__name__} has no text decoder separate from its LM head "
            "(get_decoder / get_output_embeddings), which sft needs to train its text part; save the text model "
            "as a causal LM of its own and train that"
        )
    return names[id(decoder)], names[id(head)]


def _outside(lm: nn.Module) -> list[tuple[nn.Module, str, str]]:
    """(parent, attribute, path) of every module and tensor of `lm` outside its language model and LM head, outermost
    first: the vision tower, the projector, and tensors of the wrapper itself (e.g. an image-newline embedding)."""
    keep = _paths_of(lm)
    found: list[tuple[nn.Module, str, str]] = []

    def visit(module: nn.Module, path: str) -> None:
        for name, child in module.named_children():
            child_path = f"{path}.{name}" if path else name
            if any(child_path == k or child_path.startswith(k + ".") for k in keep):
                continue  # the decoder or the head: trained
            if any(k.startswith(child_path + ".") for k in keep):
                visit(child, child_path)  # holds the decoder or the head
            else:
                found.append((module, name, child_path))
        for store in (module._parameters, module._buffers):
            found.extend(
                (module, name, f"{path}.{name}" if path else name) for name, t in store.items() if t is not None
            )

    visit(lm, "")
    return found


def _stored_numel(parent: nn.Module, name: str) -> int:
    """Elements a checkpoint stores of `parent.<name>`: parameters and persistent buffers."""
    if name in parent._parameters:
        return parent._parameters[name].numel()
    if name in parent._buffers:
        return 0 if name in parent._non_persistent_buffers_set else parent._buffers[name].numel()
    module = getattr(parent, name)
    buffers = [
        b
        for m in module.modules()
        for n, b in m._buffers.items()
        if b is not None and n not in m._non_persistent_buffers_set
    ]
    return sum(p.numel() for p in module.parameters()) + sum(b.numel() for b in buffers)


def keep_language_model(lm: nn.Module, lora_targets: Any = None) -> tuple[list[str], int]:
    """Remove from `lm` every module and tensor outside its language model and LM head (set to None: the class keeps
    its layout and names); returns their paths and stored element count. `lora_targets` (`model.target_modules`,
    None without LoRA) may not name only removed modules."""
    outside = _outside(lm)
    removed = [path for _, _, path in outside]
    if lora_targets is not None and not isinstance(lora_targets, str):  # all-linear: peft sees what is left
        modules = dict(lm.named_modules())
        for t in lora_targets:
            hits = [n for n in modules if n == t or n.endswith("." + t)]
            frozen = [n for n in hits if any(n == r or n.startswith(r + ".") for r in removed)]
            if hits and len(frozen) == len(hits):
                raise ValueError(
                    f"model.target_modules: {t!r} names only modules outside the language model of "
                    f"{type(lm).__name__} (e.g. {frozen[0]}), which sft keeps unchanged; target language-model "
                    "modules (e.g. q_proj) or use all-linear"
                )
    numel = sum(_stored_numel(parent, name) for parent, name, _ in outside)
    for parent, name, _ in outside:
        setattr(parent, name, None)
    return removed, numel


def _frozen_key(key: str, removed: list[str]) -> bool:
    """Whether checkpoint tensor `key` belongs to a removed module. Files may use an older layout than the class
    (`vision_tower.x` for `model.vision_tower.x`): the removed module's name must follow only its ancestors' names."""
    parts = key.split(".")
    for path in removed:
        *ancestors, leaf = path.split(".")
        for i, part in enumerate(parts):
            if part == leaf:
                if all(p in ancestors for p in parts[:i]):
                    return True
                break
    return False


@dataclass
class FrozenPart:
    """The tensors of a multimodal checkpoint that sft keeps unchanged, and its processor files.

    `keys` (file -> names) is known on every rank before loading; `tensors` and `files` are filled on rank 0."""

    model_class: type
    removed: list[str]
    keys: dict[str, list[str]]
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    files: dict[str, bytes] = field(default_factory=dict)

    @classmethod
    def plan(cls, folder: Path, lm_class: type, removed: list[str], numel: int) -> FrozenPart:
        """Which tensors of the folder's safetensors files are frozen; refused when they do not add up to the
        removed modules' elements (sft could not tell the vision tensors apart in this layout)."""
        files = weight_files(folder)
        if not files:
            raise ValueError(
                f"model.partial_pretrain={folder}: a multimodal checkpoint needs safetensors weights (sft copies its "
                "vision tensors byte for byte); save it with save_pretrained (safetensors is the default)"
            )
        keys: dict[str, list[str]] = {}
        found = 0
        for f in files:
            with safe_open(str(f), "pt") as st:
                for k in st.keys():
                    if _frozen_key(k, removed):
                        keys.setdefault(f.name, []).append(k)
                        found += math.prod(st.get_slice(k).get_shape())
        if found != numel:
            raise ValueError(
                f"model.partial_pretrain={folder}: the files hold {found} elements under "
                f"{sorted({r.split('.')[-1] for r in removed})} but {lm_class.__name__} has {numel} there; sft cannot "
                "tell this checkpoint's vision tensors apart, so it does not train it (report the checkpoint)"
            )
        return cls(lm_class, removed, keys)

    def read(self, folder: Path) -> None:
        """Rank 0: the frozen tensors as the files store them, and the processor files."""
        for fname, names in self.keys.items():
            with safe_open(str(folder / fname), "pt") as st:
                for k in names:
                    self.tensors[k] = st.get_tensor(k)
        self.files = processor_files(folder)
        logger.info(
            "multimodal checkpoint: training the language model of %s; %d tensors (%s) kept unchanged, %d processor "
            "file(s) copied into exports",
            self.model_class.__name__,
            len(self.tensors),
            ", ".join(sorted({r.split(".")[-1] for r in self.removed})),
            len(self.files),
        )

    def load_language_model(self, folder: Path, dtype: torch.dtype) -> nn.Module:
        """Rank 0: the checkpoint loaded by its own class (its weight-name conversions included), language model
        and LM head only, as the meta model has them."""
        src = self.model_class.from_pretrained(folder, dtype=dtype)
        removed, _ = keep_language_model(src)
        assert removed == self.removed, f"{removed} != {self.removed}"
        return src

    def save(self, path: Path) -> None:
        """The frozen tensors in one safetensors file (`FROZEN_FILE` of a checkpoint), bytes unchanged."""
        save_file({k: t.contiguous() for k, t in self.tensors.items()}, str(path), metadata={"format": "pt"})


def processor_files(folder: Path) -> dict[str, bytes]:
    """The model folder's processor files (images, video, audio, chat template), by name."""
    return {
        p.name: p.read_bytes()
        for p in sorted(folder.iterdir())
        if p.is_file() and any(fnmatch.fnmatch(p.name, pat) for pat in PROCESSOR_PATTERNS)
    }


def override_target(hf_config: Any, key: str) -> Any:
    """The config that `model.override_config.<key>` sets: a multimodal checkpoint's text-model entries go to its
    text_config; replacing a whole sub-config (the vision side is kept as it is) is refused."""
    if not is_multimodal(hf_config):
        return hf_config
    if key in hf_config.sub_configs:
        raise ValueError(
            f"model.override_config.{key}: a multimodal checkpoint's {key} cannot be replaced (sft keeps the vision "
            "side unchanged); give text-model entries directly, e.g. +model.override_config.attention_dropout=0.0"
        )
    text = text_config(hf_config)
    return text if not hasattr(hf_config, key) and hasattr(text, key) else hf_config


def build_text_only(config: Any, folder: Path, lora_targets: Any, **kwargs: Any) -> tuple[nn.Module, FrozenPart]:
    """The checkpoint's class from `config` (on the current device, e.g. meta) with only its language model and
    LM head left, and the plan of what stays frozen; `lora_targets` (None without LoRA) may not name removed modules."""
    cls = model_class(config)
    lm = cls._from_config(copy.deepcopy(config), **kwargs)  # a copy: the export writes the original config
    removed, numel = keep_language_model(lm, lora_targets)
    return lm, FrozenPart.plan(folder, cls, removed, numel)


def load_frozen(path: Path) -> dict[str, torch.Tensor]:
    """A checkpoint's `FROZEN_FILE` (safetensors: reading it runs no code)."""
    return load_file(str(path))
