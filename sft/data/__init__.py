"""Data: parquet reading, the SFT datasets, and collation into micro-batches.

`build_dataset` picks the dataset class from the data config; every dataset tokenizes all
rows up front and returns the item contract of DESIGN.md (`input_ids`, `attention_mask`,
`position_ids`, `loss_mask`), padded or unpadded. `collate_padded` batches padded items.
"""

from sft.data.build import build_dataset, load_custom_class
from sft.data.collate import collate_padded
from sft.data.multiturn import MultiTurnSFTDataset
from sft.data.single_turn import SFTDataset
from sft.data.storage import TokenizedDataset

__all__ = [
    "MultiTurnSFTDataset",
    "SFTDataset",
    "TokenizedDataset",
    "build_dataset",
    "collate_padded",
    "load_custom_class",
]
