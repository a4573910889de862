"""Activation checkpointing modes (selective, and partial as `gradient_checkpointing_mode=auto` sets it):
same gradients as full/none, fewer recomputed matmuls."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import Qwen2Config, Qwen2ForCausalLM

from sft.kernels import selective_checkpoint_context
from sft.parallelize import apply_recompute


class CountMatmuls(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default):
            self.n += 1
        return func(*args, **(kwargs or {}))


def _grads(mode: str) -> tuple[dict[str, torch.Tensor], int]:
    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, use_cache=False, attn_implementation="sdpa",
    )  # fmt: skip
    model = Qwen2ForCausalLM(cfg)
    if mode != "none":
        kwargs = {"use_reentrant": False}
        if mode == "selective":
            kwargs["context_fn"] = selective_checkpoint_context()
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if mode == "partial":  # only the first of the two layers is recomputed
        apply_recompute(SimpleNamespace(lm=model), 1)
        assert [layer.gradient_checkpointing for layer in model.model.layers] == [True, False]
    model.train()
    ids = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(1))
    loss = model(input_ids=ids, labels=ids).loss
    with CountMatmuls() as counter:
        loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}, counter.n


@pytest.mark.parametrize("mode", ["full", "selective", "partial"])
def test_checkpointing_modes_match_no_checkpointing(mode: str) -> None:
    ref, backward_mms_plain = _grads("none")
    grads, backward_mms = _grads(mode)
    for name, g in ref.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-5, atol=1e-6, msg=name)
    if mode == "full":  # the backward re-runs each layer's forward matmuls (up to the last one it needs)
        assert backward_mms >= backward_mms_plain + 2 * 6
    elif mode == "partial":  # one layer's forward again, up to the up projection (as in full): 6 matmuls
        assert backward_mms == backward_mms_plain + 6
    else:  # selective keeps the matmul outputs: no matmul is recomputed
        assert backward_mms == backward_mms_plain


def test_liger_ops_are_pinned_to_triton_unless_the_user_chose(monkeypatch):
    """With the CUTLASS DSL importable, Liger would pick its CuTe DSL RoPE, which compiles per packed shape."""
    from sft.kernels import pin_liger_triton

    for var in ("LIGER_KERNEL_IMPL", "LIGER_KERNEL_BACKEND", "LIGER_KERNEL_IMPL_ROPE", "LIGER_KERNEL_IMPL_RMS_NORM"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("LIGER_KERNEL_IMPL_SWIGLU", "nvidia-cutedsl")  # the user's per-op choice stays
    pin_liger_triton()
    import os

    assert os.environ["LIGER_KERNEL_IMPL_ROPE"] == os.environ["LIGER_KERNEL_IMPL_RMS_NORM"] == "nvidia-triton"
    assert os.environ["LIGER_KERNEL_IMPL_SWIGLU"] == "nvidia-cutedsl"
    monkeypatch.delenv("LIGER_KERNEL_IMPL_ROPE")
    monkeypatch.setenv("LIGER_KERNEL_IMPL", "nvidia-cutedsl")  # a global choice: no per-op pins on top
    pin_liger_triton()
    assert "LIGER_KERNEL_IMPL_ROPE" not in os.environ
