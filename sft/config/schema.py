"""Typed configuration of the trainer: the one source of defaults.

Each section is a dataclass registered with Hydra's ConfigStore; `sft/config/sft_trainer.yaml`
layers the user-facing values on top, and the command line overrides both. `load_config`
composes the three and returns real dataclasses. Validation that needs no model or process
group lives in `sft/config/checks.py`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from hydra import compose, initialize_config_module
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from omegaconf import MISSING, OmegaConf

# Allowed values of the string keys below: the one list each, read by the checks and by the code that acts on them.
TRAIN_ON = ("all", "last")  # data.multiturn.train_on
TRUNCATIONS = ("left", "right", "error")  # data.truncation
ON_BAD_SAMPLE = ("error", "skip")  # data.on_bad_sample
# model.fsdp_config.model_dtype (verl's short and long names); trainer.checkpoint.hf_dtype takes the short ones.
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
HF_DTYPES = ("bf16", "fp32")
GRADIENT_CHECKPOINTING_MODES = ("auto", "full", "selective")  # model.gradient_checkpointing_mode
EXPERTS_IMPLEMENTATIONS = ("grouped_mm", "eager")  # model.experts_implementation
FP8_RECIPES = ("tensorwise", "rowwise")  # model.fp8 names one (true: sft/ops/fp8.py's choice; false: off)
SCHEDULERS = ("constant", "cosine", "wsd")  # optim.lr_scheduler
CONTENTS = ("model", "optimizer", "extra", "hf_model")  # trainer.checkpoint.save_contents / load_contents
RESUME_MODES = ("auto", "disable", "resume_path")  # trainer.resume_mode
DEVICES = ("auto", "cpu", "cuda")  # trainer.device
# model.attn_kernel's choices are the kernel table's (sft/models/attention/kernels.py: CHOICES).


@dataclass
class MultiTurnConfig:
    enable: bool = False
    messages_key: str = "messages"
    tools_key: str = "tools"
    enable_thinking_key: str = "enable_thinking"
    # Which assistant turns are trained by default: all of them, or only the last one.
    train_on: str = "all"


@dataclass
class CustomClsConfig:
    path: str | None = None
    name: str | None = None


@dataclass
class DataConfig:
    # A path or a list of paths (Any because OmegaConf has no Union).
    train_files: Any = MISSING
    val_files: Any = None
    train_batch_size: int = 256
    micro_batch_size_per_gpu: int = 4
    # Token budget per GPU per micro-batch (packed mode): replaces the fixed sample count.
    max_token_len_per_gpu: int | None = None
    # verl's deprecated global micro-batch: rejected with a pointer to the per-GPU key.
    micro_batch_size: int | None = None
    train_max_samples: int = -1
    val_max_samples: int = -1
    prompt_key: str = "prompt"
    response_key: str = "response"
    prompt_dict_keys: list[str] | None = None
    response_dict_keys: list[str] | None = None
    multiturn: MultiTurnConfig = field(default_factory=MultiTurnConfig)
    max_length: int = 1024
    truncation: str = "error"
    # A bad row (schema, role, content, length, template): stop with its file and row, or skip it.
    on_bad_sample: str = "error"
    # The loss is always the exact global token mean; false (a mean of per-rank means) is refused.
    balance_dp_token: bool = True
    chat_template: str | None = None
    custom_cls: CustomClsConfig = field(default_factory=CustomClsConfig)
    use_shm: bool = False
    apply_chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    # Tokenised cache: reused by every launch with the same inputs (false: tokenize every launch).
    cache: bool = True
    # Where the cache lives; null: <trainer.default_local_dir>/data_cache.
    cache_dir: str | None = None
    # Vision-language rows (multi-turn, a multimodal checkpoint): the column of each row's images (verl's layout:
    # `<image>` placeholders in the messages; or {"type": "image"} content parts), and of its videos (refused).
    image_key: str = "images"
    video_key: str = "videos"


@dataclass
class WrapPolicyConfig:
    min_num_params: int = 0


@dataclass
class FSDPConfig:
    model_dtype: str = "fp32"
    cpu_offload: bool = False
    # verl spells parameter offload both ways; both mean FSDP2's CPUOffloadPolicy here.
    offload_params: bool = False
    reshard_after_forward: bool = True
    wrap_policy: WrapPolicyConfig = field(default_factory=WrapPolicyConfig)


@dataclass
class ModelConfig:
    partial_pretrain: str = MISSING
    # A folder to read the tokenizer from when it is not the model folder.
    tokenizer_path: str | None = None
    # Entries written over the model's config.json at load (e.g. {attention_dropout: 0.0}); each must exist.
    override_config: dict[str, Any] = field(default_factory=dict)
    trust_remote_code: bool = False
    enable_gradient_checkpointing: bool = True
    # With checkpointing on: `full` recomputes each decoder layer in the backward; `selective`
    # keeps matmul and attention outputs and recomputes only norms, activations and rotary.
    gradient_checkpointing_mode: str = "auto"
    strategy: str = "fsdp2"
    external_lib: str | None = None
    use_shm: bool = False
    fsdp_config: FSDPConfig = field(default_factory=FSDPConfig)
    lora_rank: int = 0
    lora_alpha: int = 16
    target_modules: Any = "all-linear"
    # Module names (or one regex) that LoRA leaves alone, even when target_modules matches them.
    exclude_modules: Any = None
    lora_adapter_path: str | None = None
    # Fused kernels: Liger's Triton SwiGLU/RoPE, and RMSNorm on PyTorch's fused forward with sft's
    # one-pass backward (Gemma's offset norms on Liger's): true (required), false, or auto (on when
    # the run is on CUDA, liger-kernel is installed and supports the model type).
    use_liger: Any = "auto"
    # torch.compile each decoder layer (fuses norms, activations and rotary into fewer kernels).
    compile: bool = False
    # The CUDA kernel of packed attention: auto (the fastest installed that runs on this GPU: fa4, then
    # flash_attn, then torch), fa4, flash_attn or torch (sft/models/attention/kernels.py).
    attn_kernel: str = "auto"
    # MoE families (README 'Supported model families'): experts as grouped GEMMs (grouped_mm) or the
    # per-expert loop (eager); the router load-balancing loss coefficient (null: the model config's).
    experts_implementation: str = "grouped_mm"
    router_aux_loss_coef: float | None = None
    # FP8 GEMMs in the decoder's linear layers (torchao, `pip install 'sft[fp8]'`; CUDA compute capability 8.9+):
    # false, true (sft's choice: tensorwise), tensorwise or rowwise (sft/ops/fp8.py). Any because OmegaConf has no Union.
    fp8: Any = False
    # Vision-language SFT (images in the data): keep the vision tower / the projector (merger) unchanged.
    freeze_vision_tower: bool = False
    freeze_projector: bool = False


@dataclass
class OptimConfig:
    lr: float = 1e-5
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    weight_decay: float = 0.01
    lr_warmup_steps_ratio: float = 0.0
    # -1: use lr_warmup_steps_ratio (verl's convention).
    lr_warmup_steps: int = -1
    clip_grad: float = 1.0
    lr_scheduler: str = "cosine"
    min_lr_ratio: float = 0.0
    num_cycles: float = 0.5
    wsd_decay_ratio: float = 0.1


@dataclass
class CheckpointConfig:
    save_contents: list[str] = field(default_factory=lambda: ["model", "optimizer", "extra"])
    load_contents: list[str] = field(default_factory=lambda: ["model", "optimizer", "extra"])
    # dtype of the safetensors weights in huggingface/ (with hf_model): bf16, or fp32 for exact copies.
    hf_dtype: str = "bf16"


@dataclass
class TrainerConfig:
    default_local_dir: str = "checkpoints/${trainer.project_name}/${trainer.experiment_name}"
    default_hdfs_dir: str | None = None
    project_name: str = "sft"
    experiment_name: str = "run"
    total_epochs: int = 1
    total_training_steps: int | None = None
    logger: list[str] = field(default_factory=lambda: ["console"])
    seed: int = 1
    save_freq: int = -1
    test_freq: int = -1
    # verl's launch bookkeeping: checked against the real torchrun world when set.
    nnodes: int | None = None
    n_gpus_per_node: int | None = None
    max_ckpt_to_keep: int | None = None
    resume_mode: str = "auto"
    resume_from_path: str | None = None
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    device: str = "auto"
    # After SIGTERM/SIGUSR1: seconds allowed to finish the step and save before exiting anyway.
    preempt_grace_s: float = 300.0
    # Seconds a collective may wait for the other ranks (NCCL/gloo) before the run fails.
    dist_timeout_s: int = 1800


@dataclass
class SFTConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    ulysses_sequence_parallel_size: int = 1
    # Packed, padding-free rows with an automatic token budget (sft/loop/budget.py); false pads (slower).
    use_remove_padding: bool = True


SCHEMA_NAME = "sft_trainer_schema"


def _register() -> None:
    ConfigStore.instance().store(name=SCHEMA_NAME, node=SFTConfig)


def load_config(overrides: list[str], config_name: str = "sft_trainer") -> SFTConfig:
    """Compose schema + YAML + command-line overrides into a typed `SFTConfig`.

    Hydra raises on unknown keys and wrong types, naming the key; the caller turns those
    into one-line errors.
    """
    _register()
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="sft.config", version_base=None):
        cfg = compose(config_name=config_name, overrides=list(overrides))
    OmegaConf.resolve(cfg)
    _reject_unknown_keys(cfg, SFTConfig)
    return OmegaConf.to_object(cfg)


def _reject_unknown_keys(node: Any, schema: type, prefix: str = "") -> None:
    """`+key=value` appends past the schema and OmegaConf.to_object would drop it: refuse instead."""
    fields = {f.name: f for f in dataclasses.fields(schema)}
    for key in node.keys():
        if key not in fields:
            raise ValueError(
                f"unknown config key '{prefix}{key}': it is not in sft/config/sft_trainer.yaml; check the spelling"
            )
        sub = node[key] if OmegaConf.is_dict(node) else None
        ftype = fields[key].type
        target = ftype if isinstance(ftype, type) else globals().get(str(ftype))
        if target is not None and dataclasses.is_dataclass(target) and OmegaConf.is_config(sub):
            _reject_unknown_keys(sub, target, f"{prefix}{key}.")


def to_dict(cfg: SFTConfig) -> dict:
    """Plain nested dict of the config (for loggers and checkpoints)."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
