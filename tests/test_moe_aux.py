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


_QWEN = dict(num_experts=E, num_experts_per_tok=K, mlp_only_layers=[], decoder_sparse_step=1)
_SIGMOID = dict(num_experts=E, num_experts_per_tok=K, num_shared_experts=1)
# Multi-head latent attention, no low-rank q: q/k heads 4 + 8 wide, value heads 8 wide.
_MLA = dict(
    num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=None, qk_nope_head_dim=4, qk_rope_head_dim=8, v_head_dim=8
)
_GROUPED = dict(n_routed_experts=E, num_experts_per_tok=K, n_shared_experts=1, n_group=2, topk_group=1)
# Per family: config keys, and how the router turns logits into the aux loss's P ("probs": it returns them).
FAMILIES = {
    "qwen3_moe": (_QWEN, "softmax"),
    # an always-on shared expert with a sigmoid gate beside the routed experts
    "qwen2_moe": (dict(_QWEN, shared_expert_intermediate_size=16), "softmax"),
    # sigmoid routers: a score-correction bias (randomised below) and, for DeepSeek-V3, group-limited choice
    "minimax_m2": (dict(num_local_experts=E, num_experts_per_tok=K, intermediate_size=16), "sigmoid"),
    "deepseek_v3": (
        dict(
            _GROUPED,
            first_k_dense_replace=0,
            **_MLA,
        ),
        "sigmoid",
    ),
    "gemma4_text": (
        dict(
            enable_moe_block=True,
            num_experts=E,
            top_k_experts=K,
            hidden_size_per_layer_input=0,
            layer_types=["sliding_attention", "full_attention"],
        ),
        "probs",
    ),
    "olmoe": (dict(num_experts=E, num_experts_per_tok=K), "softmax"),
    # softmax routers whose choice adds a per-expert bias (a frozen parameter, randomised below)
    "ernie4_5_moe": (dict(moe_num_experts=E, moe_k=K, moe_layer_start_index=0, moe_num_shared_experts=1), "softmax"),
    # MLA models: softmax with group-limited choice (DeepSeek-V2), biased sigmoid (GLM-4.7-Flash)
    "deepseek_v2": (
        dict(
            _GROUPED,
            topk_method="group_limited_greedy",
            first_k_dense_replace=0,
            **_MLA,
        ),
        "softmax",
    ),
    "glm4_moe_lite": (
        dict(
            _GROUPED,
            mlp_layer_types=["sparse", "sparse"],
            **_MLA,
        ),
        "sigmoid",
    ),
    "dots1": (dict(_GROUPED, first_k_dense_replace=0), "sigmoid"),
    "exaone_moe": (dict(_SIGMOID, n_group=2, topk_group=1, mlp_layer_types=["sparse", "sparse"]), "sigmoid"),
    "afmoe": (dict(_SIGMOID, num_dense_layers=0), "sigmoid"),
    "hy_v3": (dict(_SIGMOID, mlp_layer_types=["sparse", "sparse"]), "sigmoid"),
    "solar_open": (dict(_GROUPED), "sigmoid"),
    "flex_olmo": (dict(num_experts=E, num_experts_per_tok=K), "softmax"),
    # softmax over the top-k logits (for the aux loss's P, the softmax over all of them); its logit scaling is the
    # trainer's (the family tests), not this test's
    "granitemoe": (dict(num_local_experts=E, num_experts_per_tok=K, logits_scaling=1.0), "softmax"),
    "sarvam_moe": (dict(_GROUPED, first_k_dense_replace=0), "sigmoid"),
    "lfm2_moe": (
        dict(num_experts=E, num_experts_per_tok=K, num_dense_layers=0, layer_types=["conv", "full_attention"]),
        "sigmoid",
    ),
}


def _model(model_type: str):
    base = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        moe_intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        initializer_range=0.3,
        use_cache=False,
        pad_token_id=None,
        bos_token_id=None,
        eos_token_id=None,
    )
    cfg = AutoConfig.for_model(model_type, **dict(base, **FAMILIES[model_type][0]))
    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    for name, buf in [*lm.named_buffers(), *lm.named_parameters()]:
        if name.endswith(("e_score_correction_bias", "expert_bias", "router.gate.weight")):  # zero at init
            with torch.no_grad():
                buf.copy_(torch.randn(buf.shape) * 0.5)
    return lm


def _scores(model_type: str, first: torch.Tensor) -> torch.Tensor:
    """The aux loss's P from what transformers records as router logits (Gemma 4 records probabilities)."""
    kind = FAMILIES[model_type][1]
    if kind == "sigmoid":
        return torch.sigmoid(first) / torch.sigmoid(first).sum(-1, keepdim=True)
    return first if kind == "probs" else torch.softmax(first, dim=-1)


def _reference(lm, samples: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(CE summed over targets / targets + COEF * aux, aux) from per-sample forwards; the chosen experts are
    what each experts module was given."""
    chosen: list[torch.Tensor] = []
    experts = [m for m in lm.modules() if type(m).__name__.endswith("Experts")]
    hooks = [m.register_forward_pre_hook(lambda m, args: chosen.append(args[1])) for m in experts]
    ce_sum, targets, weighted, tokens = 0.0, 0, 0.0, 0
    for ids in samples:
        chosen.clear()
        out = lm(input_ids=ids[None], output_router_logits=True)
        ce_sum = ce_sum + F.cross_entropy(out.logits[0, :-1], ids[1:], reduction="sum")
        targets += len(ids) - 1
        per_layer = []
        assert len(chosen) == len(out.router_logits)
        for logits, top in zip(out.router_logits, chosen):  # [n, E], [n, k] each
            probs = _scores(lm.config.model_type, logits.float())
            slots = F.one_hot(top, E).sum(1).float()  # [n, E]
            f = K * slots.sum(0) / slots.sum()
            per_layer.append(E * (f * probs.mean(0)).sum())
        weighted = weighted + len(ids) * torch.stack(per_layer).mean()
        tokens += len(ids)
    aux = weighted / tokens
    for h in hooks:
        h.remove()
    return ce_sum / targets + COEF * aux, aux


@pytest.mark.parametrize("model_type", list(FAMILIES))
@pytest.mark.parametrize("lengths", [(9, 5), (7, 7)])
def test_aux_loss_value_and_gradient_match_reference(lengths, model_type):
    lm = _model(model_type)
    gen = torch.Generator().manual_seed(1)
    samples = [torch.randint(0, 64, (n,), generator=gen) for n in lengths]
    names = (
        "mlp.gate.weight",
        "router.proj.weight",
        "feed_forward.gate.weight",
        "router.gate.weight",
        "moe.router.weight",
    )
    routers = [p for n, p in lm.named_parameters() if n.endswith(names)]
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


@pytest.mark.parametrize(
    "model_type,dense_key",
    [
        ("deepseek_v3", "first_k_dense_replace"),
        ("glm4_moe", "first_k_dense_replace"),
        ("deepseek_v2", "first_k_dense_replace"),
        ("dots1", "first_k_dense_replace"),
        ("glm4_moe_lite", "mlp_layer_types"),
        ("ernie4_5_moe", "moe_layer_start_index"),
        ("lfm2_moe", "num_dense_layers"),
        ("afmoe", "num_dense_layers"),
        ("exaone_moe", "mlp_layer_types"),
        ("hy_v3", "mlp_layer_types"),
    ],
)
def test_a_moe_config_whose_layers_are_all_dense_builds_as_dense(demo_dir, tmp_path, model_type, dense_key):
    """DeepSeek-V3 and GLM-4.5 keep their first `first_k_dense_replace` layers dense (3 in DeepSeek-V3's config class),
    GLM-4.7-Flash lists each layer's kind, ERNIE 4.5 names the first MoE layer: a model whose layers are all dense has
    no router, and builds as a dense model (the build raised "no router modules found"); one sparse layer more and it
    routes again. The router count of the built model is the independent check of sft's rule (`sparse_layer`)."""
    from conftest import base_overrides
    from family_models import write_family_model

    from sft.cli import compose
    from sft.models.families import sparse_layer
    from sft.models.loading import build_meta_model

    for dense, routes in ((2, False), (1, True)):
        value = ["dense"] * dense + ["sparse"] * (2 - dense) if dense_key == "mlp_layer_types" else dense
        kinds = {"layer_types": ["conv", "full_attention"]} if model_type == "lfm2_moe" else {}  # LFM2 needs its list
        folder = write_family_model(
            demo_dir / "model", tmp_path / f"{dense}", model_type, **kinds, **{dense_key: value}
        )
        hf_config = AutoConfig.from_pretrained(folder)
        cfg = compose(base_overrides(demo_dir, tmp_path / "out") + [f"model.partial_pretrain={folder}"])
        assert (moe_spec(hf_config) is not None) == routes
        assert (build_meta_model(hf_config, cfg).routing is not None) == routes
        with torch.device("meta"):
            lm = AutoModelForCausalLM.from_config(hf_config)
        routers = sum(type(m).__name__.lower().endswith(("topkrouter", "tokenchoicerouter")) for m in lm.modules())
        assert routers == sum(sparse_layer(hf_config, i) for i in range(hf_config.num_hidden_layers)) == 2 - dense
