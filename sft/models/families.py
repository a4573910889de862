"""The per-family table: what each supported model family needs from attention, loss, kernels and checks.

One declarative row per family (keyed by the HF `model_type`): sliding windows, attention-logit and
final-logit soft-capping, attention sinks, mixture-of-experts routing, the recurrent layers of hybrid
models (sft/models/recurrent/), and whether Liger's kernels cover it. Attention, the loss, the kernels and
validation read this table; no other module tests a model type. `unsupported_reason` refuses, before anything
loads, a model this table cannot train; a type outside the table goes to the packing probe (`needs_probe`,
sft/models/probe.py), which trains it with no row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class MoESpec:
    """Where an MoE config keeps its routing numbers, and how to find the routers in the model."""

    experts_keys: tuple[str, ...]  # config keys that may hold the number of routed experts (first set wins)
    top_k_key: str = "num_experts_per_tok"
    coef_key: str = "router_aux_loss_coef"
    # Router modules are found by class-name suffix (lower case); their forward returns the logits (or, with
    # scores="probs", the probabilities) first and, when it returns three values, the chosen experts last.
    router_suffix: str = "topkrouter"
    # Config key of the width of an always-on shared expert (gated MLP plus a hidden x 1 sigmoid gate), if any.
    shared_expert_key: str | None = None
    # How the router scores experts, which the aux loss's P follows (sft/models/moe.py): "softmax" of the logits,
    # "sigmoid" of the logits normalised over the experts (DeepSeek-V3-style routers), or "probs" (the router
    # returns probabilities).
    scores: str = "softmax"
    # (config key of the per-layer block types, the MoE block's type): MoE only when some layer is one (Nemotron-H).
    moe_layer: tuple[str, str] | None = None


@dataclass(frozen=True)
class RecurrentSpec:
    """Recurrent token mixers (linear attention, SSM, short convolution) of a hybrid family: sft runs them packed,
    restarting at every sample, and split over Ulysses SP ranks (sft/models/recurrent/)."""

    kind: str  # "gated_delta", "mamba2" or "short_conv" (sft/models/recurrent/mixers.py)
    module_suffix: str  # class-name suffix (lower case) of the mixer modules
    heads_key: str  # config key of what SP ranks split: heads (key heads for Gated DeltaNet), channels for a conv
    groups_key: str | None = None  # config key of Mamba-2's B/C groups (split, or replicated when fewer than ranks)


@dataclass(frozen=True)
class Family:
    """What sft does for one family. All rows support remove-padding, Ulysses SP and LoRA."""

    label: str
    sliding_window: bool = False  # per-layer windows from `layer_types` / `sliding_window`
    attn_softcap_key: str | None = None  # config key of attention-logit soft-capping
    final_softcap_key: str | None = None  # config key of final-logit soft-capping (applied in the loss)
    sinks: bool = False  # learned per-head sink logits (`s_aux`)
    moe: MoESpec | None = None
    # (config key, power): the LM head's logits are multiplied by value**power (Granite divides by logits_scaling)
    logit_scale: tuple[str, int] | None = None
    mlp_matrices: int = 3  # weight matrices of a dense MLP: 3 gated (gate/up/down), 2 plain (up/down)
    liger: bool = True  # fused kernels (sft's and Liger's RMSNorm/SwiGLU/RoPE) apply, when liger-kernel has the type
    # The gated MLP's kernel when fused kernels are on: "sft" runs sft/ops/swiglu.py in the model's own
    # down(silu(gate(x)) * up(x)) MLP (faster than Liger's on Hopper); "liger" takes Liger's MLP patch
    # (Phi-3's fused gate_up, Gemma's GEGLU); "none" keeps the model's own. MoE rows say "none": Liger's
    # `swiglu` patch of an MoE family replaces the experts with its own fused-MoE kernel, which reads a
    # count back from the GPU in every layer (a host sync), autotunes for minutes on the first step, and
    # would silently override `model.experts_implementation`.
    mlp: str = "sft"
    # The RMSNorm's math: "weight" (weight x normalised x, Llama style) runs sft/ops/rms_norm.py (PyTorch's fused
    # forward, sft's one-pass backward) when fused kernels are on: it beats Liger's; "offset" ((1 + weight) x
    # normalised x, Gemma) stays on Liger's kernel, which has the offset that PyTorch's lacks.
    rms_norm: str = "weight"
    recurrent: RecurrentSpec | None = None  # hybrid families: their linear-attention / SSM / conv layers
    # Why sft's FLOP formula (sft/loop/flops.py) does not count this family's matmuls, so no MFU is reported.
    no_mfu: str | None = None


_QWEN_MOE = MoESpec(experts_keys=("num_experts", "num_local_experts"))
_QWEN2_MOE = MoESpec(experts_keys=("num_experts",), shared_expert_key="shared_expert_intermediate_size")
_LOCAL_MOE = MoESpec(experts_keys=("num_local_experts",))
# Hybrid families (sft/models/recurrent/): Gated DeltaNet, Mamba-2 and short-convolution mixers beside attention.
_GDN = RecurrentSpec("gated_delta", "gateddeltanet", "linear_num_key_heads")
_HYBRID_MOE = dict(liger=False, mlp="none", rms_norm="offset", recurrent=_GDN)
_SHORT_CONV = RecurrentSpec("short_conv", "shortconv", "hidden_size")
# Sigmoid routers with a score-correction bias and shared experts: the router returns its chosen experts.
_DEEPSEEK_MOE = MoESpec(experts_keys=("n_routed_experts",), coef_key="aux_loss_alpha", scores="sigmoid")
_GLM_MOE = MoESpec(experts_keys=("n_routed_experts",), scores="sigmoid")
_SIGMOID_MOE = MoESpec(experts_keys=("num_experts",), scores="sigmoid")
# Softmax routers over `n_routed_experts` (greedy or group-limited) with shared experts: DeepSeek-V2. Its released
# config.json keeps the coefficient as `aux_loss_alpha` (transformers' class does not declare it; absent: no aux loss).
_DEEPSEEK_V2_MOE = MoESpec(experts_keys=("n_routed_experts",), coef_key="aux_loss_alpha")
# ERNIE 4.5: softmax router whose choice adds a learned per-expert bias (`moe_statics`); k is `moe_k`.
_ERNIE_MOE = MoESpec(experts_keys=("moe_num_experts",), top_k_key="moe_k")
_MINIMAX_MOE = MoESpec(experts_keys=("num_local_experts", "num_experts"), scores="sigmoid")
# Gemma 4's router returns probabilities (its MoE block runs beside the dense MLP); no aux loss in its config.
_GEMMA4_MOE = MoESpec(
    experts_keys=("num_experts",), top_k_key="top_k_experts", router_suffix="textrouter", scores="probs"
)

FAMILIES: dict[str, Family] = {
    "llama": Family("Llama 2/3"),
    "mistral": Family("Mistral (sliding_window optional)", sliding_window=True),
    "qwen2": Family("Qwen2 / Qwen2.5", sliding_window=True),
    "qwen3": Family("Qwen3", sliding_window=True),
    "phi3": Family("Phi-3 / Phi-4", sliding_window=True, mlp="liger"),
    "olmo2": Family("OLMo 2"),
    "granite": Family("Granite", logit_scale=("logits_scaling", -1)),
    "gemma": Family("Gemma", rms_norm="offset", mlp="liger"),
    "gemma2": Family(
        "Gemma 2",
        rms_norm="offset",
        mlp="liger",
        sliding_window=True,
        attn_softcap_key="attn_logit_softcapping",
        final_softcap_key="final_logit_softcapping",
    ),
    "gemma3_text": Family(
        "Gemma 3 (text)",
        sliding_window=True,
        final_softcap_key="final_logit_softcapping",
        rms_norm="offset",
        mlp="liger",
    ),
    "qwen3_moe": Family("Qwen3-MoE", sliding_window=True, moe=_QWEN_MOE, mlp="none"),
    "mixtral": Family("Mixtral", sliding_window=True, moe=_LOCAL_MOE, mlp="none"),
    "gpt_oss": Family("gpt-oss", sliding_window=True, sinks=True, moe=_LOCAL_MOE, liger=False),
    # Liger 0.8.5 has glm4 but raises on its RoPE patch (sft asks for rope): no Liger.
    "glm4": Family("GLM-4-0414", liger=False),
    "cohere": Family("Command R / R+", logit_scale=("logit_scale", 1), liger=False),
    "cohere2": Family("Command R7B / Command A", sliding_window=True, logit_scale=("logit_scale", 1), liger=False),
    "smollm3": Family("SmolLM3", sliding_window=True),
    "olmo3": Family("OLMo 3", sliding_window=True),
    "ministral": Family("Ministral", sliding_window=True),
    "starcoder2": Family("StarCoder2", sliding_window=True, mlp_matrices=2, liger=False),
    "qwen2_moe": Family("Qwen1.5-MoE / Qwen2-MoE", sliding_window=True, moe=_QWEN2_MOE, liger=False, mlp="none"),
    # Qwen3-VL's text model: Qwen3 with multimodal RoPE; on text-only rows its three position sections are equal,
    # which is plain RoPE over the token positions (the packed per-sample positions work unchanged).
    "qwen3_vl_text": Family("Qwen3-VL (text model)", liger=False),
    "qwen3_vl_moe_text": Family("Qwen3-VL-MoE (text model)", moe=_QWEN_MOE, liger=False, mlp="none"),
    # GLM-4.1V / 4.6V-Flash and GLM-4.5V / 4.6V text models: GLM-4 and GLM-4.5 layers with multimodal RoPE (equal
    # sections on text-only rows), rotated over `partial_rotary_factor` of each head.
    "glm4v_text": Family("GLM-4.1V / GLM-4.6V-Flash (text model)", liger=False),
    "glm4v_moe_text": Family("GLM-4.5V / GLM-4.6V (text model)", moe=_GLM_MOE, liger=False),
    "qwen2_vl_text": Family("Qwen2-VL (text model)", sliding_window=True, liger=False),
    "qwen2_5_vl_text": Family("Qwen2.5-VL (text model)", sliding_window=True, liger=False),
    "qwen3_5_text": Family("Qwen3.5 (text)", liger=False, rms_norm="offset", recurrent=_GDN),
    # Gated DeltaNet with its own q/k/v/a/b/g projections and, when `linear_allow_neg_eigval`, beta in [0, 2].
    "olmo_hybrid": Family("OLMo Hybrid", liger=False, recurrent=_GDN),
    "qwen3_5_moe_text": Family("Qwen3.5-MoE (text)", moe=_QWEN2_MOE, **_HYBRID_MOE),
    "qwen3_next": Family("Qwen3-Next", moe=_QWEN2_MOE, **_HYBRID_MOE),
    "lfm2": Family("LFM2", liger=False, recurrent=_SHORT_CONV),
    # LFM2's layers with a sigmoid router (its choice adds `expert_bias`, a buffer) after `num_dense_layers` dense ones.
    "lfm2_moe": Family("LFM2-MoE", liger=False, mlp="none", moe=_SIGMOID_MOE, recurrent=_SHORT_CONV),
    "nemotron_h": Family(
        "Nemotron-H",
        mlp_matrices=2,
        liger=False,
        mlp="none",
        moe=MoESpec(experts_keys=("n_routed_experts",), scores="sigmoid", moe_layer=("layers_block_type", "moe")),
        recurrent=RecurrentSpec("mamba2", "mamba2mixer", "mamba_num_heads", "n_groups"),
    ),
    "granitemoehybrid": Family(
        "Granite 4.0 hybrid",
        logit_scale=("logits_scaling", -1),
        liger=False,
        mlp="none",
        moe=_LOCAL_MOE,
        recurrent=RecurrentSpec("mamba2", "mambalayer", "mamba_n_heads", "mamba_n_groups"),
    ),
    # Mamba-2 layers, attention at `attn_layer_indices` (IBM Bamba).
    "bamba": Family(
        "Bamba", liger=False, recurrent=RecurrentSpec("mamba2", "bambamixer", "mamba_n_heads", "mamba_n_groups")
    ),
    "falcon_h1": Family(
        "Falcon-H1",
        logit_scale=("lm_head_multiplier", 1),
        liger=False,
        recurrent=RecurrentSpec("mamba2", "falconh1mixer", "mamba_n_heads", "mamba_n_groups"),
    ),
    # Per-layer head widths and KV heads (global layers), shared KV layers, K = V layers, per-layer embeddings,
    # optional MoE block beside the MLP; attention scale 1 with q/k/v norms. Liger has no Gemma 4 kernels.
    "gemma4_text": Family(
        "Gemma 4 (text)",
        sliding_window=True,
        final_softcap_key="final_logit_softcapping",
        moe=_GEMMA4_MOE,
        liger=False,
        no_mfu="Gemma 4's per-layer inputs, double-wide MLPs and MoE block beside the MLP",
    ),
    "glm4_moe": Family("GLM-4.5 / GLM-4.6", moe=_GLM_MOE, liger=False),
    "minimax_m2": Family("MiniMax-M2", moe=_MINIMAX_MOE, liger=False),
    # MLA: query/key heads (nope + rope) wider than value heads (sft/models/attention/varlen.py).
    "deepseek_v3": Family("DeepSeek-V3 / V3.1", moe=_DEEPSEEK_MOE, liger=False),
    "deepseek_v2": Family("DeepSeek-V2 / V2-Lite", moe=_DEEPSEEK_V2_MOE, liger=False),
    # MLA attention under GLM-4.5's sigmoid routers (GLM-4.7-Flash).
    "glm4_moe_lite": Family("GLM-4.7-Flash", moe=_GLM_MOE, liger=False),
    "dots1": Family("dots.llm1", moe=_GLM_MOE, liger=False),
    "olmoe": Family("OLMoE", moe=_QWEN_MOE, liger=False, mlp="none"),
    "ernie4_5_moe": Family("ERNIE 4.5 MoE", moe=_ERNIE_MOE, liger=False, mlp="none"),
    # Sigmoid routers whose choice adds a per-expert bias, over `num_experts`, with shared experts.
    "exaone_moe": Family("K-EXAONE (EXAONE MoE)", sliding_window=True, moe=_SIGMOID_MOE, liger=False),
    "afmoe": Family(
        "Arcee Trinity (AFMoE)",
        sliding_window=True,
        moe=MoESpec(("num_experts",), scores="sigmoid", router_suffix="tokenchoicerouter"),
        liger=False,
        no_mfu="AFMoE's gated attention (an output-gate projection per layer)",
    ),
    "hy_v3": Family("Hy3 (Tencent Hunyuan 3)", moe=_SIGMOID_MOE, liger=False),
    "solar_open": Family("Solar Open", moe=_GLM_MOE, liger=False),
    "sarvam_moe": Family("Sarvam MoE", moe=_GLM_MOE, liger=False),
    "sarvam_mla": Family("Sarvam MoE with MLA", moe=_GLM_MOE, liger=False),
    "param2moe": Family("Param-2 MoE", moe=_GLM_MOE, liger=False),
    "flex_olmo": Family("FlexOlmo", moe=_QWEN_MOE, liger=False, mlp="none"),
    "granitemoe": Family("Granite 3 MoE", logit_scale=("logits_scaling", -1), moe=_LOCAL_MOE, liger=False, mlp="none"),
}

# Experts chosen per token: set with a count key below in most configs; alone, still a router.
_PER_TOKEN_KEYS = ("num_experts_per_tok", "num_experts_per_token")
# Config keys that change what a model computes in ways a row above must declare before sft trains it.
_FEATURE_KEYS = {
    "final_logit_softcapping": "final-logit soft-capping",
    "attn_logit_softcapping": "attention-logit soft-capping",
    "logit_scale": "scaled logits",
    "logits_scaling": "scaled logits",
    "num_experts": "mixture-of-experts routing",
    "num_local_experts": "mixture-of-experts routing",
    "n_routed_experts": "mixture-of-experts routing",
    "moe_num_experts": "mixture-of-experts routing",  # ERNIE 4.5 MoE, Aria
    **dict.fromkeys(_PER_TOKEN_KEYS, "mixture-of-experts routing"),
}
# Of those, what the packing probe (sft/models/probe.py) measures for a model type outside the table: attention
# soft-capping happens inside the model's forward, in the logits it compares. The others change what sft's loss
# or router statistics must apply themselves, so they need a row.
_PROBED_FEATURES = frozenset({"attn_logit_softcapping"})
# Attention that looks both ways makes next-token training meaningless (Gemma 3's `true`, Gemma 4's "all").
_BIDIRECTIONAL = (True, "all")
# Dropout keys of heads a causal LM does not run (sequence classification, GPT-2's summary head).
_UNUSED_DROPOUT = ("classifier", "summary")


# Multimodal checkpoints (a `text_config` in config.json) train their text model under its own row above
# (sft/models/multimodal.py). The head's output features (final-logit soft-capping, logit scale) are applied by the
# wrapper's forward, not by its text model, and wrappers differ: these apply them as their text model does. With
# any other wrapper a text_config that sets one is refused (Gemma 3's wrapper ignores `final_logit_softcapping`).
HEAD_FEATURE_WRAPPERS = frozenset({"gemma4", "paligemma", "aya_vision"})


def training_noise(config: dict[str, Any]) -> dict[str, float]:
    """The probabilities and scales above 0 of what a model randomises in training only, in its config.json: dropout
    (attention, hidden, residual, embedding, layer drop: every key with "drop" in its name) and router jitter (Mixtral,
    PhiMoE, MiniMax: "jitter")."""
    return {
        key: value
        for key, value in config.items()
        if ("drop" in key.lower() or "jitter" in key.lower())
        and not key.startswith(_UNUSED_DROPOUT)
        and isinstance(value, (int, float))
        and not isinstance(value, bool)
        and value > 0
    }


def _row(hf_config: Any) -> Family | None:
    return FAMILIES.get(getattr(hf_config, "model_type", None))


def supported_types() -> str:
    return ", ".join(sorted(FAMILIES))


def _is_set(value: Any) -> bool:
    return value not in (None, 0, 0.0, 1.0, False)


def unsupported_reason(config: dict[str, Any]) -> str | None:
    """Why the model of this config.json cannot be trained by sft (None when it can), from the json alone."""
    model_type = config.get("model_type")
    if isinstance(config.get("text_config"), dict) and model_type not in FAMILIES:
        return _wrapper_reason(config)
    fam = FAMILIES.get(model_type)
    layers, shared = config.get("num_hidden_layers"), config.get("num_kv_shared_layers")
    if isinstance(layers, int) and isinstance(shared, int) and shared >= layers > 0:
        return (
            f"model_type={model_type!r} has num_kv_shared_layers={shared} of its {layers} layers: every layer reads "
            "keys and values that another model computes (a draft model for assisted decoding, e.g. "
            "gemma4_assistant); sft trains standalone causal LMs"
        )
    if config.get("use_bidirectional_attention") in _BIDIRECTIONAL:
        return (
            f"model_type={model_type!r} with config.use_bidirectional_attention="
            f"{config['use_bidirectional_attention']!r} attends to later tokens; sft trains causal LMs: set it to null"
        )
    if fam is None:
        if model_type is None:
            return "config.json has no model_type"
        # Outside the table: the packing probe decides (sft/models/probe.py), for what it can measure.
        for key, what in _FEATURE_KEYS.items():
            if key not in _PROBED_FEATURES and _is_set(config.get(key)):
                return (
                    f"model_type={model_type!r} is not in sft's table of tested families and its config.{key}="
                    f"{config[key]} ({what}) needs a row there (sft/models/families.py); see README "
                    "'Supported model families'"
                )
        return None
    declared = {fam.attn_softcap_key, fam.final_softcap_key}
    if fam.moe is not None:
        declared.update(fam.moe.experts_keys, _PER_TOKEN_KEYS)
    if fam.logit_scale is not None:
        declared.add(fam.logit_scale[0])
    for key, what in _FEATURE_KEYS.items():
        if key not in declared and _is_set(config.get(key)):
            return f"model_type={model_type!r} with config.{key}={config[key]} ({what}) is not supported by sft yet"
    return None


def _wrapper_reason(config: dict[str, Any]) -> str | None:
    """A multimodal checkpoint: trainable when its text model is (the vision side stays frozen)."""
    model_type, text = config.get("model_type"), config["text_config"]
    text_type = text.get("model_type")
    if text_type not in FAMILIES:
        return (
            f"model_type={model_type!r} is a multimodal checkpoint whose text model (text_config.model_type="
            f"{text_type!r}) is not in sft's table ({supported_types()}); see README 'Supported model families'"
        )
    for key, what in _FEATURE_KEYS.items():
        if _is_set(config.get(key)):
            return f"model_type={model_type!r} sets config.{key}={config[key]} ({what}) outside its text_config"
    reason = unsupported_reason(text)
    if reason is not None:
        return f"model_type={model_type!r}, text_config: {reason}"
    fam = FAMILIES[text_type]
    head = [fam.final_softcap_key, fam.logit_scale[0] if fam.logit_scale else None]
    for key in filter(None, head):
        if model_type not in HEAD_FEATURE_WRAPPERS and _is_set(text.get(key)):
            return (
                f"model_type={model_type!r} with text_config.{key}={text[key]}: the checkpoint's class does not apply "
                f"it as its text model does, so sft cannot train it exactly; set text_config.{key} to null if the "
                "model was trained without it"
            )
    return None


def needs_probe(config: dict[str, Any], trust_remote_code: bool) -> bool:
    """Whether sft must measure that packing is exact before training this config.json (sft/models/probe.py): a
    text model type outside the table, or a listed type whose remote code (`auto_map`) replaces transformers' class."""
    if isinstance(config.get("text_config"), dict):
        return False  # multimodal checkpoints train their text model under its row (_wrapper_reason)
    remote = trust_remote_code and "AutoModelForCausalLM" in (config.get("auto_map") or {})
    return config.get("model_type") not in FAMILIES or remote


def final_softcap(hf_config: Any) -> float | None:
    """The cap c of `logits = c * tanh(logits / c)` after the LM head, or None."""
    fam = _row(hf_config)
    if fam is None or fam.final_softcap_key is None:
        return None
    value = getattr(hf_config, fam.final_softcap_key, None)
    return float(value) if value else None


def logit_multiplier(hf_config: Any) -> float:
    """What the model multiplies its LM-head logits by (1.0 for most families)."""
    fam = _row(hf_config)
    if fam is None or fam.logit_scale is None:
        return 1.0
    key, power = fam.logit_scale
    return float(getattr(hf_config, key, 1.0) or 1.0) ** power


def num_experts(hf_config: Any, spec: MoESpec) -> int:
    for key in spec.experts_keys:
        if getattr(hf_config, key, None):
            return int(getattr(hf_config, key))
    raise ValueError(f"model config sets none of {spec.experts_keys}")


def mlp_matrices(hf_config: Any) -> int:
    """Weight matrices of one dense MLP (3 for gated MLPs, and for model types outside the table)."""
    fam = _row(hf_config)
    return 3 if fam is None else fam.mlp_matrices


def moe_spec(hf_config: Any) -> MoESpec | None:
    """The family's routing, or None for a dense model (no experts set, or no MoE layer in the config's layer list)."""
    fam = _row(hf_config)
    spec = None if fam is None else fam.moe
    if spec is None or not any(getattr(hf_config, k, None) for k in spec.experts_keys):
        return None
    if spec.moe_layer is not None and spec.moe_layer[1] not in (getattr(hf_config, spec.moe_layer[0], None) or ()):
        return None
    if not any(sparse_layer(hf_config, i) for i in range(getattr(hf_config, "num_hidden_layers", 0) or 0)):
        return None  # every layer dense (e.g. fewer layers than DeepSeek-V3's first_k_dense_replace): no router
    return spec


def sparse_layer(hf_config: Any, i: int) -> bool:
    """Whether decoder layer i of an MoE config routes its tokens, as transformers builds it:
    - `mlp_layer_types` lists each layer's kind (GLM-4.7-Flash, K-EXAONE, Hy3);
    - ERNIE 4.5 routes every `moe_layer_interval`-th layer from `moe_layer_start_index` to `moe_layer_end_index`;
    - DeepSeek-V2/V3, GLM-4.5 and dots.llm1 keep the first `first_k_dense_replace` layers dense, LFM2-MoE and AFMoE
      the first `num_dense_layers`; Qwen-MoE keeps `mlp_only_layers` dense and routes every `decoder_sparse_step`-th;
    - the other families route every layer."""
    kinds = getattr(hf_config, "mlp_layer_types", None)
    if kinds is not None:
        return kinds[i] == "sparse"
    if getattr(hf_config, "moe_layer_interval", None) is not None:
        interval, start = hf_config.moe_layer_interval, hf_config.moe_layer_start_index
        return (i + 1) % interval == 0 and start <= i <= hf_config.moe_layer_end_index
    first_dense = getattr(hf_config, "first_k_dense_replace", None) or getattr(hf_config, "num_dense_layers", 0)
    if i in (getattr(hf_config, "mlp_only_layers", None) or []) or i < (first_dense or 0):
        return False
    step = getattr(hf_config, "decoder_sparse_step", None) or 1
    return (i + 1) % step == 0


def no_mfu_reason(model_type: str | None) -> str | None:
    """The row's reason that sft's FLOP formula does not hold for this family (None: it holds, or no row)."""
    fam = FAMILIES.get(model_type)
    return None if fam is None else fam.no_mfu


def recurrent_spec(model_type: str | None) -> RecurrentSpec | None:
    """The recurrent mixers of a hybrid family (None for attention-only families and unknown types)."""
    fam = FAMILIES.get(model_type)
    return None if fam is None else fam.recurrent


def liger_covers(model_type: str) -> bool:
    fam = FAMILIES.get(model_type)
    return fam is not None and fam.liger


def mlp_kernel(model_type: str) -> str:
    """The gated MLP's fused kernel: "sft", "liger" or "none" (MoE rows, unknown types; see `Family.mlp`)."""
    fam = FAMILIES.get(model_type)
    return fam.mlp if fam is not None and fam.liger else "none"


def fused_rms_norm(model_type: str) -> bool:
    """Whether the family's RMSNorms are Llama-style (no offset), so sft/ops/rms_norm.py computes them."""
    fam = FAMILIES.get(model_type)
    return fam is not None and fam.rms_norm == "weight"
