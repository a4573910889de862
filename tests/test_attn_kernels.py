"""`model.attn_kernel`: which packed-attention kernel runs, and how each kernel is called."""

from __future__ import annotations

import importlib.util
import os
import sys
import types

import pytest
import torch

from sft.models.attention import kernels as attn_kernels
from sft.models.attention.kernels import choose_attn_kernel, run_kernel

CUDA = torch.device("cuda")


@pytest.fixture
def gpu(monkeypatch):
    """Pretend to be on a GPU of compute capability `major`.x with the kernels in `have` installed."""

    def setup(major: int, have: set[str]) -> None:
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (major, 0))
        monkeypatch.setattr(attn_kernels, "installed", lambda name: name in have)

    return setup


@pytest.mark.parametrize(
    "major,have,chosen",
    [
        (9, {"fa4", "flash_attn", "torch"}, "fa4"),  # Hopper: FA4 first
        (10, {"fa4", "torch"}, "fa4"),  # Blackwell
        (8, {"fa4", "flash_attn", "torch"}, "flash_attn"),  # FA4 has no Ampere kernels
        (9, {"flash_attn", "torch"}, "flash_attn"),
        (9, {"torch"}, "torch"),
        (12, {"fa4", "torch"}, "torch"),
    ],
)
def test_auto_takes_the_fastest_that_runs_here(gpu, major, have, chosen):
    gpu(major, have)
    assert choose_attn_kernel("auto", CUDA) == chosen


def test_a_named_kernel_runs_or_is_refused_in_one_line(gpu):
    gpu(9, {"torch", "fa4"})
    assert choose_attn_kernel("torch", CUDA) == "torch"  # asked for, used though fa4 is faster
    with pytest.raises(ValueError, match=r"model.attn_kernel=flash_attn: .* not installed \(pip install flash-attn\)"):
        choose_attn_kernel("flash_attn", CUDA)
    gpu(8, {"torch", "fa4"})
    with pytest.raises(
        ValueError, match=r"model.attn_kernel=fa4: .* runs on compute capability 9.x/10.x, this GPU is 8.x"
    ):
        choose_attn_kernel("fa4", CUDA)
    gpu(9, set())
    with pytest.raises(ValueError, match="needs a varlen attention kernel"):
        choose_attn_kernel("auto", CUDA)
    with pytest.raises(ValueError, match="choose one of auto, fa4, flash_attn, torch"):
        choose_attn_kernel("fa3", CUDA)


def test_off_cuda_only_auto_is_taken():
    assert choose_attn_kernel("auto", torch.device("cpu")) is None  # the exact per-segment path runs
    with pytest.raises(ValueError, match="attention kernels run on CUDA GPUs; this run uses cpu"):
        choose_attn_kernel("torch", torch.device("cpu"))


def test_fa4_gets_its_own_spelling_of_causal_and_windows(monkeypatch):
    """FA4 reads causal as no window; flash-attn's (-1, 0) would turn into a local window of -1 there."""
    calls: list[dict] = []

    def fake(q, k, v, **kw):
        calls.append(kw)
        return q * 2, torch.zeros(1)  # FA4 returns (out, lse)

    module = types.ModuleType("flash_attn.cute")
    module.flash_attn_varlen_func = fake
    monkeypatch.setitem(sys.modules, "flash_attn.cute", module)
    q = torch.ones(6, 4, 8)
    cu = torch.tensor([0, 2, 6], dtype=torch.int32)
    out = run_kernel("fa4", q, q[:, :2], q[:, :2], cu, cu, 4, 4, 0.5, (-1, 0), None)
    torch.testing.assert_close(out, q * 2)
    run_kernel("fa4", q, q[:, :2], q[:, :2], cu, cu, 4, 4, 0.5, (2, 0), 30.0)
    assert [c["window_size"] for c in calls] == [(None, None), (2, 0)]
    assert [c["softcap"] for c in calls] == [0.0, 30.0]
    assert all(c["causal"] and c["softmax_scale"] == 0.5 and c["max_seqlen_q"] == 4 for c in calls)
    assert calls[0]["cu_seqlens_q"] is cu and calls[0]["cu_seqlens_k"] is cu


def test_choosing_fa4_keeps_its_compiled_kernels_on_disk_unless_the_user_said_otherwise(gpu, monkeypatch):
    gpu(9, {"fa4", "torch"})
    monkeypatch.delenv("FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED", raising=False)
    choose_attn_kernel("torch", CUDA)
    assert "FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED" not in os.environ
    choose_attn_kernel("auto", CUDA)
    assert os.environ["FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED"] == "1"
    monkeypatch.setenv("FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED", "0")
    choose_attn_kernel("fa4", CUDA)
    assert os.environ["FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED"] == "0"


def test_a_kernel_counts_as_installed_only_when_its_function_imports(tmp_path, monkeypatch):
    """flash-attn 2 and FA4 share the `flash_attn` namespace, and FA4 also needs the CUTLASS DSL: a
    `flash_attn/cute` folder whose import fails is not FA4."""
    pkg = tmp_path / "flash_attn" / "cute"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("import cutlass.cute  # the CUTLASS DSL, absent here\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for mod in [m for m in sys.modules if m == "flash_attn" or m.startswith("flash_attn.")]:
        monkeypatch.delitem(sys.modules, mod)
    attn_kernels.installed.cache_clear()
    try:
        assert importlib.util.find_spec("flash_attn.cute") is not None  # the folder is there
        assert not attn_kernels.installed("fa4") and not attn_kernels.installed("flash_attn")
        assert attn_kernels.installed("torch")
    finally:
        attn_kernels.installed.cache_clear()


def test_compiled_layers_get_a_kernel_torch_compile_can_trace(gpu):
    gpu(9, {"fa4", "flash_attn", "torch"})
    assert choose_attn_kernel("auto", CUDA, compiled=True) == "flash_attn"
    gpu(9, {"fa4", "torch"})
    assert choose_attn_kernel("auto", CUDA, compiled=True) == "torch"
    with pytest.raises(ValueError, match=r"model.attn_kernel=fa4: torch.compile cannot trace FlashAttention-4"):
        choose_attn_kernel("fa4", CUDA, compiled=True)
