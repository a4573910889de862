"""sft/ops/qkv_proj.py: q, k and v as one autograd node give what the model's own three projections give.

Every family of sft/models/families.py is built tiny from its config class and run twice in fp32, with and
without the joined projections: logits and every parameter gradient must agree, and every projection must
have returned the joined node's output (a silent fall-back would be correct but slower). The backward is
checked on its own against autograd in fp64, with and without biases and with frozen weights (LoRA)."""

from __future__ import annotations

import copy

import pytest
import torch
from family_models import COMMON, EXTRA, FAMILY_TYPES
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

import sft.ops.qkv_proj as qp

# Layers whose attention has q, k and v projections, where not all layers do: Phi-3 has one qkv_proj already,
# DeepSeek-V3's MLA projects through low-rank latents, and of the tiny Gemma 4's three layers only the first
# has all three (the global layer reuses k as v, the last reuses another layer's k and v).
JOINED = {"phi3": 0, "deepseek_v3": 0, "deepseek_v2": 0, "glm4_moe_lite": 0, "sarvam_mla": 0, "gemma4_text": 1}


def _tiny(model_type: str) -> nn.Module:
    cfg = AutoConfig.for_model(model_type, **dict(COMMON, **EXTRA[model_type]), vocab_size=64, pad_token_id=0)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)  # MoE experts' grouped GEMM has no fp64


@pytest.fixture
def stash_hits(monkeypatch):
    """Counts projections that returned the joined node's output, and those that computed themselves."""
    hits = {"joined": 0, "own": 0}
    forward = qp._StashLinear.forward

    def counted(self, x):
        stash = self.__dict__.get("_sft_out")
        hits["joined" if stash is not None and stash[0] is x and stash[1] == x._version else "own"] += 1
        return forward(self, x)

    monkeypatch.setattr(qp._StashLinear, "forward", counted)
    return hits


@pytest.mark.parametrize("model_type", FAMILY_TYPES)
def test_joined_qkv_matches_each_family(model_type, stash_hits):
    ref = _tiny(model_type)
    lm = copy.deepcopy(ref)
    names = [n for n, _ in lm.named_parameters()]
    layers = lm.config.num_hidden_layers
    joined = JOINED.get(model_type, layers)
    assert qp.join_qkv(lm) == joined
    assert [n for n, _ in lm.named_parameters()] == names
    ids = torch.randint(1, 64, (2, 11), generator=torch.Generator().manual_seed(1))
    outs = []
    for model in (ref, lm):
        logits = model(input_ids=ids).logits
        (logits * torch.linspace(-1, 1, logits.shape[-1], dtype=logits.dtype)).sum().backward()
        outs.append((logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (want, want_g), (got, got_g) = outs
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert got_g.keys() == want_g.keys()
    for n in want_g:  # atol scaled to the gradient: summing the three input gradients in another order rounds
        atol = 1e-5 * max(1.0, float(want_g[n].abs().max()))
        torch.testing.assert_close(got_g[n], want_g[n], rtol=1e-4, atol=atol, msg=n)
    assert stash_hits == {"joined": 3 * joined, "own": 0}


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("frozen", [False, True], ids=["trained", "frozen_weights"])
def test_backward_matches_autograd_in_fp64(bias, frozen):
    """dx (k and v added in place into q's GEMM), the weight gradients and the GEMV bias gradients, against
    autograd of three F.linear calls; frozen weights (as under LoRA) get no gradient at all."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 7, 12, generator=g, dtype=torch.float64, requires_grad=True)
    params = []
    for n in (12, 4, 4):
        w = torch.randn(n, 12, generator=g, dtype=torch.float64, requires_grad=not frozen)
        b = torch.randn(n, generator=g, dtype=torch.float64, requires_grad=not frozen) if bias else None
        params += [w, b]
    cots = [torch.randn(2, 7, n, generator=g, dtype=torch.float64) for n in (12, 4, 4)]
    outs = qp._QKV.apply(x, *params)
    sum((o * c).sum() for o, c in zip(outs, cots)).backward()
    got = [x.grad] + [p.grad for p in params if p is not None]
    x.grad = None
    for p in params:
        if p is not None:
            p.grad = None
    refs = [torch.nn.functional.linear(x, params[i], params[i + 1]) for i in (0, 2, 4)]
    for o, r in zip(outs, refs):
        torch.testing.assert_close(o, r)
    sum((o * c).sum() for o, c in zip(refs, cots)).backward()
    want = [x.grad] + [p.grad for p in params if p is not None]
    torch.testing.assert_close(got[0], want[0])
    if frozen:
        assert all(a is None for a in got[1:]) and all(b is None for b in want[1:])
    else:
        for a, b in zip(got[1:], want[1:], strict=True):
            torch.testing.assert_close(a, b)


class _Attn(nn.Module):
    """An attention-like module that may change its input in place before projecting it."""

    def __init__(self, bias: bool, scale_first: bool) -> None:
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(8, n, bias=bias) for n in (8, 4, 4))
        self.scale_first = scale_first

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.scale_first:
            hidden_states.mul_(2)
        q, k, v = self.q_proj(hidden_states), self.k_proj(hidden_states), self.v_proj(hidden_states)
        return torch.cat([q, k * 3, v * 5], -1)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("scale_first", [False, True])
def test_a_changed_input_is_projected_as_changed(bias, scale_first, stash_hits):
    """The joined outputs are of the input the pre-hook saw: an in-place change since then makes each
    projection compute itself on the changed tensor (the version check)."""
    torch.manual_seed(0)
    ref = _Attn(bias, scale_first)
    att = copy.deepcopy(ref)
    assert qp.join_qkv(att) == 1
    x = torch.randn(3, 8)
    torch.testing.assert_close(att(x.clone()), ref(x.clone()))
    assert stash_hits == ({"joined": 0, "own": 3} if scale_first else {"joined": 3, "own": 0})


def test_lora_wrapped_or_mismatched_projections_are_left_alone():
    torch.manual_seed(0)
    att = _Attn(True, False)
    att.k_proj = nn.Sequential(att.k_proj)  # a wrapper, as LoRA's is: not exactly nn.Linear
    assert qp.join_qkv(att) == 0
    att = _Attn(True, False)
    att.v_proj = nn.Linear(8, 4, bias=False)  # bias on q and k only
    assert qp.join_qkv(att) == 0
