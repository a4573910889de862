"""The model's processor for vision-language SFT: image processor, sft's tokenizer and the folder's chat template.

`load_processor` loads a model folder's processor around the tokenizer sft already built (its pad token and any
`data.chat_template`). Qwen-VL and Gemma 4 processors also ask for a video processor, which needs torchvision, and
Gemma 4's for an audio feature extractor; where these cannot load (the CPU wheels have no torchvision, or the folder
lacks their files), the same processor class is built with its image processor and tokenizer only. Failures are
one-line ValueErrors naming the folder.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

from transformers import AutoProcessor, PreTrainedTokenizerBase, ProcessorMixin
from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES, processor_class_from_name

# Where a folder names its processor class, in the order transformers looks.
CLASS_FILES = ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json")


def _first_line(error: BaseException, limit: int = 300) -> str:
    """The error's type and first line, clipped: transformers' messages can list every model type."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = f"{type(error).__name__}: {lines[0] if lines else ''}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


KEPT = ("image_processor", "tokenizer")  # what image training uses of a processor


@functools.cache
def image_only(cls: type[ProcessorMixin]) -> type[ProcessorMixin]:
    """`cls` whose sub-processors are its image processor and tokenizer only (no video processor, no audio
    feature extractor).

    ProcessorMixin derives the sub-processors it checks, loads and saves from the `__init__` signature, so a
    narrower signature is all it takes. The class keeps its name: save_pretrained writes it as `processor_class`,
    and a host with torchvision loads the full class from the same files.
    """
    dropped = {name: None for name in cls.get_attributes() if name not in KEPT}

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        cls.__init__(
            self,
            image_processor=image_processor,
            tokenizer=tokenizer,
            chat_template=chat_template,
            **dropped,
            **kwargs,
        )

    def __reduce__(self):
        # Pickle (data-loader workers) would look the name up and find `cls` itself: rebuild this class instead.
        return _restore, (cls, self.__dict__)

    namespace = {"__init__": __init__, "__reduce__": __reduce__, "__module__": cls.__module__, "__doc__": cls.__doc__}
    # _DropUnused sits between `cls` and ProcessorMixin in the MRO, so it sees what `cls.__init__` hands on.
    return type(cls.__name__, (cls, _DropUnused), namespace)


class _DropUnused(ProcessorMixin):
    """Drops the absent (None) sub-processors that a processor's own `__init__` passes on by keyword (Gemma 4's
    `feature_extractor=`), which ProcessorMixin would refuse as arguments outside the narrowed signature."""

    def __init__(self, *args, **kwargs):
        kept = self.get_attributes()
        kwargs = {k: v for k, v in kwargs.items() if k in kept or k == "chat_template" or v is not None}
        super().__init__(*args, **kwargs)


def _restore(cls: type[ProcessorMixin], state: dict) -> ProcessorMixin:
    sub = image_only(cls)
    processor = sub.__new__(sub)
    processor.__dict__.update(state)
    return processor


def _read_json(path: Path) -> dict:
    try:
        found = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read it as JSON ({_first_line(e)}); fix or restore the file") from e
    if not isinstance(found, dict):
        raise ValueError(f"{path}: holds a {type(found).__name__}, not a JSON object; fix or restore the file")
    return found


def _narrowable_class(folder: Path) -> type[ProcessorMixin] | None:
    """The processor class the folder names (its `processor_class`, else its model type's) if it has sub-processors
    beyond an image processor and a tokenizer; None otherwise."""
    name = None
    for file in CLASS_FILES:
        if (folder / file).is_file() and isinstance(found := _read_json(folder / file).get("processor_class"), str):
            name = found
            break
    if name is None and (folder / "config.json").is_file():
        name = PROCESSOR_MAPPING_NAMES.get(_read_json(folder / "config.json").get("model_type"))
    cls = processor_class_from_name(name) if isinstance(name, str) else None
    if isinstance(cls, type) and issubclass(cls, ProcessorMixin) and set(cls.get_attributes()) - set(KEPT):
        return cls
    return None


def load_processor(folder: str, tokenizer: PreTrainedTokenizerBase) -> ProcessorMixin:
    """The processor of model `folder`, with `tokenizer` (sft's, pad token and chat template set) as its tokenizer.

    When AutoProcessor fails and the class has other sub-processors (no torchvision, or no video or audio files),
    the class is built without them: image training never calls them.
    """
    path = Path(folder)
    if not path.is_dir():
        raise ValueError(f"{folder}: not a folder; fix: point the model path at a local model folder")
    try:
        processor = AutoProcessor.from_pretrained(folder, tokenizer=tokenizer)
    except Exception as e:  # ImportError, OSError or AttributeError where torchvision or a video config is missing
        cls = _narrowable_class(path)
        if cls is None:
            raise ValueError(f"{folder}: cannot load the processor ({_first_line(e)}); fix the processor files") from e
        try:
            # The image processor comes from AutoImageProcessor (its PIL backend without torchvision), the chat
            # template and the class's other settings from the folder, the tokenizer is sft's.
            processor = image_only(cls).from_pretrained(folder, tokenizer=tokenizer)
        except Exception as inner:
            # The same cause twice (a broken image processor file breaks both) is said once.
            also = "" if str(inner) == str(e) else f", nor with its image processor only ({_first_line(inner)})"
            raise ValueError(
                f"{folder}: cannot load {cls.__name__} ({_first_line(e)}){also}; fix the processor files"
            ) from inner
    if not isinstance(processor, ProcessorMixin) or getattr(processor, "image_processor", None) is None:
        raise ValueError(
            f"{folder}: no image processor (processor_config.json or preprocessor_config.json); "
            "copy the processor files of the base model into the folder"
        )
    # Every path above hands sft's tokenizer in; a processor class that builds its own would drop its settings.
    assert processor.tokenizer is tokenizer, f"{folder}: the processor does not use sft's tokenizer"
    return processor


def vision_processor(cfg: Any, tokenizer: PreTrainedTokenizerBase) -> ProcessorMixin | None:
    """The model's processor when the training files hold images (`data.image_key`, multi-turn rows): the run is then
    vision-language SFT. None otherwise. The trainer and `python -m sft.inspect_data` both decide here."""
    from sft.data.vision_rows import has_image_column

    d = cfg.data
    if not (d.multiturn.enable and has_image_column(d.train_files, d.image_key)):
        return None
    return load_processor(cfg.model.tokenizer_path or cfg.model.partial_pretrain, tokenizer)
