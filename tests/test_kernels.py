"""Activation checkpointing modes (selective, and partial as `gradient_checkpointing_mode=auto` sets it):
same gradients as full/none, fewer recomputed matmuls; the same with q, k and v as one autograd node
(sft/ops/qkv_proj.py, on in every run without compile)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import Qwen2Config, Qwen2ForCausalLM

from sft.ops import qkv_proj
from sft.parallel.fsdp import apply_recompute, selective_checkpoint_context


class CountMatmuls(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default):
            self.n += 1
        return func(*args, **(kwargs or {}))


def _grads(mode: str, joined: bool = False) -> tuple[dict[str, torch.Tensor], int]:
    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, use_cache=False, attn_implementation="sdpa",
    )  # fmt: skip
    model = Qwen2ForCausalLM(cfg)
    if joined:
        assert qkv_proj.join_qkv(model) == 2
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
    backward, nodes = qkv_proj._QKV.backward, []
    qkv_proj._QKV.backward = staticmethod(lambda ctx, *g: nodes.append(1) or backward(ctx, *g))
    try:
        with CountMatmuls() as counter:
            loss.backward()
    finally:
        qkv_proj._QKV.backward = staticmethod(backward)
    assert len(nodes) == (2 if joined else 0)  # one q/k/v node per layer took the gradients
    return {n: p.grad.clone() for n, p in model.named_parameters()}, counter.n


@pytest.mark.parametrize("joined", [False, True], ids=["own_qkv", "joined_qkv"])
@pytest.mark.parametrize("mode", ["full", "selective", "partial"])
def test_checkpointing_modes_match_no_checkpointing(mode: str, joined: bool) -> None:
    ref, _ = _grads("none")  # the model's own projections, nothing recomputed
    _, backward_mms_plain = _grads("none", joined)
    grads, backward_mms = _grads(mode, joined)
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
    from sft.ops.patch import pin_liger_triton

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


def _tiny(model_type: str, dtype: torch.dtype = torch.bfloat16):
    """A two-layer model of the family from its config class, norm weights set away from 1."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(
        model_type, vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=64, use_cache=False, pad_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    with torch.no_grad():
        for name, p in lm.named_parameters():
            if "norm" in name:
                p.copy_(torch.rand_like(p.float()) * 2 + 0.25)
    return lm


@pytest.mark.parametrize("model_type,norms", [("qwen2", 5), ("qwen3", 9), ("llama", 5), ("olmo2", 9)])
def test_fused_rms_norm_computes_the_norm_math(model_type, norms):
    """Each Llama-style RMSNorm on PyTorch's fused kernel gives weight x x / rms(x) (computed here in fp64)
    to one bf16 rounding, forward and backward, with the same parameter names."""
    from sft.ops.patch import use_fused_rms_norm

    lm = _tiny(model_type)
    names = [n for n, _ in lm.named_parameters()]
    assert use_fused_rms_norm(lm) == norms
    assert use_fused_rms_norm(lm) == 0  # already swapped: nothing left to swap
    assert [n for n, _ in lm.named_parameters()] == names
    swapped = [m for m in lm.modules() if type(m).forward.__name__ == "_fused_rms_norm_forward"]
    assert len(swapped) == norms
    for m in swapped:
        x = (torch.randn(7, m.weight.shape[0]) * 3).to(torch.bfloat16).requires_grad_()
        y = m(x)
        dy = torch.randn_like(y)
        (y * dy).sum().backward()
        x64, w64 = x.detach().double().requires_grad_(), m.weight.detach().double().requires_grad_()
        want = w64 * x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + m.variance_epsilon)
        (want * dy.double()).sum().backward()
        assert y.dtype == torch.bfloat16
        torch.testing.assert_close(y.double(), want, rtol=2**-8, atol=1e-6)
        torch.testing.assert_close(x.grad.double(), x64.grad, rtol=2**-7, atol=2e-2)
        torch.testing.assert_close(m.weight.grad.double(), w64.grad, rtol=2**-6, atol=5e-2)
        m.weight.grad = None


def test_fused_rms_norm_keeps_the_model_math_for_mixed_dtypes():
    """A bf16 input to an fp32 weight keeps transformers' own promotion (an fp32 output), not the kernel's."""
    from sft.ops.patch import use_fused_rms_norm

    lm = _tiny("qwen2", torch.float32)
    use_fused_rms_norm(lm)
    norm = lm.model.norm
    x = torch.randn(3, 64).to(torch.bfloat16)
    ref = norm.weight * (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype)
    assert norm(x).dtype == torch.float32
    torch.testing.assert_close(norm(x), ref)


@pytest.mark.parametrize(
    "model_type,liger_norm,liger_mlp",
    [
        ("qwen2", False, False),
        ("llama", False, False),
        ("phi3", False, True),
        ("gemma", True, True),
        ("gemma2", True, True),
    ],
)
def test_apply_liger_puts_each_layer_on_its_faster_exact_kernel(monkeypatch, model_type, liger_norm, liger_mlp):
    """Llama-style norms go to sft/ops/rms_norm.py and SiLU-gated MLPs to sft/ops/swiglu.py; Gemma's (1 + weight) norms
    and GEGLU, and Phi-3's fused gate_up MLP, stay with Liger. A stand-in for liger-kernel records what
    `apply_liger` asks of it."""
    import sys
    import types

    from sft.ops.patch import apply_liger

    asked: dict = {}

    def fake_apply(model=None, rope=True, rms_norm=True, swiglu=True, cross_entropy=False, **_):
        asked.update(rms_norm=rms_norm, swiglu=swiglu)

    mod = types.ModuleType("liger_kernel.transformers.monkey_patch")
    mod.MODEL_TYPE_TO_APPLY_LIGER_FN = {model_type: fake_apply}
    for name in ("liger_kernel", "liger_kernel.transformers"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers.monkey_patch", mod)
    lm = _tiny(model_type)
    apply_liger(lm)
    norms = sum(type(m).forward.__name__ == "_fused_rms_norm_forward" for m in lm.modules())
    mlps = sum(type(m).forward.__name__ == "_fused_swiglu_forward" for m in lm.modules())
    assert asked == {"rms_norm": liger_norm, "swiglu": liger_mlp}
    assert norms == (0 if liger_norm else 5)
    assert mlps == (0 if liger_mlp else 2)


# Every family whose row says `mlp="sft"` and that Liger covers: its MLP must be down(silu(gate(x)) * up(x)).
_SFT_MLP_FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "olmo2", "granite", "smollm3", "olmo3", "ministral"]


def test_the_sft_mlp_list_is_the_family_table():
    from sft.models.families import FAMILIES, mlp_kernel

    assert sorted(t for t in FAMILIES if mlp_kernel(t) == "sft") == sorted(_SFT_MLP_FAMILIES)


@pytest.mark.parametrize("model_type", _SFT_MLP_FAMILIES)
def test_fused_swiglu_computes_each_family_mlp(model_type):
    """The swapped MLP of each family gives what the family's own MLP computes (run here in fp64 on a copy),
    forward and every gradient, with the same parameter names: a family whose MLP is not
    down(silu(gate(x)) * up(x)) fails here."""
    import copy

    from sft.ops.patch import use_fused_swiglu

    lm = _tiny(model_type, torch.float32)
    ref = copy.deepcopy(lm.model.layers[0].mlp).double()
    names = [n for n, _ in lm.named_parameters()]
    assert use_fused_swiglu(lm) == 2
    assert use_fused_swiglu(lm) == 0  # already swapped
    assert [n for n, _ in lm.named_parameters()] == names
    mlp = lm.model.layers[0].mlp
    assert type(mlp).forward.__name__ == "_fused_swiglu_forward"
    x = (torch.randn(2, 7, 64) * 2).requires_grad_()
    y = mlp(x)
    dy = torch.randn_like(y)
    (y * dy).sum().backward()
    x64 = x.detach().double().requires_grad_()
    want = ref(x64)
    (want * dy.double()).sum().backward()
    torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-5, atol=1e-6)
    for (name, p), p64 in zip(mlp.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad.double(), p64.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_apply_liger_refuses_a_family_row_whose_mlp_is_not_silu_gated(monkeypatch):
    """A Llama-architecture checkpoint with a GELU MLP: the row's promise does not hold, so `model.use_liger=true`
    fails before loading instead of training with the model's own MLP unannounced; `auto` keeps that MLP."""
    import sys
    import types

    from sft.ops.patch import apply_liger

    mod = types.ModuleType("liger_kernel.transformers.monkey_patch")
    mod.MODEL_TYPE_TO_APPLY_LIGER_FN = {"llama": lambda model=None, **_: None}
    for name in ("liger_kernel", "liger_kernel.transformers"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers.monkey_patch", mod)
    lm = _tiny("llama")
    for layer in lm.model.layers:
        layer.mlp.act_fn = torch.nn.GELU()
    with pytest.raises(ValueError, match="use_liger=true: no down.*MLP found in llama"):
        apply_liger(lm)
    apply_liger(lm, required=False)
    assert not any(type(m).forward.__name__ == "_fused_swiglu_forward" for m in lm.modules())
