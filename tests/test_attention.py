"""Varlen attention through transformers' registry: packed ≡ per-sample, no attention across samples."""

from __future__ import annotations

import copy

import pytest
import torch
from attn_workers import packed_row
from transformers import AttentionInterface, AutoModelForCausalLM
from transformers.masking_utils import AttentionMaskInterface

from sft.demo.assets import build_model_config
from sft.models.attention.reference import AttnFeatures
from sft.models.attention.varlen import (
    ATTN_NAME,
    equal_width_call,
    register_varlen_attention,
    sft_varlen_attention_forward,
    varlen_attention,
)

LENGTHS = [6, 11, 4]


@pytest.fixture(scope="module")
def model_config(demo_tokenizer):
    register_varlen_attention()
    return build_model_config(demo_tokenizer)  # 4 query heads, 2 KV heads, head_dim 16


@pytest.fixture(scope="module")
def models(model_config):
    """(varlen model, sdpa model) with the same random weights, fp32, eval mode."""
    torch.manual_seed(0)
    # from_config writes attn_implementation into the config object it is given and the model keeps
    # that object: a shared config would switch the first model to the second one's attention.
    varlen = AutoModelForCausalLM.from_config(copy.deepcopy(model_config), attn_implementation=ATTN_NAME)
    sdpa = AutoModelForCausalLM.from_config(copy.deepcopy(model_config), attn_implementation="sdpa")
    sdpa.load_state_dict(varlen.state_dict())
    assert varlen.config._attn_implementation == ATTN_NAME and sdpa.config._attn_implementation == "sdpa"
    return varlen.eval(), sdpa.eval()


def _packed_logits(model, ids: torch.Tensor) -> torch.Tensor:
    pos, cu, max_len = packed_row(LENGTHS)
    kw = dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max_len, max_length_k=max_len)
    return model(input_ids=ids, position_ids=pos[None], **kw).logits  # [1, T, V]


def test_registration_is_idempotent():
    assert register_varlen_attention() == ATTN_NAME == register_varlen_attention()
    assert AttentionInterface()[ATTN_NAME] is sft_varlen_attention_forward
    mask = AttentionMaskInterface()[ATTN_NAME](batch_size=1, q_length=8, kv_length=8, attention_mask=None)
    assert mask is None


def test_packed_model_matches_each_sample_alone(models, model_config):
    varlen, sdpa = models
    ids = torch.randint(0, model_config.vocab_size, (1, sum(LENGTHS)), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        packed = _packed_logits(varlen, ids)
        start = 0
        for n in LENGTHS:
            alone = sdpa(input_ids=ids[:, start : start + n]).logits  # default positions 0..n-1, causal
            torch.testing.assert_close(packed[:, start : start + n], alone, atol=1e-5, rtol=1e-5)
            start += n


def test_samples_do_not_attend_across_boundaries(models, model_config):
    varlen, _ = models
    ids = torch.randint(0, model_config.vocab_size, (1, sum(LENGTHS)), generator=torch.Generator().manual_seed(2))
    changed = ids.clone()
    a = LENGTHS[0]
    changed[:, :a] = (changed[:, :a] + 1) % model_config.vocab_size  # rewrite sample 1 only
    with torch.no_grad():
        before, after = _packed_logits(varlen, ids), _packed_logits(varlen, changed)
    assert not torch.allclose(before[:, :a], after[:, :a])  # the edit is visible where it should be
    torch.testing.assert_close(after[:, a:], before[:, a:], atol=1e-6, rtol=0)  # samples 2 and 3


def _math_reference(q, k, v, lengths, scale):
    """Explicit softmax(QK^T) V per segment with a causal mask; q [1, h, T, d], k/v [1, h_kv, T, d]."""
    rep = q.shape[1] // k.shape[1]
    outs, start = [], 0
    for n in lengths:
        qs, ks, vs = q[0, :, start : start + n], k[0, :, start : start + n], v[0, :, start : start + n]
        ks, vs = ks.repeat_interleave(rep, 0), vs.repeat_interleave(rep, 0)
        scores = (qs @ ks.transpose(1, 2)) * scale  # [h, n, n]
        scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
        outs.append((scores.softmax(-1) @ vs).transpose(0, 1))  # [n, h, d]
        start += n
    return torch.cat(outs)[None]  # [1, T, h, d]


def test_direct_call_matches_math_reference_forward_and_backward():
    pos, cu, max_len = packed_row(LENGTHS)
    total, scale, gen = int(cu[-1]), 0.3, torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, h, total, 16, generator=gen) for h in (4, 2, 2))  # [b, heads, s, d] as HF passes
    weight = torch.randn(1, total, 4, 16, generator=gen)
    ours = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = [t.clone().requires_grad_() for t in (q, k, v)]
    kw = dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max_len, max_length_k=max_len, position_ids=pos[None])
    out, weights = sft_varlen_attention_forward(torch.nn.Module(), *ours, None, scaling=scale, dropout=0.0, **kw)
    expected = _math_reference(*ref, LENGTHS, scale)
    assert weights is None and out.shape == (1, total, 4, 16)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    (out * weight).sum().backward()
    (expected * weight).sum().backward()
    for name, a, b in zip("qkv", ours, ref):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-5, msg=lambda m, n=name: f"d{n}: {m}")


@pytest.mark.parametrize("d_qk,d_v", [(12, 6), (6, 12)])
def test_value_width_other_than_query_width(d_qk, d_v):
    """MLA (DeepSeek-V3): q/k heads of one width, v heads of another. The registered function (per-segment path)
    and the padding that lets equal-width kernels take it (`equal_width_call`, here around the per-segment path
    standing in for a kernel that asserts equal widths) match the math reference, forward and backward."""
    pos, cu, max_len = packed_row(LENGTHS)
    total, scale, gen = int(cu[-1]), 0.3, torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, h, total, d, generator=gen) for h, d in ((4, d_qk), (2, d_qk), (2, d_v)))
    weight = torch.randn(1, total, 4, d_v, generator=gen)
    kw = dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max_len, max_length_k=max_len)

    def equal_widths_only(q, k, v, cu, scale):
        assert q.shape[-1] == k.shape[-1] == v.shape[-1]
        return varlen_attention(q, k, v, cu, cu, max_len, max_len, scale)

    def registered(q, k, v):
        return sft_varlen_attention_forward(torch.nn.Module(), q, k, v, None, scaling=scale, **kw)[0]

    def padded(q, k, v):  # [1, h, T, d] -> [T, h, d] -> [1, T, h, d_v]
        flat = [t[0].transpose(0, 1) for t in (q, k, v)]
        return equal_width_call(equal_widths_only, *flat, cu, scale)[None]

    ref = [t.clone().requires_grad_() for t in (q, k, v)]
    expected = _math_reference(*ref, LENGTHS, scale)
    (expected * weight).sum().backward()
    for run in (registered, padded):
        ours = [t.clone().requires_grad_() for t in (q, k, v)]
        out = run(*ours)
        assert out.shape == (1, total, 4, d_v)
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
        (out * weight).sum().backward()
        for name, a, b in zip("qkv", ours, ref):
            torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-5, msg=lambda m, n=name: f"d{n}: {m}")


def _call(module=None, dropout=0.0, **extra):
    _, cu, max_len = packed_row(LENGTHS)
    q, k = torch.randn(1, 4, int(cu[-1]), 8), torch.randn(1, 2, int(cu[-1]), 8)
    kw = dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max_len, max_length_k=max_len) | extra
    return sft_varlen_attention_forward(module or torch.nn.Module(), q, k, k, None, dropout=dropout, **kw)


def test_refuses_what_it_cannot_compute(models, model_config):
    with pytest.raises(ValueError, match="attention_dropout"):
        _call(dropout=0.1)
    # A sliding window is applied, not refused: a window of 1 attends to the token itself only.
    _, cu, max_len = packed_row(LENGTHS)
    q, k = torch.randn(1, 4, int(cu[-1]), 8), torch.randn(1, 2, int(cu[-1]), 8)
    kw = dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max_len, max_length_k=max_len, sliding_window=1)
    out, _ = sft_varlen_attention_forward(torch.nn.Module(), q, k, k, None, **kw)
    torch.testing.assert_close(out[0], k[0].repeat_interleave(2, dim=0).transpose(0, 1))
    with pytest.raises(ValueError, match="must rise from 0 to the packed length"):
        _call(cu_seq_lens_q=torch.tensor([0, 5, 9], dtype=torch.int32), cu_seq_lens_k=None)
    ids = torch.zeros(1, 5, dtype=torch.long)
    with pytest.raises(ValueError, match="cu_seq_lens_q"):  # a padded-mode call, e.g. from validation
        models[0](input_ids=ids, attention_mask=torch.ones_like(ids))


@pytest.fixture
def cuda_kernel(request):
    """Run the test's CUDA attention calls on kernel `request.param` (skipped where it cannot run)."""
    from sft.models.attention import varlen as attention
    from sft.models.attention.kernels import why_not

    reason = why_not(request.param, torch.cuda.get_device_capability()[0])
    if reason is not None:
        pytest.skip(reason)
    before = attention._kernel
    attention.set_attn_kernel(request.param)
    yield request.param
    attention.set_attn_kernel(before)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("cuda_kernel", ["fa4", "flash_attn", "torch"], indirect=True)
@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), [(4, 2, 64), (4, 4, 64), (8, 1, 128), (12, 2, 128)])
@pytest.mark.parametrize("feature", ["causal", "window", "softcap"])
def test_cuda_kernel_matches_fp32_reference(cuda_kernel, heads, kv_heads, head_dim, feature):
    """Each kernel in bf16 against the exact fp32 per-segment path, forward and backward; a kernel
    without soft-capping hands it to the exact path (so that case checks the hand-over)."""
    lengths = [100, 37, 256, 1, 90, 700]
    _, cu, max_len = packed_row(lengths)
    cu, total, gen = cu.cuda(), sum(lengths), torch.Generator(device="cuda").manual_seed(4)
    q, k, v = (torch.randn(total, h, head_dim, device="cuda", generator=gen) for h in (heads, kv_heads, kv_heads))
    weight = torch.randn(total, heads, head_dim, device="cuda", generator=gen)
    features = {"causal": AttnFeatures(), "window": AttnFeatures(window=64), "softcap": AttnFeatures(softcap=5.0)}[
        feature
    ]
    fast = [t.bfloat16().requires_grad_() for t in (q, k, v)]
    ref = [t.bfloat16().float().requires_grad_() for t in (q, k, v)]
    out = varlen_attention(*fast, cu, cu, max_len, max_len, 0.125, features)
    expected = varlen_attention(*ref, cu, cu, max_len, max_len, 0.125, features)
    torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=2e-2)
    (out.float() * weight).sum().backward()
    (expected * weight).sum().backward()
    for name, a, b in zip("qkv", fast, ref):
        torch.testing.assert_close(a.grad.float(), b.grad, atol=5e-2, rtol=5e-2, msg=lambda m, n=name: f"d{n}: {m}")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("cuda_kernel", ["fa4", "flash_attn", "torch"], indirect=True)
def test_cuda_kernel_mla_widths(cuda_kernel):
    """DeepSeek-V3's widths (q/k 192, v 128; 16 heads) through each kernel, v padded to 192 and the output sliced,
    against the exact fp32 per-segment path, forward and backward."""
    lengths = [100, 37, 256, 1, 90]
    _, cu, max_len = packed_row(lengths)
    cu, total, gen = cu.cuda(), sum(lengths), torch.Generator(device="cuda").manual_seed(6)
    q, k, v = (torch.randn(total, 16, d, device="cuda", generator=gen) for d in (192, 192, 128))
    weight = torch.randn(total, 16, 128, device="cuda", generator=gen)
    fast = [t.bfloat16().requires_grad_() for t in (q, k, v)]
    ref = [t.bfloat16().float().requires_grad_() for t in (q, k, v)]
    out = varlen_attention(*fast, cu, cu, max_len, max_len, 192**-0.5)
    expected = varlen_attention(*ref, cu, cu, max_len, max_len, 192**-0.5)
    assert out.shape == (total, 16, 128)
    torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=2e-2)
    (out.float() * weight).sum().backward()
    (expected * weight).sum().backward()
    for name, a, b in zip("qkv", fast, ref):
        torch.testing.assert_close(a.grad.float(), b.grad, atol=5e-2, rtol=5e-2, msg=lambda m, n=name: f"d{n}: {m}")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_bf16_packed_model_matches_each_sample_alone(models, model_config):
    varlen, sdpa = (copy.deepcopy(m).cuda().bfloat16() for m in models)
    ids = torch.randint(0, model_config.vocab_size, (1, sum(LENGTHS)), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        pos, cu, max_len = packed_row(LENGTHS)
        kw = dict(cu_seq_lens_q=cu.cuda(), cu_seq_lens_k=cu.cuda(), max_length_q=max_len, max_length_k=max_len)
        packed = varlen(input_ids=ids.cuda(), position_ids=pos[None].cuda(), **kw).logits.float()
        start = 0
        for n in LENGTHS:
            alone = sdpa(input_ids=ids[:, start : start + n].cuda()).logits.float()
            torch.testing.assert_close(packed[:, start : start + n], alone, atol=3e-2, rtol=3e-2)
            start += n
