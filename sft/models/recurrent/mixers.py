"""The packed forward of each recurrent mixer kind: Gated DeltaNet, Mamba-2 and the short convolution.

Each replaces the HF module's forward on a packed row (`[1, T/sp, hidden]`, boundaries in `cu_seq_lens_q`)
and reuses the module's own projections (LoRA-wrapped or not), norms and parameters. The per-token
projections run on this rank's slice of the row; under Ulysses SP an all-to-all then gives each rank the
whole sequence for its share of heads (`[t, n, d] -> [T, n/sp, d]`; B/C groups fewer than the ranks are
replicated, as KV heads are for attention), the convolution (this rank's channels, window zeroed at every
sample start) and the recurrence run on whole samples, and a second all-to-all brings the heads back.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from sft.models.recurrent.kernels import gated_delta_rule, ssd_scan
from sft.models.recurrent.packed import PackedRow, segment_conv1d
from sft.models.recurrent.reference import dt_softplus
from sft.parallel.ulysses import heads_to_seq, seq_to_heads


def sp_group(kwargs: dict) -> dist.ProcessGroup | None:
    group = kwargs.get("sp_group")
    return group if group is not None and dist.get_world_size(group) > 1 else None


def _share(n: int, group: dist.ProcessGroup | None) -> slice:
    """The heads (or groups) of n this rank holds after `_to_heads`: the r-th of sp equal parts, or, when
    there are fewer than the ranks, the one this rank's copy comes from."""
    if group is None:
        return slice(0, n)
    sp, r = dist.get_world_size(group), dist.get_rank(group)
    if n % sp == 0:
        return slice(r * n // sp, (r + 1) * n // sp)
    assert sp % n == 0, f"{n} heads or groups cannot be shared by {sp} ranks"
    i = r // (sp // n)
    return slice(i, i + 1)


def _to_heads(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """`[t, n, d]` (this rank's tokens, all heads) -> `[T, n/sp, d]` (all tokens, `_share(n)` of the heads)."""
    if group is None:
        return x
    sp, n = dist.get_world_size(group), x.shape[1]
    if n % sp:
        x = x.repeat_interleave(sp // n, dim=1)  # copy i of head j goes to rank j * (sp/n) + i
    return seq_to_heads(x.contiguous(), group)


def _to_seq(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """`[T, n/sp, d]` -> `[t, n, d]`."""
    return x if group is None else heads_to_seq(x.contiguous(), group)


def _conv_params(conv: nn.Conv1d, ranges: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The depthwise filters `[C', K]` (and bias) of the channel ranges this rank convolves."""
    weight = conv.weight[:, 0]  # [C, K]
    if ranges == [(0, weight.shape[0])]:
        return weight, conv.bias
    w = torch.cat([weight[a:b] for a, b in ranges])
    bias = None if conv.bias is None else torch.cat([conv.bias[a:b] for a, b in ranges])
    return w, bias


def _gdn_project(m: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """x `[t, hidden]` -> q, k `[t, Hk, dk]`, v, z `[t, H, dv]`, b, a `[t, H]` (before the convolution)."""
    t = x.shape[0]
    if hasattr(m, "in_proj_qkvz"):  # Qwen3-Next: q, k, v, z interleaved per key head; b, a per key head
        q, k, v, z, b, a = m.fix_query_key_value_ordering(m.in_proj_qkvz(x[None]), m.in_proj_ba(x[None]))
        return q[0], k[0], v[0], z[0], b[0], a[0]
    hk, hv = (t, m.num_k_heads, m.head_k_dim), (t, m.num_v_heads, m.head_v_dim)
    if hasattr(m, "q_proj"):  # OLMo Hybrid: one projection each, the output gate is g_proj
        return (
            m.q_proj(x).view(hk),
            m.k_proj(x).view(hk),
            m.v_proj(x).view(hv),
            m.g_proj(x).view(hv),
            m.b_proj(x),
            m.a_proj(x),
        )
    qkv = m.in_proj_qkv(x)  # Qwen3.5: q, k, v in one projection, z, b and a in their own
    q, k, v = qkv.split([m.key_dim, m.key_dim, m.value_dim], dim=-1)
    return q.view(hk), k.view(hk), v.view(hv), m.in_proj_z(x).view(hv), m.in_proj_b(x), m.in_proj_a(x)


def gated_delta_forward(m: nn.Module, hidden: torch.Tensor, row: PackedRow, group) -> torch.Tensor:
    """Gated DeltaNet (Qwen3.5, Qwen3-Next, OLMo Hybrid) on a packed row: `[1, t, hidden]` -> `[1, t, hidden]`."""
    x = hidden[0]
    t = x.shape[0]
    dk, dv = m.head_k_dim, m.head_v_dim
    q, k, v, z, b, a = _gdn_project(m, x)
    # Two all-to-alls: per key head (q, k) and per value head (v and the raw gate inputs b, a).
    qk = _to_heads(torch.cat([q, k], dim=-1), group)  # [T, Hk/sp, 2dk]
    vba = _to_heads(torch.cat([v, b[..., None], a[..., None]], dim=-1), group)  # [T, H/sp, dv+2]
    kh, vh = _share(m.num_k_heads, group), _share(m.num_v_heads, group)
    n = qk.shape[0]
    # The convolution's channels are [q | k | v], head-major in each part.
    w, bias = _conv_params(
        m.conv1d,
        [
            (kh.start * dk, kh.stop * dk),
            (m.key_dim + kh.start * dk, m.key_dim + kh.stop * dk),
            (2 * m.key_dim + vh.start * dv, 2 * m.key_dim + vh.stop * dv),
        ],
    )
    mixed = torch.cat([qk[..., :dk].reshape(n, -1), qk[..., dk:].reshape(n, -1), vba[..., :dv].reshape(n, -1)], -1)
    mixed = segment_conv1d(mixed, w, bias, row, ACT2FN[m.activation]).to(hidden.dtype)
    qk_width = (kh.stop - kh.start) * dk
    q, k, v = mixed.split([qk_width, qk_width, (vh.stop - vh.start) * dv], dim=-1)
    q, k, v = q.view(n, -1, dk), k.view(n, -1, dk), v.view(n, -1, dv)
    beta = vba[..., dv].sigmoid()
    if getattr(m, "allow_neg_eigval", False):  # OLMo Hybrid's option: beta in [0, 2], as its own forward scales it
        beta = beta * 2.0
    g = -m.A_log[vh].float().exp() * F.softplus(vba[..., dv + 1].float() + m.dt_bias[vh])
    out = _to_seq(gated_delta_rule(q, k, v, g, beta, row), group)  # [T, H/sp, dv] -> [t, H, dv]
    norm, out_proj = (m.o_norm, m.o_proj) if hasattr(m, "o_proj") else (m.norm, m.out_proj)
    out = norm(out.reshape(-1, dv), z.reshape(-1, dv)).reshape(1, t, -1)
    return out_proj(out)


def short_conv_forward(m: nn.Module, hidden: torch.Tensor, row: PackedRow, group) -> torch.Tensor:
    """LFM2's gated short convolution on a packed row: out_proj(C * conv(B * x))."""
    bcx = m.in_proj(hidden[0])  # [t, 3h]
    b, c, x = bcx.chunk(3, dim=-1)
    h = x.shape[-1]
    bx = _to_heads((b * x)[..., None], group)[..., 0]  # channels as heads of width 1: [T, h/sp]
    ch = _share(h, group)
    w, bias = _conv_params(m.conv, [(ch.start, ch.stop)])
    y = segment_conv1d(bx, w, bias, row).to(hidden.dtype)
    y = _to_seq(y[..., None], group)[..., 0]  # [t, h]
    return m.out_proj((c * y)[None])


def mamba2_forward(m: nn.Module, hidden: torch.Tensor, row: PackedRow, group) -> torch.Tensor:
    """Mamba-2 (Nemotron-H, Granite 4 hybrids, Falcon-H1) on a packed row, gated norm and out_proj included."""
    x_in = hidden[0]
    t, dtype = x_in.shape[0], hidden.dtype
    if getattr(m, "ssm_in_multiplier", None) is not None:  # Falcon-H1's muP multipliers
        x_in = x_in * m.ssm_in_multiplier
    proj = m.in_proj(x_in)
    if getattr(m, "mup_vector", None) is not None:
        proj = proj * m.mup_vector.reshape(-1)
    heads, groups, p, ns = m.num_heads, m.n_groups, m.head_dim, m.ssm_state_size
    inner = m.intermediate_size
    gate, xbc, dt = proj.split([inner, m.conv_dim, heads], dim=-1)
    xs, bs, cs = xbc.split([inner, groups * ns, groups * ns], dim=-1)
    xdt = _to_heads(torch.cat([xs.view(t, heads, p), dt[..., None]], dim=-1), group)  # [T, H/sp, P+1]
    bc = _to_heads(torch.cat([bs.view(t, groups, ns), cs.view(t, groups, ns)], dim=-1), group)  # [T, G', 2N]
    hh, gg = _share(heads, group), _share(groups, group)
    n = xdt.shape[0]
    # The convolution's channels are [x | B | C].
    w, bias = _conv_params(
        m.conv1d,
        [
            (hh.start * p, hh.stop * p),
            (inner + gg.start * ns, inner + gg.stop * ns),
            (inner + (groups + gg.start) * ns, inner + (groups + gg.stop) * ns),
        ],
    )
    mixed = torch.cat([xdt[..., :p].reshape(n, -1), bc[..., :ns].reshape(n, -1), bc[..., ns:].reshape(n, -1)], -1)
    mixed = segment_conv1d(mixed, w, bias, row, m.act).to(dtype)
    g_local = gg.stop - gg.start
    x, b, c = mixed.split([(hh.stop - hh.start) * p, g_local * ns, g_local * ns], dim=-1)
    dt = dt_softplus(xdt[..., p], m.dt_bias[hh], m.time_step_limit)
    a = -torch.exp(m.A_log[hh].float())
    y = ssd_scan(x.view(n, -1, p), dt, a, b.view(n, -1, ns), c.view(n, -1, ns), m.D[hh], row, m.chunk_size)
    y = _to_seq(y.to(dtype), group).reshape(1, t, inner)  # [T, H/sp, P] -> [t, H, P]
    if getattr(m, "mamba_rms_norm", True):
        y = m.norm(y, gate[None])
    else:  # Falcon-H1 without the gated norm
        y = y * F.silu(gate[None])
    return m.out_proj(y.to(dtype))


FORWARDS = {"gated_delta": gated_delta_forward, "short_conv": short_conv_forward, "mamba2": mamba2_forward}
