"""Phi-3's `longrope` trained per sample (sft/models/rope_switch.py), on real fully_shard over gloo.

transformers switches a whole batch to the long frequencies once its longest sequence passes
original_max_position_embeddings (tests/test_families.py shows it); sft gives each sample the set it has alone. A tiny
Phi-3 whose switch (40 tokens) falls between the demo's sample lengths (29 to 96) trains padded (1 process) ≡
remove-padding (1 process) ≡ remove-padding + sp=2 (2 processes) on losses and weights after 2 steps; the independent
check is plain transformers on each validation sample alone, against the trainer's validation loss over micro-batches
that mix short and long samples. The batch-wide rule, planted in the trainer, fails that check."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import export_val_loss, two_steps
from distributed_helper import run_ranks
from family_models import COMMON, write_family_model
from family_workers import train_many, train_many_batch_wide_rope

from sft.models.rope_switch import long_tokens

SWITCH = 40
HALF = COMMON["head_dim"] // 2
ROPE = {
    "rope_type": "longrope",
    "rope_theta": 10000.0,
    "original_max_position_embeddings": SWITCH,
    "short_factor": [1.0] * HALF,
    "long_factor": [4.0] * HALF,
}
MODES = {
    "padded": (1, []),
    "rmpad": (1, ["use_remove_padding=true"]),
    "sp2": (2, ["use_remove_padding=true", "ulysses_sequence_parallel_size=2"]),
}
EXPORT = ['trainer.checkpoint.save_contents=["hf_model"]', "trainer.checkpoint.hf_dtype=fp32"]


def _expected_flags(lengths: list[int]) -> list[bool]:
    return [n > SWITCH for n in lengths for _ in range(n)]


def test_long_tokens_follow_each_samples_own_length():
    """Padded rows by their mask, a packed row by its boundaries, and each SP rank's slice of that row."""
    mask = torch.zeros(2, 50, dtype=torch.long)
    mask[0, :41], mask[1, :40] = 1, 1
    flags = long_tokens(SWITCH, mask, mask, None, None)
    assert flags[0].all() and not flags[1].any()

    lengths = [12, 41, 40, 7, 60]  # 160 tokens
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    ids = torch.zeros(1, 160, dtype=torch.long)
    assert long_tokens(SWITCH, ids, None, cu, None)[0].tolist() == _expected_flags(lengths)


def _sp_slices(out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo")
    try:
        lengths = [12, 41, 40, 7, 60]
        cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
        ids = torch.zeros(1, 80, dtype=torch.long)  # this rank's half of the 160-token row
        flags = long_tokens(SWITCH, ids, None, cu, dist.group.WORLD)
        torch.save(flags, f"{out}.{dist.get_rank()}")
    finally:
        dist.destroy_process_group()


def test_sp_ranks_cut_their_slice_out_of_the_rows_flags(tmp_path):
    run_ranks(_sp_slices, 2, str(tmp_path / "flags"))
    whole = torch.cat([torch.load(tmp_path / f"flags.{r}")[0] for r in range(2)])
    assert whole.tolist() == _expected_flags([12, 41, 40, 7, 60])


def test_patched_rotary_equals_transformers_on_each_sample_alone_with_partial_rotary():
    """Phi-4-mini's shape of longrope: rotary on 3/4 of the head, factors that differ per frequency. The patched module
    on a packed row gives each sample exactly the cos/sin that transformers' own module gives it alone."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from sft.models.rope_switch import install_per_sample_longrope

    half = int(16 * 0.75) // 2
    rope = dict(
        ROPE,
        original_max_position_embeddings=16,
        partial_rotary_factor=0.75,
        short_factor=[1.0 + 0.1 * i for i in range(half)],
        long_factor=[3.0 + 0.2 * i for i in range(half)],
    )
    cfg = AutoConfig.for_model(
        "phi3",
        **dict(COMMON, hidden_size=64, head_dim=16, vocab_size=50, pad_token_id=0, rope_parameters=rope),
        original_max_position_embeddings=16,
    )
    decoder = AutoModelForCausalLM.from_config(cfg).model
    x = torch.zeros(1, 1, 64)
    alone = {n: decoder.rotary_emb(x, torch.arange(n)[None]) for n in (10, 30)}  # transformers' own, before the patch
    assert (alone[30][0][0, :10] - alone[10][0][0]).abs().max() > 0.1  # the two sets differ
    patch = install_per_sample_longrope(decoder, 16)
    cu = torch.tensor([0, 10, 40], dtype=torch.int32)
    patch.tokens = long_tokens(16, torch.zeros(1, 40, dtype=torch.long), None, cu, None)
    cos, sin = decoder.rotary_emb(x, torch.cat([torch.arange(10), torch.arange(30)])[None])
    assert torch.equal(cos[0, :10], alone[10][0][0]) and torch.equal(sin[0, :10], alone[10][1][0])
    assert torch.equal(cos[0, 10:], alone[30][0][0]) and torch.equal(sin[0, 10:], alone[30][1][0])


@pytest.fixture(scope="module")
def phi3(demo_dir: Path, tmp_path_factory) -> Path:
    return write_family_model(
        demo_dir / "model",
        tmp_path_factory.mktemp("phi3") / "m",
        "phi3",
        rope_parameters=ROPE,
        original_max_position_embeddings=SWITCH,  # Phi-3's config key wins over the rope parameters'
    )


@pytest.fixture(scope="module")
def runs(phi3, demo_dir, tmp_path_factory) -> dict[str, dict]:
    """mode -> {weights, metrics, out}; each run exports its HF model; "planted": remove-padding with the batch-wide
    switch that transformers applies."""
    tmp = tmp_path_factory.mktemp("longrope_runs")
    results = {}
    for mode, (world, extra) in {**MODES, "planted": MODES["rmpad"]}.items():
        job = (two_steps(demo_dir, phi3, tmp / mode, *extra, *EXPORT), str(tmp / f"{mode}.pt"))
        run_ranks(train_many_batch_wide_rope if mode == "planted" else train_many, world, [job], world)
        results[mode] = torch.load(tmp / f"{mode}.pt", weights_only=False) | {"out": tmp / mode}
    return results


def _losses(run: dict) -> list[float]:
    return [m["train/loss"] for m in run["metrics"] if "train/loss" in m]


def _val_loss(run: dict) -> float:
    return [m["val/loss"] for m in run["metrics"] if "val/loss" in m][-1]


@pytest.mark.parametrize("mode", ["rmpad", "sp2"])
def test_packed_and_sp2_match_padded(runs, mode):
    ref, got = runs["padded"], runs[mode]
    a, b = _losses(ref), _losses(got)
    print(f"longrope {mode} vs padded: losses {b} vs {a}")
    assert len(a) == len(b) == 2
    for x, y in zip(a, b):
        assert abs(x - y) <= 1e-5 * abs(x), (a, b)
    worst = max((got["weights"][n] - w).abs().max().item() for n, w in ref["weights"].items())
    print(f"longrope {mode} vs padded: max |weight diff| after 2 steps {worst:.2e}")
    for name, w in ref["weights"].items():
        assert torch.allclose(got["weights"][name], w, rtol=1e-4, atol=1e-6), name


@pytest.mark.parametrize("mode", ["padded", "rmpad", "sp2"])
def test_export_reproduces_val_loss_of_each_sample_alone(runs, demo_dir, mode):
    """Plain transformers, one validation sample at a time (each at the frequencies its own length selects)."""
    run = runs[mode]
    export = next((run["out"]).glob("global_step_*/huggingface"))
    alone = export_val_loss(export, demo_dir, run["out"] / "val")
    print(f"longrope {mode}: trainer val/loss {_val_loss(run):.8f}, each sample alone {alone:.8f}")
    assert abs(alone - _val_loss(run)) <= 1e-5 * alone, (alone, _val_loss(run))


def test_batch_wide_switch_planted_fails_the_check(runs, demo_dir):
    run = runs["planted"]
    export = next((run["out"]).glob("global_step_*/huggingface"))
    alone = export_val_loss(export, demo_dir, run["out"] / "val")
    print(f"longrope planted batch-wide: trainer val/loss {_val_loss(run):.8f}, each sample alone {alone:.8f}")
    assert abs(alone - _val_loss(run)) > 1e-3 * alone, (alone, _val_loss(run))
