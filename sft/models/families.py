"""The per-family table: what each supported model family needs from attention, loss, kernels and checks.

One declarative row per family (keyed by the HF `model_type`): sliding windows, attention-logit and
final-logit soft-capping, attention sinks, mixture-of-experts routing, and whether Liger's kernels
cover it. Attention, the loss, the kernels and validation read this table; no other module tests a
model type. `check_family` refuses, before anything loads, a model this table cannot train.
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
    # Router modules are found by class-name suffix (lower case); their forward returns the logits first.
    router_suffix: str = "topkrouter"
    # Config key of the width of an always-on shared expert (gated MLP plus a hidden x 1 sigmoid gate), if any.
    shared_expert_key: str | None = None


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


_QWEN_MOE = MoESpec(experts_keys=("num_experts", "num_local_experts"))
_QWEN2_MOE = MoESpec(experts_keys=("num_experts",), shared_expert_key="shared_expert_intermediate_size")
_LOCAL_MOE = MoESpec(experts_keys=("num_local_experts",))

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
}

# Config keys that change what a model computes in ways a row above must declare before sft trains it.
_FEATURE_KEYS = {
    "final_logit_softcapping": "final-logit soft-capping",
    "attn_logit_softcapping": "attention-logit soft-capping",
    "logit_scale": "scaled logits",
    "logits_scaling": "scaled logits",
    "num_experts": "mixture-of-experts routing",
    "num_local_experts": "mixture-of-experts routing",
    "n_routed_experts": "mixture-of-experts routing",
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
        return (
            f"model_type={model_type!r} is a multimodal wrapper; sft trains text-only causal LMs "
            f"(supported families: {supported_types()})"
        )
    fam = FAMILIES.get(model_type)
    if fam is None:
        if model_type is None:
            return "config.json has no model_type"
        return (
            f"model_type={model_type!r} is not in sft's table of tested families ({supported_types()}); "
            "see README 'Supported model families'"
        )
    declared = {fam.attn_softcap_key, fam.final_softcap_key}
    if fam.moe is not None:
        declared.update(fam.moe.experts_keys)
    if fam.logit_scale is not None:
        declared.add(fam.logit_scale[0])
    for key, what in _FEATURE_KEYS.items():
        if key not in declared and _is_set(config.get(key)):
            return f"model_type={model_type!r} with config.{key}={config[key]} ({what}) is not supported by sft yet"
    return None


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
    fam = _row(hf_config)
    return None if fam is None else fam.moe


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
