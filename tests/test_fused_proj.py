"""sft/fused_proj.py: q, k and v from one GEMM give what the model's own three projections give.

Every family of sft/families.py is built tiny from its config class and run twice in fp32, with and
without the fusion: logits and every parameter gradient must agree, and every projection must have
used its slice (a silent fall-back would be correct but slower). The end-to-end family tests
(tests/test_families.py) train through it too: remove-padding turns it on."""

from __future__ import annotations

import copy

import pytest
import torch
from family_models import COMMON, EXTRA, FAMILY_TYPES
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

import sft.fused_proj as fp

# Families whose attention has no separate q/k/v projections (Phi-3 has one qkv_proj already).
NO_QKV = {"phi3"}


def _tiny(model_type: str) -> nn.Module:
    cfg = AutoConfig.for_model(model_type, **dict(COMMON, **EXTRA[model_type]), vocab_size=64, pad_token_id=0)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)  # MoE experts' grouped GEMM has no fp64


@pytest.fixture
def slice_hits(monkeypatch):
    """Counts projections that returned their slice, and those that computed themselves."""
    hits = {"slice": 0, "own": 0}
    forward = fp._SliceLinear.forward

    def counted(self, x):
        stash = self.__dict__.get("_sft_slice")
        hits["slice" if stash is not None and stash[0] is x and stash[1] == x._version else "own"] += 1
        return forward(self, x)

    monkeypatch.setattr(fp._SliceLinear, "forward", counted)
    return hits


@pytest.mark.parametrize("model_type", FAMILY_TYPES)
def test_fused_qkv_matches_each_family(model_type, slice_hits):
    ref = _tiny(model_type)
    lm = copy.deepcopy(ref)
    names = [n for n, _ in lm.named_parameters()]
    layers = lm.config.num_hidden_layers
    assert fp.fuse_qkv(lm) == (0 if model_type in NO_QKV else layers)
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
    for n in want_g:
        torch.testing.assert_close(got_g[n], want_g[n], rtol=1e-4, atol=1e-5, msg=n)
    assert slice_hits == {"slice": 0 if model_type in NO_QKV else 3 * layers, "own": 0}


class _Attn(nn.Module):
    """An attention-like module that may change its input in place before projecting it."""

    def __init__(self, bias: bool, scale_first: bool) -> None:
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(8, 8, bias=bias), nn.Linear(8, 4, bias=bias), nn.Linear(8, 4, bias=bias)
        self.scale_first = scale_first

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.scale_first:
            hidden_states.mul_(2)
        q, k, v = self.q_proj(hidden_states), self.k_proj(hidden_states), self.v_proj(hidden_states)
        return torch.cat([q, k * 3, v * 5], -1)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("scale_first", [False, True])
def test_a_changed_input_is_projected_as_changed(bias, scale_first, slice_hits):
    """The slices are of the input the pre-hook saw: an in-place change since then makes each projection
    compute itself on the changed tensor (the version check)."""
    torch.manual_seed(0)
    ref = _Attn(bias, scale_first)
    att = copy.deepcopy(ref)
    assert fp.fuse_qkv(att) == 1
    x = torch.randn(3, 8)
    torch.testing.assert_close(att(x.clone()), ref(x.clone()))
    assert slice_hits == ({"slice": 0, "own": 3} if scale_first else {"slice": 3, "own": 0})


def test_lora_wrapped_or_mismatched_projections_are_left_alone():
    torch.manual_seed(0)
    att = _Attn(True, False)
    att.k_proj = nn.Sequential(att.k_proj)  # a wrapper, as LoRA's is: not exactly nn.Linear
    assert fp.fuse_qkv(att) == 0
    att = _Attn(True, False)
    att.v_proj = nn.Linear(8, 4, bias=False)  # bias on q and k only
    assert fp.fuse_qkv(att) == 0
