"""Choosing and constructing the dataset class for a split.

`build_dataset` returns the user's class when `data.custom_cls.path`/`name` are set, else
`MultiTurnSFTDataset` when `data.multiturn.enable`, else `SFTDataset`; all are constructed
with the same arguments (files, tokenizer, data config, max_samples, pad_to_max_length); the
built-in ones also take the tokenizing shard and the tokenised cache folder.
"""

from __future__ import annotations

import importlib.util
import inspect
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset
from transformers import PreTrainedTokenizerBase

from sft.config.schema import DataConfig
from sft.data.multiturn import MultiTurnSFTDataset
from sft.data.single_turn import SFTDataset
from sft.data.storage import TokenizeShard
from sft.data.vision_dataset import VisionSFTDataset


def load_custom_class(path: str | None, name: str | None) -> type[Dataset]:
    """The class `name` defined in the Python file `path`."""
    keys = f"data.custom_cls.path={path!r} data.custom_cls.name={name!r}"
    if not path or not name:
        raise ValueError(f"{keys}: set both (a .py file and the dataset class defined in it) or neither")
    file = Path(path).expanduser()
    if not file.is_file() or file.suffix != ".py":
        raise ValueError(f"{keys}: {file} is not an existing .py file; fix data.custom_cls.path")
    module_name = f"sft_custom_dataset_{file.stem}"
    spec = importlib.util.spec_from_file_location(module_name, file)
    assert spec is not None and spec.loader is not None, f"no import spec for {file}"
    module = importlib.util.module_from_spec(spec)
    # Registered before exec so dataclasses and pickling (DataLoader workers) can find it.
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[module_name]
        raise ValueError(f"{keys}: importing {file} failed: {type(e).__name__}: {e}") from e
    cls = getattr(module, name, None)
    if not (inspect.isclass(cls) and issubclass(cls, Dataset)):
        raise ValueError(f"{keys}: {file} defines no torch Dataset class named {name!r}; fix data.custom_cls.name")
    return cls


def build_dataset(
    files: str | Sequence[str],
    tokenizer: PreTrainedTokenizerBase,
    data_cfg: DataConfig,
    max_samples: int = -1,
    pad_to_max_length: bool = True,
    shard: TokenizeShard | None = None,
    cache_dir: str | Path | None = None,
    processor: Any = None,
) -> Dataset:
    """The dataset of one split (train or val) as training uses it.

    `shard` splits the tokenization of the built-in datasets over processes, and `cache_dir`
    keeps their tokenised cache (`sft.data.cache`); a user's class is built with the
    documented five arguments only, and never cached.
    """
    custom = data_cfg.custom_cls
    if custom.path or custom.name:
        cls = load_custom_class(custom.path, custom.name)
    elif processor is not None:  # images in the data (sft/data/vision_dataset.py)
        return VisionSFTDataset(
            files, tokenizer, data_cfg, max_samples, pad_to_max_length, shard, cache_dir, processor=processor
        )
    elif data_cfg.multiturn.enable:
        cls = MultiTurnSFTDataset
    else:
        cls = SFTDataset
    kwargs = dict(
        parquet_files=files,
        tokenizer=tokenizer,
        config=data_cfg,
        max_samples=max_samples,
        pad_to_max_length=pad_to_max_length,
    )
    if cls in (MultiTurnSFTDataset, SFTDataset):
        return cls(**kwargs, shard=shard, cache_dir=cache_dir)
    try:
        inspect.signature(cls).bind(**kwargs)
    except TypeError as e:
        raise ValueError(
            f"data.custom_cls.name={cls.__name__!r}: its constructor must accept ({', '.join(kwargs)}): {e}"
        ) from e
    return cls(**kwargs)
