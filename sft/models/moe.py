"""Mixture-of-experts: grouped-GEMM experts, the router's load-balancing loss, and routing metrics.

Aux loss definition (split-invariant). For each layer l and sample i, with E experts and top-k
routing, f_lie = k * c_lie / sum_e c_lie (c = tokens of sample i routed to expert e, detached) and
S_lie = sum over the sample's tokens of softmax(router logits)_e. The loss is

    aux = (E / (L * N)) * sum_l sum_i sum_e f_lie * S_lie

N = real (non-padding) tokens of the global batch: a token-weighted mean over samples of the Switch
balance loss E * sum_e f_ie * P_ie (k when perfectly balanced). The experts counted in c are the ones
the router chose (with a score-correction bias or group-limited routing, not the top-k of the logits);
P is the softmax of the router logits, or for sigmoid routers (DeepSeek-V3, GLM-4.5, MiniMax-M2) the
sigmoid normalised over the experts, as in DeepSeek-V3's sequence-wise balance loss. A sample never
spans micro-batches, and across sequence-parallel ranks the counts c are summed, so the value and
gradient do not depend on how the global batch is split. It is added to the loss times the config's
coefficient (`router_aux_loss_coef`; DeepSeek-V3's `aux_loss_alpha`: `MoESpec.coef_key`).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from sft.config.errors import either
from sft.config.schema import EXPERTS_IMPLEMENTATIONS
from sft.models.families import MoESpec, moe_spec, num_experts


def routing_inputs(real_mask: torch.Tensor, cu_seq_lens: torch.Tensor | None, sp_rank: int, sp_size: int) -> dict:
    """Host side: `sample_index` `[T_local]`, the sample id of each of this rank's tokens (padding gets the
    last id, a dump row), and `sample_rows`, the number of ids; the model's forward takes both.

    `real_mask` is 1 on this rank's real tokens: `[1, T/sp]` for a packed row, whose `cu_seq_lens` cover
    the whole row; `[b, s]` (the attention mask) for padded rows (`cu_seq_lens` None), one sample per row.
    """
    if cu_seq_lens is not None:
        cu = cu_seq_lens.long()
        ids = torch.repeat_interleave(torch.arange(len(cu) - 1), cu[1:] - cu[:-1])  # [T]
        t = ids.numel()
        ids = ids[sp_rank * t // sp_size : (sp_rank + 1) * t // sp_size]
        dump = len(cu) - 1
    else:
        b, s = real_mask.shape
        ids = torch.arange(b).repeat_interleave(s)
        dump = b
    real = real_mask.reshape(-1)
    return {"sample_index": torch.where(real.bool(), ids, torch.full_like(ids, dump)), "sample_rows": dump + 1}


class RouterStats:
    """Collects each forward's router logits by hooks and turns them into the aux loss and metrics.

    A plain object (not a submodule): it holds no parameters and no state worth saving. Expert
    parallelism would only change where counts are reduced: this reads the routers, never the experts.
    """

    def __init__(self, lm: nn.Module, spec: MoESpec, coef: float) -> None:
        cfg = lm.config.get_text_config()  # a multimodal checkpoint's routers are its text model's
        self.num_experts, self.top_k, self.coef = (
            num_experts(cfg, spec),
            int(getattr(cfg, spec.top_k_key)),
            coef,
        )
        self.scores = spec.scores
        routers = [m for m in lm.modules() if type(m).__name__.lower().endswith(spec.router_suffix)]
        if not routers:
            raise ValueError(
                f"{type(lm).__name__}: no router modules (class name ending in {spec.router_suffix!r}) found; "
                "this transformers version lays the MoE block out differently than sft expects"
            )
        self.num_layers = len(routers)
        self._logits: list[tuple[torch.Tensor, torch.Tensor | None]] = []
        for r in routers:
            r.register_forward_hook(self._record)
        self._aux: torch.Tensor | None = None
        self._counts: torch.Tensor | None = None

    def _record(self, module: nn.Module, args: tuple, output: tuple) -> None:
        # (scores or logits [T, E], the experts the router chose [T, k] or None). The router's own choice counts:
        # with a score-correction bias or group-limited routing (DeepSeek-V3, GLM-4.5, MiniMax-M2) it is not
        # the top-k of the logits.
        if isinstance(output, tuple):
            chosen = output[2] if len(output) > 2 and not output[2].is_floating_point() else None
            self._logits.append((output[0], chosen))
        else:
            self._logits.append((output, None))

    def _probs(self, x: torch.Tensor) -> torch.Tensor:
        """P of the aux loss `[T, E]` from what the router returned first (`MoESpec.scores`)."""
        x = x.float()
        if self.scores == "sigmoid":
            s = torch.sigmoid(x)
            return s / s.sum(-1, keepdim=True)
        return x if self.scores == "probs" else torch.softmax(x, dim=-1)

    def start(self) -> None:
        self._logits = []  # also drops logits recorded by an activation-checkpoint recompute

    def aux_sum(self, index: torch.Tensor, rows: int, sp_group: dist.ProcessGroup | None) -> torch.Tensor:
        """This rank's share of `aux * N` for the micro-batch just run (differentiable in the router logits).

        `index` `[T_local]` and `rows` (samples + 1 dump row) come from `routing_inputs` on the host.
        """
        logits, self._logits = self._logits[: self.num_layers], []
        assert len(logits) == self.num_layers, f"{len(logits)} router outputs for {self.num_layers} routers"
        e = self.num_experts
        probs = torch.stack([self._probs(x) for x, _ in logits])  # [L, T, E]
        top = [c if c is not None else x.topk(self.top_k, dim=-1).indices for x, c in logits]
        chosen = torch.stack(top)  # [L, T, k]
        hits = torch.zeros_like(probs).scatter_(2, chosen, 1.0)  # [L, T, E] one-hot of the top-k
        counts = probs.new_zeros(self.num_layers, rows, e).index_add_(1, index, hits)  # [L, n+1, E]
        local = counts[:, :-1].sum(1)  # [L, E] this rank's real tokens per expert (before the SP sum)
        if sp_group is not None and dist.get_world_size(sp_group) > 1:
            dist.all_reduce(counts, group=sp_group)  # a sample's tokens may sit on several SP ranks
        sums = probs.new_zeros(self.num_layers, rows, e).index_add_(1, index, probs)  # local S_lie
        frac = self.top_k * counts / counts.sum(-1, keepdim=True).clamp_min(1.0)  # f_lie
        aux = (frac[:, :-1] * sums[:, :-1]).sum() * (e / self.num_layers)  # the dump row is padding
        self._accumulate(aux.detach(), local)
        return aux

    def _accumulate(self, aux: torch.Tensor, counts: torch.Tensor) -> None:
        self._aux = aux if self._aux is None else self._aux + aux
        self._counts = counts if self._counts is None else self._counts + counts

    def step_metrics(self, group: dist.ProcessGroup, real_tokens: float) -> dict[str, float]:
        """Once per step: `train/aux_loss` (before the coefficient) and `train/moe_max_load` (1.0 = balanced)."""
        if self._aux is None:
            return {}
        flat = torch.cat([self._aux.reshape(1).double(), self._counts.reshape(-1).double()])
        dist.all_reduce(flat, group=group)
        self._aux = self._counts = None
        counts = flat[1:].reshape(self.num_layers, self.num_experts)
        load = (counts.max(-1).values / counts.mean(-1).clamp_min(1e-9)).mean()
        aux, load = torch.stack([flat[0] / max(real_tokens, 1.0), load]).tolist()
        return {"train/aux_loss": aux, "train/moe_max_load": load}


def experts_kwargs(hf_config, implementation: str) -> dict:
    """`from_config` kwargs choosing how an MoE family's experts run (`model.experts_implementation`).

    `grouped_mm` sorts tokens by expert and runs each projection as one grouped GEMM; `eager` is the
    per-expert Python loop. Dense families get nothing.
    """
    if implementation not in EXPERTS_IMPLEMENTATIONS:
        raise ValueError(f"model.experts_implementation={implementation!r}: choose {either(EXPERTS_IMPLEMENTATIONS)}")
    if moe_spec(hf_config) is None:
        return {}
    return {"experts_implementation": implementation}
