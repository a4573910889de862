"""The automatic token budget (sft/budget.py), the sync-free micro-batch loop and the fused loss.

The loop test runs real training steps on CPU under a dispatch mode that fails on any op that
would read a device value back to the host on a GPU (`.item()`, `nonzero`, `torch.equal`, ...),
outside the per-sample reference attention that only CPU and fp32 runs use.
"""

from __future__ import annotations

import traceback

import pytest
import torch
from conftest import base_overrides
from torch.utils._python_dispatch import TorchDispatchMode

from sft import fsdp_sft_trainer
from sft.budget import MAX_AUTO_TOKENS, activation_bytes_per_token, auto_tokens
from sft.fused_ce import fused_linear_cross_entropy
from sft.model import load_hf_config
from sft.schema import load_config

SYNCING_OPS = {
    torch.ops.aten._local_scalar_dense.default,
    torch.ops.aten.nonzero.default,
    torch.ops.aten.equal.default,
    torch.ops.aten.is_nonzero.default,
}
# CPU-only code: the per-sample SDPA reference reads segment bounds (CUDA runs use the varlen kernels).
ALLOWED_FRAMES = ("_reference_varlen", "varlen_attention")


class NoSyncMode(TorchDispatchMode):
    """Record every op that would synchronise a GPU, with where it came from."""

    def __init__(self) -> None:
        super().__init__()
        self.hits: list[str] = []
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        if func in SYNCING_OPS:
            frames = traceback.extract_stack()
            if not any(f.name in ALLOWED_FRAMES for f in frames):
                where = " <- ".join(f"{f.name}:{f.lineno}" for f in reversed(frames[-8:-1]))
                self.hits.append(f"{func}: {where}")
        return func(*args, **(kwargs or {}))


def test_auto_tokens_rule():
    per = 1000.0
    assert auto_tokens(8192, None, None, per).tokens == 8192  # no memory figure: the floor
    assert auto_tokens(8192, None, 1e6, per).tokens == 8192  # little room: never below the floor
    mid = auto_tokens(8192, None, 20_000 * per + 5, per)
    assert mid.tokens == 19_456 and "free memory" in mid.reason  # rounded down to 1024
    assert auto_tokens(8192, None, 1e12, per).tokens == MAX_AUTO_TOKENS
    capped = auto_tokens(8192, 4096, 1e12, per)
    assert capped.tokens == 4096 and "max_token_len_per_gpu=4096" in capped.reason  # an explicit cap is obeyed
    assert auto_tokens(8192, 10**6, 1e12, per).tokens == MAX_AUTO_TOKENS


def test_activation_estimate_shape(demo_dir, tmp_path):
    cfg = load_config(base_overrides(demo_dir, tmp_path))
    hf = load_hf_config(cfg)
    with_ac, without = activation_bytes_per_token(hf, True), activation_bytes_per_token(hf, False)
    assert 0 < with_ac < without


def test_fused_ce_matches_reference_without_sync():
    torch.manual_seed(0)
    h = torch.randn(37, 16, requires_grad=True)
    w = torch.randn(50, 16, requires_grad=True)
    y = torch.randint(0, 50, (37,))
    with NoSyncMode() as mode:
        loss, _ = fused_linear_cross_entropy(h, w, y, chunk=8)
        (loss * 0.5).backward()
    assert not mode.hits, mode.hits
    h2, w2 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref = torch.nn.functional.cross_entropy(h2 @ w2.t(), y, reduction="sum")
    (ref * 0.5).backward()
    torch.testing.assert_close(loss.double(), ref, rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(h.grad.double(), h2.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w.grad.double(), w2.grad, rtol=1e-5, atol=1e-6)


@pytest.fixture
def one_rank(single_rank):
    return single_rank("cpu")


def test_default_budget_loss_and_sync_free_loop(demo_dir, tmp_path, one_rank, monkeypatch):
    # The user's keys: remove-padding by default, 2 samples per micro-batch, no budget given.
    overrides = base_overrides(demo_dir, tmp_path) + [
        "use_remove_padding=true",
        "data.train_batch_size=8",
        "data.micro_batch_size_per_gpu=2",
        "trainer.total_training_steps=1",
    ]
    cfg = load_config(overrides)
    trainer = fsdp_sft_trainer.FSDPSFTTrainer(cfg, one_rank)
    assert trainer.budget.tokens >= 2 * cfg.data.max_length  # at least verl's padded micro-batch
    assert trainer.budget.tokens == 2 * cfg.data.max_length and "no device memory" in trainer.budget.reason

    # The loss does not depend on the budget: auto budget vs one micro-batch holding the whole batch.
    batch = trainer.sampler.epoch_order(0)[:8].tolist()
    auto = [trainer._builder(trainer.train_ds)(mb) for mb in trainer.sampler.micro_batches(batch)]
    whole = [trainer._builder(trainer.train_ds)(sorted(batch))]
    assert len(auto) > 1

    def mean_loss(mbs):
        with torch.no_grad():
            sums = [trainer._forward(mb) for mb in mbs]
        return float(sum(s for s, _, _ in sums)) / float(sum(n for _, n, _ in sums))

    assert mean_loss(auto) == pytest.approx(mean_loss(whole), rel=1e-6)

    # One real step: no syncing op inside the micro-batch loop (forward, loss, backward, clipping).
    expected = mean_loss(auto)
    mode = NoSyncMode()
    monkeypatch.setattr(fsdp_sft_trainer, "sync_debug", lambda _: mode)
    metrics = trainer.train_step(auto)
    assert mode.ops > 1000  # the loop really ran under the mode
    assert not mode.hits, "\n".join(mode.hits[:5])
    assert metrics["train/loss"] == pytest.approx(expected, rel=1e-5)
