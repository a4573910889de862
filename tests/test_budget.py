"""The automatic token budget (sft/loop/budget.py), the sync-free micro-batch loop and the fused loss.

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

from sft import trainer as fsdp_sft_trainer
from sft.config.schema import load_config
from sft.loop.budget import MAX_AUTO_TOKENS, TokenBudget, activation_bytes_per_token, auto_tokens, recompute_plan
from sft.models.loading import load_hf_config
from sft.ops.fused_ce import fused_linear_cross_entropy
from sft.parallel.fsdp import decoder_layers

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
    layers = hf.num_hidden_layers
    per = [activation_bytes_per_token(hf, r) for r in range(layers + 1)]
    # Each recomputed layer keeps less, down to the replay of one layer with the others at their inputs.
    assert all(a > b > 0 for a, b in zip(per[:-1], per[1:-1]))
    assert per[-1] < per[0]
    assert activation_bytes_per_token(hf, 0, liger=True) < per[0]  # Liger's norms/SwiGLU keep less


def _plan(avail, floor=8192, cap=None, min_tokens=32768, layers=4, one=100.0, kept=10.0):
    """recompute_plan with a toy memory model: a recomputed layer keeps `kept` bytes per token, another `one`."""
    return recompute_plan(floor, cap, avail, lambda r: r * kept + (layers - r) * one + one, layers, min_tokens)


def test_recompute_plan_rule():
    # Independent arithmetic on the toy model (4 layers): per token 500 bytes with no layer recomputed, 140 with
    # all four, each recomputed layer saving 90.
    none = _plan(None)
    assert (none.tokens, none.recompute) == (8192, 4)  # no memory figure (CPU): the floor, every layer
    roomy = _plan(1e12)
    assert (roomy.tokens, roomy.recompute) == (MAX_AUTO_TOKENS, 0)  # everything fits: nothing recomputed
    fit0 = _plan(40_000 * 500.0)  # 32,768 tokens fit with none recomputed; the budget grows to 40k, rounded
    assert (fit0.tokens, fit0.recompute) == (39_936, 0) and "no layer recomputed" in fit0.reason
    # 32,768 tokens: r recomputed layers need (500 - 90 r) x 32768 bytes; 300 bytes/token allow r = 3 (230).
    mid = _plan(32768 * 300.0)
    assert (mid.tokens, mid.recompute) == (32768, 3) and "3 of 4 layers recomputed" in mid.reason
    full = _plan(10_000 * 140.0)  # room for 10,000 tokens only with every layer recomputed: as full chooses
    assert (full.tokens, full.recompute) == (9216, 4)
    # 32,768 tokens would need all four layers recomputed (200 bytes/token < 230): then full checkpointing's
    # own, larger budget, 32768 x 200 / 140 = 46,811 tokens, rounded down to 46,080.
    all_four = _plan(32768 * 200.0)
    assert (all_four.tokens, all_four.recompute) == (46_080, 4)
    tight = _plan(8_000 * 140.0)  # not even the floor fits with everything recomputed: the floor, as full does
    assert (tight.tokens, tight.recompute) == (8192, 4)
    capped = _plan(1e12, cap=4096)
    assert (capped.tokens, capped.recompute) == (4096, 0)  # the cap is obeyed
    big_floor = _plan(1e12, floor=49152)
    assert big_floor.tokens >= 49152  # never below micro_batch_size_per_gpu x max_length


def test_trainer_applies_recompute_plan(demo_dir, tmp_path, one_rank, monkeypatch):
    """The plan's layer count reaches the model, and a step with a partial recompute takes the same
    gradients as one with every layer recomputed."""
    overrides = base_overrides(demo_dir, tmp_path) + [
        "model.enable_gradient_checkpointing=true",
        "data.train_batch_size=4",
        "trainer.total_training_steps=1",
    ]
    norms = {}
    for recompute in (None, 1):
        plan = TokenBudget(4096, "test", recompute)
        monkeypatch.setattr(fsdp_sft_trainer, "choose_token_budget", lambda *a, plan=plan: plan)
        trainer = fsdp_sft_trainer.FSDPSFTTrainer(load_config(overrides), one_rank)
        flags = [layer.gradient_checkpointing for layer in decoder_layers(trainer.model.lm)]
        assert flags == ([True] * len(flags) if recompute is None else [True] + [False] * (len(flags) - 1))
        batch = trainer.sampler.epoch_order(0)[:4].tolist()
        mbs = [trainer._builder(trainer.train_ds)(mb) for mb in trainer.sampler.micro_batches(batch)]
        norms[recompute] = trainer.train_step(mbs)["train/grad_norm"]
    assert norms[1] == pytest.approx(norms[None], rel=1e-6)


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


def test_vision_budget_counts_the_patches_behind_each_image_token():
    """The tower's activations per image token scale with the patches pooled into it: Qwen's 2x2 merge (4),
    Gemma 3's 64x64 patches pooled to 256 tokens (16), Gemma 4's 3x3 pooling (9); same tower widths otherwise."""
    from types import SimpleNamespace

    from sft.loop.budget import vision_bytes_per_token

    tower = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2)
    qwen = SimpleNamespace(vision_config=SimpleNamespace(**tower, spatial_merge_size=2))
    gemma3 = SimpleNamespace(
        vision_config=SimpleNamespace(**tower, image_size=896, patch_size=14), mm_tokens_per_image=256
    )
    gemma4 = SimpleNamespace(vision_config=SimpleNamespace(**tower, patch_size=16, pooling_kernel_size=3))
    per_patch = vision_bytes_per_token(qwen, False) / 4
    assert per_patch > 0
    assert vision_bytes_per_token(gemma3, False) == pytest.approx(16 * per_patch)
    assert vision_bytes_per_token(gemma4, False) == pytest.approx(9 * per_patch)
