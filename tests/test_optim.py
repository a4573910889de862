"""AdamW parameter groups and the lr schedules of sft/loop/optim.py, checked against hand values."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist

from sft.loop.optim import (
    build_optimizer,
    build_scheduler,
    lr_multiplier,
    resolve_warmup_steps,
)


def _mult(step: int, **kw: object) -> float:
    return lr_multiplier(step, **kw)  # type: ignore[arg-type]


def test_resolve_warmup_steps() -> None:
    assert resolve_warmup_steps(100, 5, 0.5) == 5  # explicit steps win over the ratio
    assert resolve_warmup_steps(100, 0, 0.5) == 0  # 0 is explicit too: no warmup
    assert resolve_warmup_steps(100, -1, 0.1) == 10  # -1: use the ratio
    assert resolve_warmup_steps(7, -1, 0.5) == 3  # int() truncates 3.5
    with pytest.raises(ValueError, match="optim.lr_warmup_steps_ratio"):
        resolve_warmup_steps(100, -1, 1.5)


def test_constant_with_warmup_by_steps() -> None:
    kw = {"total_steps": 10, "warmup_steps": 4, "kind": "constant"}
    # (step + 1) / 4: the first step already trains at a quarter of the lr.
    assert [_mult(s, **kw) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert _mult(9, **kw) == 1.0


def test_cosine_with_warmup_by_ratio_and_floor() -> None:
    warmup = resolve_warmup_steps(10, -1, 0.2)  # 2 steps
    kw = {
        "total_steps": 10,
        "warmup_steps": warmup,
        "kind": "cosine",
        "min_lr_ratio": 0.1,
    }
    assert _mult(0, **kw) == pytest.approx(0.5)
    assert _mult(1, **kw) == pytest.approx(1.0)
    assert _mult(2, **kw) == pytest.approx(1.0)  # progress 0
    # step 6: progress (6-2)/8 = 0.5 -> 0.1 + 0.9 * 0.5 * (1 + cos(pi/2)) = 0.55
    assert _mult(6, **kw) == pytest.approx(0.55)
    # step 9 (last): progress 7/8 -> 0.1 + 0.9 * 0.5 * (1 + cos(7pi/8)) = 0.13425...
    assert _mult(9, **kw) == pytest.approx(0.1 + 0.45 * (1 + math.cos(7 * math.pi / 8)))
    assert _mult(9, **kw) == pytest.approx(0.1342548, abs=1e-6)
    assert _mult(10, **kw) == pytest.approx(0.1)  # progress 1 -> floor
    assert _mult(50, **kw) == pytest.approx(0.1)  # clamped past the end


def test_cosine_without_warmup() -> None:
    kw = {"total_steps": 4, "warmup_steps": 0, "kind": "cosine"}
    # progress s/4: 1, 0.5*(1+cos(pi/4)) = 0.85355, 0.5, 0.14645
    expected = [1.0, 0.8535534, 0.5, 0.1464466]
    assert [_mult(s, **kw) for s in range(4)] == pytest.approx(expected, abs=1e-6)


def test_wsd_decay_start_and_end() -> None:
    kw = {
        "total_steps": 20,
        "warmup_steps": 0,
        "kind": "wsd",
        "wsd_decay_ratio": 0.25,
        "min_lr_ratio": 0.1,
    }
    # D = ceil(0.25 * 20) = 5 decay steps: 15..19. Stable before that.
    assert all(_mult(s, **kw) == 1.0 for s in range(15))
    # 1 - 0.9 * (i + 1) / 5 for i = 0..4
    expected = [0.82, 0.64, 0.46, 0.28, 0.1]
    assert [_mult(s, **kw) for s in range(15, 20)] == pytest.approx(expected)
    assert _mult(25, **kw) == pytest.approx(0.1)


def test_wsd_with_warmup_and_float_ratio() -> None:
    # total 32, warmup 2 -> span 30; 0.1 * 30 is 3.0000000000000004 in floats, which
    # must still give D = 3 (decay on steps 29, 30, 31), not 4.
    kw = {"total_steps": 32, "warmup_steps": 2, "kind": "wsd", "wsd_decay_ratio": 0.1}
    assert _mult(0, **kw) == pytest.approx(0.5)
    assert _mult(28, **kw) == 1.0
    assert [_mult(s, **kw) for s in (29, 30, 31)] == pytest.approx([2 / 3, 1 / 3, 0.0])


def test_unknown_scheduler_message() -> None:
    with pytest.raises(ValueError, match=r"optim.lr_scheduler='linear'.*cosine"):
        lr_multiplier(0, total_steps=10, warmup_steps=0, kind="linear")
    model = torch.nn.Linear(2, 2)
    opt = build_optimizer(model, 1e-3, (0.9, 0.95), 0.0, "cpu")
    with pytest.raises(ValueError, match=r"optim.lr_scheduler='step'.*wsd"):
        build_scheduler(
            opt,
            total_steps=10,
            warmup_steps=0,
            kind="step",
            min_lr_ratio=0.0,
            num_cycles=0.5,
            wsd_decay_ratio=0.1,
        )


class _Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(4, 8)  # weight 2-D (decay), bias 1-D (no decay)
        self.norm = torch.nn.LayerNorm(8)  # weight and bias 1-D (no decay)
        self.head = torch.nn.Linear(8, 2, bias=False)  # weight 2-D (decay)
        self.frozen = torch.nn.Linear(2, 2)
        self.frozen.requires_grad_(False)  # must not reach the optimizer at all

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.proj(x)))


def test_param_groups() -> None:
    m = _Tiny()
    opt = build_optimizer(m, 1e-3, (0.9, 0.95), 0.1, "cpu")
    assert len(opt.param_groups) == 2
    decay, no_decay = opt.param_groups
    assert {id(p) for p in decay["params"]} == {id(m.proj.weight), id(m.head.weight)}
    assert decay["weight_decay"] == 0.1
    assert {id(p) for p in no_decay["params"]} == {
        id(m.proj.bias),
        id(m.norm.weight),
        id(m.norm.bias),
    }
    assert no_decay["weight_decay"] == 0.0
    assert opt.defaults["fused"] is True  # the trainer queues it before the read-back, skipped by a device flag
    assert opt.defaults["betas"] == (0.9, 0.95) and opt.defaults["lr"] == 1e-3


def test_fused_on_cuda_device_type_and_foreach_elsewhere() -> None:
    opt = build_optimizer(torch.nn.Linear(2, 2), 1e-3, (0.9, 0.95), 0.1, "cuda")
    assert opt.defaults["fused"] is True
    opt = build_optimizer(torch.nn.Linear(2, 2), 1e-3, (0.9, 0.95), 0.1, "mps")
    assert opt.defaults["foreach"] is True and not opt.defaults["fused"]


def test_fused_adamw_skips_itself_on_the_device_flag() -> None:
    """The trainer's queued update (sft/trainer.py::train_step) relies on this: with `found_inf` set
    the fused step leaves weights, moments and step count as they were; with it clear it updates them."""
    m = torch.nn.Linear(3, 2)
    opt = build_optimizer(m, 1e-2, (0.9, 0.95), 0.1, "cpu")
    m(torch.randn(4, 3)).sum().backward()
    before = [p.detach().clone() for p in m.parameters()]
    opt.found_inf = torch.ones(())
    opt.step()
    assert all(torch.equal(a, p) for a, p in zip(before, m.parameters()))
    assert all(float(s["step"]) == 0 and float(s["exp_avg"].abs().sum()) == 0 for s in opt.state.values())
    opt.found_inf = torch.zeros(())
    opt.step()
    assert all(not torch.equal(a, p) for a, p in zip(before, m.parameters()))
    assert all(float(s["step"]) == 1 for s in opt.state.values())


def test_no_trainable_params() -> None:
    m = torch.nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="requires_grad"):
        build_optimizer(m, 1e-3, (0.9, 0.95), 0.1, "cpu")


def _sched(opt: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
    return build_scheduler(
        opt,
        total_steps=12,
        warmup_steps=3,
        kind="cosine",
        min_lr_ratio=0.2,
        num_cycles=0.5,
        wsd_decay_ratio=0.1,
    )


def _train(model: torch.nn.Module, opt, sched, steps: range) -> list[float]:
    seen = []
    for _ in steps:
        seen.append(sched.get_last_lr()[0])
        # The lr in the groups is what AdamW actually uses this step.
        assert opt.param_groups[0]["lr"] == seen[-1] == opt.param_groups[1]["lr"]
        model(torch.ones(1, 4)).sum().backward()
        opt.step()
        opt.zero_grad()
        sched.step()
    return seen


def test_scheduler_matches_pure_function_and_resumes() -> None:
    base = 2e-3
    expected = [
        base * lr_multiplier(s, total_steps=12, warmup_steps=3, kind="cosine", min_lr_ratio=0.2) for s in range(12)
    ]
    torch.manual_seed(0)
    m = _Tiny()
    opt = build_optimizer(m, base, (0.9, 0.95), 0.1, "cpu")
    sched = _sched(opt)
    first = _train(m, opt, sched, range(5))
    assert first == pytest.approx(expected[:5], rel=1e-12)
    sched_state = sched.state_dict()

    # Resume into fresh objects; loading only the scheduler must also restore the lr.
    opt2 = build_optimizer(m, base, (0.9, 0.95), 0.1, "cpu")
    sched2 = _sched(opt2)
    assert sched2.get_last_lr()[0] == pytest.approx(expected[0])
    sched2.load_state_dict(sched_state)
    rest = _train(m, opt2, sched2, range(5, 12))
    assert rest == pytest.approx(expected[5:], rel=1e-12)
    assert sched2.last_epoch == 12


def test_fsdp2_dtensor_params(tmp_path) -> None:
    """DTensor parameters (FSDP2, one gloo rank) land in the same groups and train."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        m = _Tiny()
        fully_shard(m)
        assert isinstance(m.proj.weight, DTensor)
        opt = build_optimizer(m, 1e-2, (0.9, 0.95), 0.1, "cpu")
        assert [len(g["params"]) for g in opt.param_groups] == [2, 3]
        before = m.proj.weight.full_tensor().clone()
        m(torch.ones(2, 4)).sum().backward()
        opt.step()
        assert not torch.equal(before, m.proj.weight.full_tensor())
    finally:
        dist.destroy_process_group()


def test_bf16_master_weights_are_warned_about(caplog):
    import logging

    with caplog.at_level(logging.WARNING, logger="sft"):
        build_optimizer(torch.nn.Linear(4, 4), 1e-3, (0.9, 0.95), 0.0, "cpu")
        assert "model_dtype=bf16" not in caplog.text
        build_optimizer(torch.nn.Linear(4, 4).to(torch.bfloat16), 1e-3, (0.9, 0.95), 0.0, "cpu")
    assert "model_dtype=bf16: AdamW updates smaller than" in caplog.text
