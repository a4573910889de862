"""The MoE router load-balancing loss (sft/models/moe.py) against an independent reference.

The reference runs the plain Hugging Face model on each sample alone, takes its router logits from
transformers' own `output_router_logits`, and computes the token-weighted mean over samples of the
Switch loss E * sum_e f_e * P_e (f: share of the sample's top-k routing slots, P: mean router
probability), averaged over layers. sft computes it on a padded two-sample micro-batch through its
hooks. Value and the gradient of CE + coef * aux on the router weights must match.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM

from sft.models.families import moe_spec
from sft.models.loading import CausalLMWithLoss
from sft.models.moe import RouterStats, routing_inputs

E, K, COEF = 4, 2, 0.7


def _model(model_type: str):
    # qwen2_moe adds an always-on shared expert with a sigmoid gate beside the routed experts.
    extra = {"shared_expert_intermediate_size": 16} if model_type == "qwen2_moe" else {}
    cfg = AutoConfig.for_model(
        model_type,
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        moe_intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        num_experts=E,
        num_experts_per_tok=K,
        mlp_only_layers=[],
        decoder_sparse_step=1,
        initializer_range=0.3,
        use_cache=False,
        pad_token_id=None,
        bos_token_id=None,
        eos_token_id=None,
        **extra,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)


def _reference(lm, samples: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(CE summed over targets / targets + COEF * aux, aux) from per-sample forwards."""
    ce_sum, targets, weighted, tokens = 0.0, 0, 0.0, 0
    for ids in samples:
        out = lm(input_ids=ids[None], output_router_logits=True)
        ce_sum = ce_sum + F.cross_entropy(out.logits[0, :-1], ids[1:], reduction="sum")
        targets += len(ids) - 1
        per_layer = []
        for logits in out.router_logits:  # [n, E] each
            probs = torch.softmax(logits.float(), dim=-1)
            slots = F.one_hot(logits.topk(K, dim=-1).indices, E).sum(1).float()  # [n, E]
            f = K * slots.sum(0) / slots.sum()
            per_layer.append(E * (f * probs.mean(0)).sum())
        weighted = weighted + len(ids) * torch.stack(per_layer).mean()
        tokens += len(ids)
    aux = weighted / tokens
    return ce_sum / targets + COEF * aux, aux


@pytest.mark.parametrize("model_type", ["qwen3_moe", "qwen2_moe"])
@pytest.mark.parametrize("lengths", [(9, 5), (7, 7)])
def test_aux_loss_value_and_gradient_match_reference(lengths, model_type):
    lm = _model(model_type)
    gen = torch.Generator().manual_seed(1)
    samples = [torch.randint(0, 64, (n,), generator=gen) for n in lengths]
    routers = [p for n, p in lm.named_parameters() if n.endswith("mlp.gate.weight")]
    assert len(routers) == 2

    ref_loss, ref_aux = _reference(lm, samples)
    ref_grads = torch.autograd.grad(ref_loss, routers)

    # sft: one padded micro-batch (right padding), labels shifted as the trainer does.
    s = max(lengths)
    ids = torch.zeros(len(samples), s, dtype=torch.long)
    mask = torch.zeros(len(samples), s, dtype=torch.long)
    labels = torch.full((len(samples), s), -100)
    for i, x in enumerate(samples):
        ids[i, : len(x)], mask[i, : len(x)] = x, 1
        labels[i, : len(x) - 1] = x[1:]
    routing = RouterStats(lm, moe_spec(lm.config), COEF)
    model = CausalLMWithLoss(lm, routing=routing)
    n_targets, n_real = int((labels != -100).sum()), int(mask.sum())
    loss_sum, n, _ = model(
        input_ids=ids,
        position_ids=torch.arange(s).expand(len(samples), s),
        labels=labels,
        attention_mask=mask,
        aux_weight=COEF * n_targets / n_real,  # the trainer's weight: aux is a sum over real tokens
        **routing_inputs(mask, None, 0, 1),
    )
    assert int(n) == n_targets
    grads = torch.autograd.grad(loss_sum / n_targets, routers)
    torch.testing.assert_close(routing._aux / n_real, ref_aux.detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(loss_sum.detach() / n_targets, ref_loss.detach() - COEF * ref_aux.detach())
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)
