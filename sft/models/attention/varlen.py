"""Varlen (packed, padding-free) causal attention, registered with transformers' attention registry.

The trainer packs a micro-batch into one row with per-sample `position_ids` and passes
`cu_seq_lens_q/k` and `max_length_q/k` to the model's forward; the function registered here
under `ATTN_NAME` attends within each sample only (on CUDA the kernel `model.attn_kernel` chose, see
sft/models/attention/kernels.py; on CPU a per-sample SDPA reference) and hands over to Ulysses when an `sp_group` kwarg is given.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from sft.models.attention.kernels import KERNELS, choose_attn_kernel, installed, run_kernel
from sft.models.attention.reference import AttnFeatures, features_from_kwargs, kernel_window, segment_attention
from sft.parallel.ulysses import local_heads, ulysses_attention

ATTN_NAME = "sft_varlen"

# The CUDA kernel chosen by `model.attn_kernel` (sft/models/attention/kernels.py), set when the model is built;
# None until then: direct calls take `auto`.
_kernel: str | None = None


def set_attn_kernel(name: str | None) -> None:
    """Use kernel `name` (a key of sft.models.attention.kernels.KERNELS) for CUDA calls from now on."""
    global _kernel
    _kernel = name


_KERNEL_DTYPES = (torch.float16, torch.bfloat16)


def _reference_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    scale: float,
    features: AttnFeatures | None = None,
) -> torch.Tensor:
    """Causal SDPA per segment: correct everywhere, used on CPU and for dtypes the kernels lack."""
    total, heads, _ = q.shape
    bounds = cu_seqlens.tolist()
    if bounds[0] != 0 or bounds[-1] != total or any(nxt < cur for cur, nxt in zip(bounds[:-1], bounds[1:])):
        raise ValueError(f"cu_seq_lens {bounds} must rise from 0 to the packed length {total}")
    longest = max(b - a for a, b in zip(bounds[:-1], bounds[1:]))
    if features is not None and not features.plain(longest):
        return segment_attention(q, k, v, bounds, scale, features)  # window / soft-cap / sinks, fp32 softmax
    rep = heads // k.shape[1]
    # GQA: query head i reads KV head i // rep, which is what repeat_interleave lays out.
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    outs = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end == start:
            continue
        # [n, h, d] -> [h, n, d] -> SDPA -> [n, h, d]
        qs, ks, vs = (t[start:end].transpose(0, 1) for t in (q, k, v))
        outs.append(F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale).transpose(0, 1))
    return torch.cat(outs, dim=0)


def equal_width_call(kernel: Callable[..., torch.Tensor], q, k, v, *args) -> torch.Tensor:
    """Run `kernel(q, k, v, *args)`, which needs one head width for q, k and v, on MLA-style inputs too.

    DeepSeek-style MLA has q/k heads of width d_qk (nope + rope part) and value heads of width d_v < d_qk.
    Zero columns appended to v come out as zero columns of the output (softmax(qk) @ [v, 0] = [out, 0]),
    and zero columns appended to q and k add nothing to any score (the scale is passed, not derived), so
    padding the narrower side and slicing the output is exact, forward and backward.
    """
    d_qk, d_v = q.shape[-1], v.shape[-1]
    if d_qk == d_v:
        return kernel(q, k, v, *args)
    if d_v < d_qk:
        return kernel(q, k, F.pad(v, (0, d_qk - d_v)), *args)[..., :d_v]  # [T, h, d_qk] -> [T, h, d_v]
    return kernel(F.pad(q, (0, d_v - d_qk)), F.pad(k, (0, d_v - d_qk)), v, *args)


def _with_image_blocks(kernel, out, q, k, v, scale: float, f: AttnFeatures) -> torch.Tensor:
    """`out` with the image-block queries' rows recomputed: each block's queries attend, not causally, to their
    sample's keys through the block's end (sft/models/attention/image_blocks.py), within the window if any."""
    b = f.blocks
    # Each block's queries end where its keys end, so the kernel's end alignment puts query i at key i: a left
    # window of W-1 keeps keys j > i - W, and nothing bounds the right (the keys stop at the block's end).
    left = kernel_window(f.window, b.max_k)[0]
    q_img = q.index_select(0, b.rows)  # [Q, h, d]
    k_img, v_img = k.index_select(0, b.keys), v.index_select(0, b.keys)  # [K, h_kv, d]
    o_img = kernel(q_img, k_img, v_img, b.cu_q, b.cu_k, b.max_q, b.max_k, scale, (left, -1), f.softcap)
    return out.index_copy(0, b.rows, o_img.to(out.dtype))


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_length_q: int,
    max_length_k: int,
    scale: float,
    features: AttnFeatures | None = None,
) -> torch.Tensor:
    """Causal attention within each packed segment: q/k `[T, h(_kv), d]`, v `[T, h_kv, d_v]` -> `[T, h, d_v]`.

    On CUDA in half precision, the kernel of `model.attn_kernel` (sft/models/attention/kernels.py) computes
    causal attention, windows and, where that kernel can, soft-capping; sinks, what the kernel
    lacks, and everything else take the exact per-segment reference. A value width other than the
    query/key width (MLA) reaches the kernels padded to one width (`equal_width_call`).
    """
    assert q.shape[1] % k.shape[1] == 0, f"{q.shape[1]} query heads vs {k.shape[1]} KV heads"
    assert q.shape[-1] == k.shape[-1], f"query width {q.shape[-1]} vs key width {k.shape[-1]}"
    f = features or AttnFeatures()
    if q.is_cuda and q.dtype in _KERNEL_DTYPES and f.sinks is None:
        if _kernel is None:  # a direct call, not through a built model: `auto`, chosen once
            set_attn_kernel(choose_attn_kernel("auto", q.device))
        name = _kernel
        if f.softcap is None or KERNELS[name].softcap:
            kernel = functools.partial(equal_width_call, functools.partial(run_kernel, name))
            window = kernel_window(f.window, max_length_k)
            out = kernel(q, k, v, cu_seqlens_q, cu_seqlens_k, max_length_q, max_length_k, scale, window, f.softcap)
            if f.blocks is not None:
                # The blocks' call runs on PyTorch's own kernel where it is there: its non-causal windows are the
                # ones checked against the reference on a GPU (tests/test_gpu.py); FA2/FA4 were not installed there.
                # It has no soft-capping: with one, the chosen kernel computes it.
                block_kernel = "torch" if installed("torch") and f.softcap is None else name
                block_call = functools.partial(equal_width_call, functools.partial(run_kernel, block_kernel))
                out = _with_image_blocks(block_call, out, q, k, v, scale, f)
            return out
    if not torch.equal(cu_seqlens_q, cu_seqlens_k):
        raise ValueError(f"{ATTN_NAME} is self-attention: cu_seq_lens_q and cu_seq_lens_k must be equal")
    return _reference_varlen(q, k, v, cu_seqlens_q, scale, f)


def _check_module(module: torch.nn.Module, dropout: float, kwargs: dict[str, Any]) -> None:
    """Refuse what this function would otherwise compute wrongly instead of silently ignoring it."""
    if dropout:
        raise ValueError(
            f"attention dropout {dropout} is not supported by the {ATTN_NAME} attention; set `attention_dropout` "
            "to 0.0 in the model's config.json (it only acts in training mode)"
        )
    # Sliding windows, soft-capping and sinks arrive as kwargs and are applied (sft/models/attention/reference.py).
    if getattr(module, "is_causal", True) is False or kwargs.get("is_causal") is False:
        raise NotImplementedError(f"{type(module).__name__} is not causal; {ATTN_NAME} is causal attention only")


def sft_varlen_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """The registered function: q/k `[b, h(_kv), s, d]`, v `[b, h_kv, s, d_v]` -> (`[b, s, h, d_v]`, None).

    Needs `cu_seq_lens_q/k` (int32 `[n+1]`, over the whole flattened `b*s` row, or over the full
    sequence-parallel row) and `max_length_q/k`. With `sp_group` (size > 1) each rank holds a
    contiguous `s/sp` slice, in group-rank order, and Ulysses gathers the sequence.
    """
    _check_module(module, dropout, kwargs)
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is None or kwargs.get("max_length_q") is None:
        raise ValueError(
            f"attn_implementation={ATTN_NAME!r} needs packed inputs: pass cu_seq_lens_q/k and max_length_q/k to the "
            "model's forward (a padded batch with only an attention_mask cannot be attended this way)"
        )
    if attention_mask is not None:
        raise ValueError(f"{ATTN_NAME} got a dense attention_mask; packed rows are delimited by cu_seq_lens only")
    cu_k = cu_q if cu_k is None else cu_k
    max_q = int(kwargs["max_length_q"])
    max_k = int(kwargs.get("max_length_k") or max_q)
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    b, heads, s, d = query.shape
    d_v = value.shape[-1]  # MLA (DeepSeek-V3): the value heads are narrower than the query/key heads

    features = features_from_kwargs(kwargs)
    group: dist.ProcessGroup | None = kwargs.get("sp_group")

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        cu_q32, cu_k32 = (c.to(device=q.device, dtype=torch.int32) for c in (cu_q, cu_k))
        f = features
        if f.sinks is not None and q.shape[1] != f.sinks.shape[0]:
            f = f.with_sinks(f.sinks[local_heads(group, f.sinks.shape[0])])  # SP: this rank's heads only
        return varlen_attention(q, k, v, cu_q32, cu_k32, max_q, max_k, scale, f)

    # [b, h, s, d] -> [b*s, h, d]: tokens first, as the varlen kernels and the all-to-all want.
    q, k, v = (t.transpose(1, 2).reshape(b * s, t.shape[1], t.shape[-1]) for t in (query, key, value))
    if group is not None and dist.get_world_size(group) > 1:
        assert b == 1, f"sequence parallelism packs one row per micro-batch, got batch {b}"
        out = ulysses_attention(q, k, v, group, attend)  # [s/sp, h, d_v]
    else:
        out = attend(q, k, v)  # [b*s, h, d_v]
    return out.reshape(b, s, heads, d_v), None


def _no_dense_mask(*args: Any, **kwargs: Any) -> None:
    """Packed rows are delimited by cu_seq_lens, so no `[b, 1, s, s]` mask is ever built."""
    return None


def register_varlen_attention() -> str:
    """Register the attention and (empty) mask functions under `ATTN_NAME`; idempotent. Returns the name."""
    AttentionInterface.register(ATTN_NAME, sft_varlen_attention_forward)
    AttentionMaskInterface.register(ATTN_NAME, _no_dense_mask)
    return ATTN_NAME
