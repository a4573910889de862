"""verl's current SFT command line (`verl.trainer.sft_trainer`, verl >= 0.7.1) mapped onto our config.

`translate(overrides)` turns that layout's `key=value` overrides into overrides of our layout
(sft/config/sft_trainer.yaml), in front of the same typed config: nothing else changes. The
tables below are the whole map: keys renamed, that layout's own defaults, keys accepted only with
the values we run exactly, keys with nothing to do here (logged once), and keys refused with the
reason. A key of our own layout passes through; two keys that set the same thing must agree.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields, is_dataclass
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser

from sft.config.errors import ConfigError
from sft.config.schema import SFTConfig

logger = logging.getLogger("sft")

# That layout's key -> ours. The value carries over unchanged.
RENAMED = {
    "data.messages_key": "data.multiturn.messages_key",
    "data.tools_key": "data.multiturn.tools_key",
    "data.enable_thinking_key": "data.multiturn.enable_thinking_key",
    "model.path": "model.partial_pretrain",
    "model.use_remove_padding": "use_remove_padding",
    "model.custom_chat_template": "data.chat_template",
    "engine.ulysses_sequence_parallel_size": "ulysses_sequence_parallel_size",
    "engine.model_dtype": "model.fsdp_config.model_dtype",
    "engine.param_offload": "model.fsdp_config.offload_params",
    "engine.offload_policy": "model.fsdp_config.cpu_offload",
    "engine.reshard_after_forward": "model.fsdp_config.reshard_after_forward",
    "engine.wrap_policy.min_num_params": "model.fsdp_config.wrap_policy.min_num_params",
    "engine.use_torch_compile": "model.compile",
    "engine.seed": "trainer.seed",
    "optim.lr_scheduler_type": "optim.lr_scheduler",
    "checkpoint.save_contents": "trainer.checkpoint.save_contents",
    "checkpoint.load_contents": "trainer.checkpoint.load_contents",
    "trainer.balance_batch": "data.balance_dp_token",
}

# That layout's defaults where they differ from ours (verl's sft_trainer_engine.yaml and the
# files it composes: model/hf_model.yaml, engine/fsdp.yaml, optim/fsdp.yaml). Written as its keys.
DEFAULTS: dict[str, Any] = {
    "data.use_dynamic_bsz": True,
    "data.pad_mode": "no_padding",
    "model.use_remove_padding": True,
    "optim.lr": 1e-3,
    "optim.betas": [0.9, 0.999],
    "optim.lr_scheduler_type": "constant",
    "trainer.project_name": "gsm8k-sft",
    "trainer.experiment_name": "test",
    "trainer.total_epochs": 4,
    "trainer.logger": ["console", "wandb"],
}

# Keys that this layout has and that we run exactly only at these values: the allowed values, and why.
ONLY: dict[str, tuple[tuple[Any, ...], str]] = {
    "engine.strategy": (("fsdp", "fsdp2"), "sft shards with FSDP2 (fsdp and fsdp2 both run as FSDP2)"),
    "engine.dtype": (("bfloat16",), "sft computes in bf16 on CUDA; float16 mixed precision is not supported"),
    "engine.fsdp_size": ((-1,), "sft shards over the whole world; hybrid sharding groups are not supported"),
    "engine.optimizer_offload": (
        (False,),
        "FSDP2's CPU offload moves parameters, gradients and the optimizer step together: use engine.param_offload",
    ),
    "engine.use_no_sync_for_gradient_accumulation": (
        (True,),
        "sft always reduces gradients once per optimizer step",
    ),
    "engine.full_determinism": ((False,), "full determinism mode is not implemented"),
    "engine.pad_to_length": ((False,), "packed rows are never padded to buckets here"),
    "engine.forward_only": ((False,), "sft trains; evaluation runs through data.val_files"),
    "engine.qat.enable": ((False,), "quantization-aware training is not supported"),
    "model.enable_activation_offload": (
        (False,),
        "activation offload is not implemented; use gradient checkpointing or a smaller token budget",
    ),
    "model.tiled_mlp.enabled": ((False,), "TiledMLP is not implemented; use a smaller token budget"),
    "model.mtp.enable": ((False,), "multi-token prediction is not supported"),
    "model.hf_config_path": ((None,), "put config.json in model.path"),
    "optim.optimizer": (("AdamW",), "sft trains with torch's AdamW"),
    "optim.optimizer_impl": (("torch.optim",), "sft trains with torch's AdamW"),
    "optim.override_optimizer_config": ((None,), "optimizer options beyond lr/betas/weight_decay are not supported"),
    "optim.total_training_steps": ((-1,), "set trainer.total_training_steps instead"),
    "optim.zero_indexed_step": ((True,), "the schedule counts steps from 0"),
    "optim.warmup_style": ((None,), "deprecated in verl: use optim.lr_scheduler_type"),
    "trainer.profile_interval": (([-1, -1],), "use python -m sft.bench --profile for a profile"),
    "data.multiturn.enable": ((True,), "this layout reads messages data only"),
    # Hydra group choices of that layout: only the FSDP engine and its own model/optimizer files.
    "engine": (("fsdp",), "sft runs FSDP2; the megatron, automodel, veomni and torchtitan engines are not supported"),
    "model": (("hf_model",), "sft loads Hugging Face models"),
    "optim": (("fsdp",), "sft trains with torch's AdamW"),
}

# Keys that change nothing here, with why; said once in the log when given.
NO_EFFECT = {
    "data.ignore_input_ids_mismatch": "sft renders the whole conversation once, so ids never mismatch",
    "data.num_workers": "rows are tokenised once before training; batches need no loader workers",
    "data.balance_dp_token": "the loss is always the exact token mean of the global batch",
    "model.truncate_padding": "padding is never computed on with remove-padding",
    "model.use_fused_kernels": "the fused cross-entropy is chosen automatically (model.use_liger)",
    "model.fused_kernel_options.impl_backend": "the fused cross-entropy is chosen automatically (model.use_liger)",
    "model.tiled_mlp.num_shards": "TiledMLP is not implemented",
    "engine.forward_prefetch": "an FSDP1 option; FSDP2 prefetches by itself",
    "engine.use_orig_params": "an FSDP1 option",
    "engine.entropy_from_logits_with_chunking": "an RL option; SFT computes no entropy from logits",
    "engine.entropy_from_logits_chunk_size": "an RL option; SFT computes no entropy from logits",
    "engine.entropy_checkpointing": "an RL option; SFT computes no entropy from logits",
    "engine.pad_to_length_bucket": "packed rows are never padded to buckets here",
}

# Key prefixes of that layout with no counterpart here, refused with the reason.
REFUSED = {
    "engine.turbo_config": "the fsdp_turbo engine is not supported; sft runs FSDP2",
    "model.mtp": "multi-token prediction is not supported",
    "engine.qat": "quantization-aware training is not supported",
    "profiler": "use python -m sft.bench --profile for a profile",
    "megatron": "sft runs FSDP2 only (engine=fsdp)",
    "data.processor": "sft uses the model folder's own processor (its preprocessor_config.json)",
    "data.prompt_key": "this layout reads messages data only (use sft.fsdp_sft_trainer for prompt/response)",
    "data.response_key": "this layout reads messages data only (use sft.fsdp_sft_trainer for prompt/response)",
    "data.prompt_dict_keys": "this layout reads messages data only (use sft.fsdp_sft_trainer for prompt/response)",
    "data.response_dict_keys": "this layout reads messages data only (use sft.fsdp_sft_trainer for prompt/response)",
}


@dataclass
class Given:
    key: str  # as typed
    text: str  # the value as typed (Hydra syntax)
    value: Any  # parsed


def _parse(overrides: list[str]) -> list[Given]:
    parsed = OverridesParser.create().parse_overrides(list(overrides))
    out = []
    for raw, o in zip(overrides, parsed):
        if o.is_delete():
            raise ConfigError(f"{raw}: deleting keys is not supported; set the key to a value instead")
        out.append(Given(o.key_or_group, raw.split("=", 1)[1], o.value()))
    return out


def _our_keys(node: Any, prefix: str = "") -> set[str]:
    """Every dotted key of our layout, read off a default instance of the schema."""
    keys = set()
    for f in fields(node):
        value = getattr(node, f.name)
        if is_dataclass(value):
            keys |= _our_keys(value, f"{prefix}{f.name}.")
        keys.add(f"{prefix}{f.name}")
    return keys


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "null"
    if isinstance(value, list):
        return "[" + ",".join(_text(v) for v in value) + "]"
    return str(value)


def translate(overrides: list[str]) -> tuple[list[str], list[str]]:
    """That layout's overrides -> (ours, notes for the log); raises ConfigError in one line."""
    given = _parse(overrides)
    notes: list[str] = []
    effective: dict[str, Any] = dict(DEFAULTS)
    targets: dict[str, tuple[str, Any, str]] = {}  # our key -> (text, value, the key that set it)

    def put(target: str, text: str, value: Any, source: str) -> None:
        if target in targets and targets[target][1] != value:
            raise ConfigError(
                f"{source}={text} and {targets[target][2]}={targets[target][0]} set the same thing ({target}) "
                "to different values; give one of them"
            )
        targets[target] = (text, value, source)

    for g in given:
        effective[g.key] = g.value
    for g in given:
        key = g.key
        if key in ONLY:
            allowed, why = ONLY[key]
            if g.value not in allowed:
                raise ConfigError(f"{key}={g.text} is not supported: {why}")
            continue
        if key in NO_EFFECT:
            notes.append(f"{key}={g.text}: nothing to do here: {NO_EFFECT[key]}")
            continue
        refused = next((p for p in REFUSED if key == p or key.startswith(p + ".")), None)
        if refused is not None:
            raise ConfigError(f"{key} is not supported: {REFUSED[refused]}")
        if key in SPECIAL:
            continue
        if key in RENAMED:
            put(RENAMED[key], g.text, g.value, key)
        elif key in _OUR_KEYS or _is_dict_entry(key):
            put(key, g.text, g.value, key)
        else:
            raise ConfigError(
                f"unknown config key '{key}': it is in neither verl's sft_trainer layout nor "
                "sft/config/sft_trainer.yaml; check the spelling"
            )
    # A key of ours that stands for one of that layout's keys counts as that key for the rules below.
    for theirs, target in RENAMED.items():
        if target in targets and targets[target][2] == target:
            effective[theirs] = targets[target][1]
    given_keys = {g.key for g in given}
    for key, value in DEFAULTS.items():
        if key in given_keys or key in SPECIAL:
            continue
        target = RENAMED.get(key, key)
        if target not in targets:
            put(target, _text(value), value, f"{key} (that layout's default)")
    for key, rule in SPECIAL.items():
        for target, value in rule(effective).items():
            put(target, _text(value), value, key)
    if "engine.use_torch_compile" not in effective:
        notes.append(COMPILE_NOTE)
    out = [f"++{t}={text}" if _is_dict_entry(t) else f"{t}={text}" for t, (text, _, _) in targets.items()]
    return out, notes


def _is_dict_entry(key: str) -> bool:
    return key.startswith("data.apply_chat_template_kwargs.") or key.startswith("model.override_config.")


def _budget(e: dict[str, Any]) -> dict[str, Any]:
    # A typed max_token_len_per_gpu with use_dynamic_bsz=true is the user's cap on the token budget.
    # That layout's own default (8192) is not: sft chooses the budget for everyone (at least
    # micro_batch_size_per_gpu x max_length, more when the GPU has room) and logs the choice.
    if e["data.use_dynamic_bsz"] and e.get("data.max_token_len_per_gpu") is not None:
        return {"data.max_token_len_per_gpu": e["data.max_token_len_per_gpu"]}
    return {}


def _padding(e: dict[str, Any]) -> dict[str, Any]:
    mode, rmpad = e["data.pad_mode"], e["model.use_remove_padding"]
    if mode not in ("no_padding", "right"):
        raise ConfigError(f"data.pad_mode={mode}: choose no_padding or right")
    if mode == "no_padding" and not rmpad:
        raise ConfigError("data.pad_mode=no_padding needs model.use_remove_padding=true (or data.pad_mode=right)")
    return {}


def _thinking(e: dict[str, Any]) -> dict[str, Any]:
    # Rows without the enable_thinking column get this value; `none` leaves the template's own default.
    value = e.get("data.enable_thinking_default", "none")
    if value in (None, "none", "None"):
        return {}
    if not isinstance(value, bool):
        raise ConfigError(f"data.enable_thinking_default={value}: choose none, true or false")
    return {"data.apply_chat_template_kwargs.enable_thinking": value}


def _wsd(e: dict[str, Any]) -> dict[str, Any]:
    # That layout names the stable share of the post-warmup steps; ours names the decay share.
    if "optim.lr_wsd_stable_steps_ratio" not in e:
        return {}
    return {"optim.wsd_decay_ratio": round(1.0 - float(e["optim.lr_wsd_stable_steps_ratio"]), 12)}


# That layout compiles by default. Here a compile nobody typed is not turned on: on the 1.5B benchmark shape
# (one H100, verl's multi-turn example keys) compiled layers ran 14 % slower than eager, with 29 s more before
# the first step (README 'model.compile'). A typed value is kept (a typed true on CPU is refused by the checks).
COMPILE_NOTE = (
    "engine.use_torch_compile not given: not compiled here, unlike verl (compiled layers measured slower than "
    "eager on our benchmark); engine.use_torch_compile=true compiles"
)


def _compile(e: dict[str, Any]) -> dict[str, Any]:
    if "engine.use_torch_compile" in e:
        return {"model.compile": bool(e["engine.use_torch_compile"])}
    return {}


def _messages(e: dict[str, Any]) -> dict[str, Any]:
    return {"data.multiturn.enable": True}


# Keys whose value is decided from several keys together (the rule reads them all); listing a key
# here also keeps it out of the plain renaming above.
SPECIAL = {
    "data.use_dynamic_bsz": _budget,
    "data.max_token_len_per_gpu": lambda e: {},  # read by _budget
    "data.pad_mode": _padding,
    "data.enable_thinking_default": _thinking,
    "data.multiturn.enable": _messages,  # always on: that layout reads messages only
    "engine.use_torch_compile": _compile,
    "optim.lr_wsd_stable_steps_ratio": _wsd,
}

_OUR_KEYS = _our_keys(SFTConfig(), "")
