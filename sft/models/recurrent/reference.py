"""Exact torch references of the two recurrences, run sample by sample: the CPU path and what CI tests.

Gated delta rule (Gated DeltaNet; Qwen3.5, Qwen3-Next), per head with state S `[dk, dv]`:
    S_t = a_t S_{t-1} + k_t (beta_t (v_t - a_t S_{t-1}^T k_t))^T,  o_t = S_t^T q_t,  a_t = exp(g_t),
with q and k L2-normalised and q scaled by dk^-1/2. Mamba-2's SSD (Nemotron-H, Granite 4, Falcon-H1), per
head with state h `[N, P]`:  h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_t^T,  y_t = C_t^T h_t + D x_t.
Both start every sample from a zero state and are computed in chunks (a closed form inside a chunk, the
state carried between chunks), in fp32 as transformers' own torch paths do.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

GDN_CHUNK = 64  # the chunk of flash-linear-attention's kernels and of transformers' torch path


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x / sqrt(sum x^2 + eps) over the last dim, as flash-linear-attention and transformers normalise q, k."""
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)


def _chunks(length: int, chunk: int) -> list[tuple[int, int]]:
    return [(a, min(a + chunk, length)) for a in range(0, length, chunk)]


def _decay(g_cum: torch.Tensor) -> torch.Tensor:
    """`[H, C]` cumulative log decays -> `[H, C, C]` exp(G_i - G_j) for j <= i, 0 above the diagonal."""
    n = g_cum.shape[-1]
    causal = torch.ones(n, n, dtype=torch.bool, device=g_cum.device).tril()
    diff = g_cum[:, :, None] - g_cum[:, None, :]
    return diff.masked_fill(~causal, float("-inf")).exp()


def _gated_delta_sample(q, k, v, g, beta, chunk: int) -> torch.Tensor:
    """One sample: q, k `[H, L, dk]`, v `[H, L, dv]`, g, beta `[H, L]` (fp32, q already scaled) -> `[H, L, dv]`."""
    h, length, dk = k.shape
    state = k.new_zeros(h, dk, v.shape[-1])
    eye = torch.eye(min(chunk, length), dtype=k.dtype, device=k.device)
    outs = []
    for a, b in _chunks(length, chunk):
        qc, kc, vc, bc = q[:, a:b], k[:, a:b], v[:, a:b], beta[:, a:b]
        g_cum = g[:, a:b].cumsum(-1)  # [H, C]
        decay = _decay(g_cum)  # [H, C, C]
        n = b - a
        # Within the chunk the corrections u_j = beta_j (v_j - S'_j^T k_j) solve (I + M) U = R, M strictly lower:
        # M[j, m] = beta_j exp(G_j - G_m) k_j.k_m, R_j = beta_j v_j - beta_j exp(G_j) S0^T k_j.
        m = (bc[:, :, None] * (kc @ kc.transpose(1, 2)) * decay).tril(-1)
        r = bc[..., None] * vc - (bc * g_cum.exp())[..., None] * (kc @ state)
        u = torch.linalg.solve_triangular(eye[:n, :n] + m, r, upper=False, unitriangular=True)  # [H, C, dv]
        # o_i = exp(G_i) S0^T q_i + sum_{j<=i} exp(G_i - G_j) (q_i.k_j) u_j
        outs.append(g_cum.exp()[..., None] * (qc @ state) + ((qc @ kc.transpose(1, 2)) * decay) @ u)
        last = g_cum[:, -1:]  # [H, 1]
        state = last.exp()[..., None] * state + (kc * (last - g_cum).exp()[..., None]).transpose(1, 2) @ u
    return torch.cat(outs, dim=1)


def gated_delta_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    bounds: list[int],
    chunk: int = GDN_CHUNK,
) -> torch.Tensor:
    """q, k `[T, Hk, dk]`, v `[T, H, dv]`, g (log decay), beta `[T, H]` -> `[T, H, dv]` in v's dtype.

    Value head i reads key head i // (H / Hk) (grouped value heads). The state restarts at each of `bounds`.
    """
    heads, dtype = v.shape[1], v.dtype
    rep = heads // k.shape[1]
    q, k = (x.float().repeat_interleave(rep, dim=1) for x in (q, k))
    q, k = l2norm(q) * q.shape[-1] ** -0.5, l2norm(k)
    # [T, H, d] -> [H, T, d]
    q, k, v = (x.transpose(0, 1) for x in (q, k, v.float()))
    g, beta = (x.float().t() for x in (g, beta))
    outs = [
        _gated_delta_sample(q[:, a:b], k[:, a:b], v[:, a:b], g[:, a:b], beta[:, a:b], chunk)
        for a, b in zip(bounds[:-1], bounds[1:])
        if b > a
    ]
    return torch.cat(outs, dim=1).transpose(0, 1).to(dtype)


def _ssd_sample(x, dt, a_log, b, c, chunk: int) -> torch.Tensor:
    """One sample: x `[H, L, P]`, dt and a_log = dt*A `[H, L]`, b, c `[H, L, N]` (fp32) -> `[H, L, P]` (no D)."""
    state = x.new_zeros(x.shape[0], b.shape[-1], x.shape[-1])  # [H, N, P]
    outs = []
    for s, e in _chunks(x.shape[1], chunk):
        xc = x[:, s:e] * dt[:, s:e, None]  # dt_j x_j
        bc, cc = b[:, s:e], c[:, s:e]
        g_cum = a_log[:, s:e].cumsum(-1)
        # y_i = exp(G_i) C_i^T h0 + sum_{j<=i} exp(G_i - G_j) (C_i.B_j) dt_j x_j
        outs.append(g_cum.exp()[..., None] * (cc @ state) + ((cc @ bc.transpose(1, 2)) * _decay(g_cum)) @ xc)
        last = g_cum[:, -1:]
        state = last.exp()[..., None] * state + (bc * (last - g_cum).exp()[..., None]).transpose(1, 2) @ xc
    return torch.cat(outs, dim=1)


def ssd_reference(
    x: torch.Tensor,
    dt: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    c: torch.Tensor,
    d: torch.Tensor,
    bounds: list[int],
    chunk: int,
) -> torch.Tensor:
    """x `[T, H, P]`, dt `[T, H]` (after bias, softplus and clamp), A `[H]` (negative), B, C `[T, G, N]`,
    D `[H]` -> y `[T, H, P]` in fp32. Head i reads group i // (H / G). The state restarts at each of `bounds`."""
    heads = x.shape[1]
    rep = heads // b.shape[1]
    x32 = x.float()
    # [T, H, d] -> [H, T, d]
    xs, bs, cs = (
        t.transpose(0, 1) for t in (x32, b.float().repeat_interleave(rep, 1), c.float().repeat_interleave(rep, 1))
    )
    dts = dt.float().t()
    a_log = dts * a.float()[:, None]
    outs = [
        _ssd_sample(xs[:, s:e], dts[:, s:e], a_log[:, s:e], bs[:, s:e], cs[:, s:e], chunk)
        for s, e in zip(bounds[:-1], bounds[1:])
        if e > s
    ]
    return torch.cat(outs, dim=1).transpose(0, 1) + d.float()[:, None] * x32


def dt_softplus(dt: torch.Tensor, bias: torch.Tensor, limit: tuple[float, float]) -> torch.Tensor:
    """Mamba-2's time step: softplus(dt + dt_bias) clamped to `time_step_limit`, in dt's dtype (as transformers)."""
    return torch.clamp(F.softplus(dt + bias.to(dt.dtype)), min=limit[0], max=limit[1])
