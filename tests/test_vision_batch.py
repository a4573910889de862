"""Which images each sequence-parallel rank runs through the vision tower (sft/data/vision_batch.py).

A packed row of three images is cut into two slices: each rank takes the images its slice shows (one cut by the
boundary on both), with the image-token count before the first of them, so its features line up with its tokens.
Expectations are worked out by hand. That the features are right end to end is tests/test_vision.py's sp2 runs.
"""

from __future__ import annotations

import torch

from sft.data.vision_batch import VisionInputs

# Row of 20 tokens: image 0 at 2..5, image 1 at 7..13, image 2 at 15..17.
RUNS = [(2, 5), (7, 13), (15, 17)]


def _row() -> torch.Tensor:
    row = torch.zeros(20, dtype=torch.bool)
    for a, b in RUNS:
        row[a:b] = True
    return row


def test_qwen_patches_of_the_shown_images():
    grids = torch.tensor([[1, 2, 6], [1, 4, 6], [1, 2, 4]])  # 12, 24, 8 patches; 3, 6, 2 tokens (2x2 merge)
    patches = torch.arange(44)[:, None].float()
    pixels = {"pixel_values": patches, "image_grid_thw": grids}
    share = VisionInputs._share
    # Slice [0, 10): images 0 and 1 (cut); none before.
    got, before = share(None, pixels, _row(), 0, 10)
    assert before == 0 and got["image_grid_thw"].tolist() == grids[:2].tolist()
    assert got["pixel_values"][:, 0].tolist() == list(range(36))
    # Slice [10, 20): images 1 (cut) and 2; image 0's 3 tokens before.
    got, before = share(None, pixels, _row(), 10, 20)
    assert before == 3 and got["image_grid_thw"].tolist() == grids[1:].tolist()
    assert got["pixel_values"][:, 0].tolist() == list(range(12, 44))
    # A slice that shows no image: none.
    assert share(None, pixels, _row(), 0, 2) == (None, 0)


def test_per_image_tensors_of_the_shown_images():
    pixels = {"pixel_values": torch.arange(3)[:, None], "image_position_ids": torch.arange(3)[:, None] * 10}
    got, before = VisionInputs._share(None, pixels, _row(), 14, 20)
    assert before == 9 and got["pixel_values"].tolist() == [[2]] and got["image_position_ids"].tolist() == [[20]]


def test_adjacent_images_keep_every_image():
    row = torch.zeros(20, dtype=torch.bool)
    row[2:8] = True  # two images whose tokens touch: one run, so runs and images do not pair up
    pixels = {"pixel_values": torch.arange(2)[:, None]}
    got, before = VisionInputs._share(None, pixels, row, 5, 20)
    assert got is pixels and before == 0
