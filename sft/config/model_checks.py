"""Checks of the `model` section and of the model folder, before any weight or tokenizer loads.

Keys (strategy, dtypes, checkpointing mode, Liger, attention kernel, LoRA) are checked from the config alone; the
folder from its json files only (config, weights present, tokenizer, chat template); the
tokenizer's vocabulary against the embedding once both are loaded (`check_vocab`).
"""

from __future__ import annotations

import copy
import functools
import json
from collections.abc import Callable
from pathlib import Path

from transformers import PretrainedConfig

from sft.config.errors import ConfigError, either, need, one_line
from sft.config.schema import DTYPES, EXPERTS_IMPLEMENTATIONS, GRADIENT_CHECKPOINTING_MODES, ModelConfig, SFTConfig
from sft.data.vision_rows import has_image_column
from sft.models.attention.kernels import CHOICES as ATTN_CHOICES
from sft.models.attention.kernels import KERNELS as ATTN_KERNELS
from sft.models.attention.kernels import installed as attn_installed
from sft.models.families import needs_probe, recurrent_spec, training_noise, unsupported_reason
from sft.models.loading import load_hf_config
from sft.models.multimodal import build_text_only, is_multimodal, model_class_name, weight_files
from sft.models.probe import probe_reason
from sft.models.recurrent.install import sp_reason
from sft.models.rope_switch import longrope_switch, switch_length
from sft.models.vision import vision_reason
from sft.ops.patch import check_liger
from sft.parallel.distributed import resolve_device_type


def _check_model(cfg: SFTConfig) -> None:
    m = cfg.model
    p = Path(m.partial_pretrain).expanduser()
    need(
        p.is_dir(),
        f"model.partial_pretrain={m.partial_pretrain}: not a directory; give a local Hugging Face model folder",
    )
    need(
        m.strategy == "fsdp2",
        f"model.strategy={m.strategy!r}: sft supports FSDP2 only; set model.strategy=fsdp2 (or remove the key)",
    )
    need(
        m.fsdp_config.model_dtype in DTYPES,
        f"model.fsdp_config.model_dtype={m.fsdp_config.model_dtype!r}: choose {either(DTYPES)}",
    )
    need(
        m.fsdp_config.wrap_policy.min_num_params == 0,
        f"model.fsdp_config.wrap_policy.min_num_params={m.fsdp_config.wrap_policy.min_num_params}: sft shards each "
        "decoder layer and the root; size-based wrapping is not supported, remove the key",
    )
    need(not m.use_shm, "model.use_shm=true: shared-memory model copies are not supported; use a local model folder")
    defaults = ModelConfig(partial_pretrain="")
    if m.lora_rank == 0:
        for key in ("lora_alpha", "target_modules", "exclude_modules", "lora_adapter_path"):
            need(
                getattr(m, key) == getattr(defaults, key),
                f"model.{key}={getattr(m, key)!r} is set but model.lora_rank=0: set model.lora_rank>0 to use LoRA "
                f"or remove model.{key}",
            )
    need(m.lora_rank >= 0, f"model.lora_rank={m.lora_rank}: must be >= 0")
    if m.lora_rank > 0:
        _check_lora(m)
    need(
        m.gradient_checkpointing_mode in GRADIENT_CHECKPOINTING_MODES,
        f"model.gradient_checkpointing_mode={m.gradient_checkpointing_mode!r}: "
        f"choose {either(GRADIENT_CHECKPOINTING_MODES)}",
    )
    need(
        m.enable_gradient_checkpointing or m.gradient_checkpointing_mode in ("auto", "full"),
        f"model.gradient_checkpointing_mode={m.gradient_checkpointing_mode} needs "
        "model.enable_gradient_checkpointing=true (or remove the mode)",
    )
    need(
        m.use_liger in (True, False, "auto"),
        f"model.use_liger={m.use_liger!r}: choose true, false or auto",
    )
    need(
        not (m.compile and m.gradient_checkpointing_mode == "selective"),
        "model.gradient_checkpointing_mode=selective with model.compile=true: the compiled layer hides its matmuls "
        "from the checkpoint policy; use gradient_checkpointing_mode=full with compile",
    )
    need(
        m.attn_kernel in ATTN_CHOICES,
        f"model.attn_kernel={m.attn_kernel!r}: choose one of {', '.join(ATTN_CHOICES)}",
    )
    if m.attn_kernel != "auto":
        need(
            cfg.use_remove_padding,
            f"model.attn_kernel={m.attn_kernel} picks the packed-attention kernel, which only use_remove_padding=true "
            "runs; set use_remove_padding=true or model.attn_kernel=auto",
        )
        need(
            resolve_device_type(cfg.trainer.device) == "cuda",
            f"model.attn_kernel={m.attn_kernel}: attention kernels run on CUDA GPUs; set model.attn_kernel=auto",
        )
        need(
            ATTN_KERNELS[m.attn_kernel].traceable or not m.compile,
            f"model.attn_kernel={m.attn_kernel} with model.compile=true: torch.compile cannot trace "
            f"{ATTN_KERNELS[m.attn_kernel].title}; use model.attn_kernel=auto (a traceable kernel) or model.compile=false",
        )
        need(
            attn_installed(m.attn_kernel),
            f"model.attn_kernel={m.attn_kernel}: {ATTN_KERNELS[m.attn_kernel].title} is not installed "
            f"({ATTN_KERNELS[m.attn_kernel].install}); or set model.attn_kernel=auto",
        )
    need(
        m.experts_implementation in EXPERTS_IMPLEMENTATIONS,
        f"model.experts_implementation={m.experts_implementation!r}: choose {either(EXPERTS_IMPLEMENTATIONS)}",
    )
    need(
        m.router_aux_loss_coef is None or m.router_aux_loss_coef >= 0,
        f"model.router_aux_loss_coef={m.router_aux_loss_coef}: must be >= 0 (or null for the model config's)",
    )
    need(
        not (m.compile and m.use_liger is True),
        "model.use_liger=true with model.compile=true: torch.compile cannot trace Liger's kernels (it fails inside "
        "LigerRMSNormFunction); use model.use_liger=auto (compile fuses the norms itself) or model.compile=false",
    )
    need(
        not (m.compile and resolve_device_type(cfg.trainer.device) == "cpu"),
        "model.compile=true on CPU: compiling the layers is supported on CUDA only (on CPU it takes minutes and "
        "fails under gloo); set model.compile=false",
    )
    if m.use_liger is True:
        try:
            check_liger(resolve_device_type(cfg.trainer.device))
        except ValueError as exc:
            raise ConfigError(str(exc)) from None


def _check_lora(m: ModelConfig) -> None:
    """LoRA keys that need no model; module names are checked against the model (on meta) when it is built."""
    need(m.lora_alpha > 0, f"model.lora_alpha={m.lora_alpha}: must be > 0 (the update is scaled by alpha / rank)")
    t = m.target_modules
    need(
        (isinstance(t, str) and bool(t)) or (isinstance(t, list) and bool(t) and all(isinstance(x, str) for x in t)),
        f"model.target_modules={t!r}: give all-linear or a list of module names, e.g. [q_proj,v_proj]",
    )
    if m.lora_adapter_path is None:
        return
    p = Path(m.lora_adapter_path).expanduser()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        need(
            (p / name).is_file(),
            f"model.lora_adapter_path={p}: no {name} in it; point it at a folder PeftModel.save_pretrained wrote "
            "(e.g. a checkpoint's global_step_N/lora_adapter)",
        )
    try:
        saved = json.loads((p / "adapter_config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"model.lora_adapter_path: cannot read {p / 'adapter_config.json'}: {exc}") from exc
    for key, ours in (("r", m.lora_rank), ("lora_alpha", m.lora_alpha)):
        cfg_key = "lora_rank" if key == "r" else key
        need(
            saved.get(key) == ours,
            f"model.lora_adapter_path={p}: the adapter has {key}={saved.get(key)} but model.{cfg_key}={ours}; "
            f"set model.{cfg_key}={saved.get(key)}",
        )


WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"model.partial_pretrain: cannot read {path}: {exc}; repair or replace the file") from exc


def _has_chat_template(folder: Path) -> bool:
    """transformers reads the template from any of these places (checked without loading the tokenizer)."""
    if (folder / "chat_template.jinja").is_file() or (folder / "additional_chat_templates").is_dir():
        return True
    for name in ("chat_template.json", "tokenizer_config.json"):
        f = folder / name
        if f.is_file() and _read_json(f).get("chat_template"):
            return True
    return False


def _check_model_folder(cfg: SFTConfig) -> None:
    """Checks of the model folder before any weight loads: its json files, then what the config implies (towers
    built on the meta device, the safetensors headers of a multimodal checkpoint, the rotary switch, and the packing
    probe's tiny model for an unlisted type), so a broken folder or an inexact model fails in seconds."""
    p = Path(cfg.model.partial_pretrain).expanduser()
    need(
        (p / "config.json").is_file(),
        f"model.partial_pretrain={p}: not a Hugging Face model folder: no config.json in {p}",
    )
    config = _read_json(p / "config.json")
    need(
        any(any(p.glob(pat)) for pat in WEIGHT_PATTERNS),
        f"model.partial_pretrain={p}: no weights in {p}; expected model.safetensors or pytorch_model.bin "
        "(or sharded files with their .index.json), as save_pretrained writes them",
    )
    key, tp = "model.partial_pretrain", p
    if cfg.model.tokenizer_path:
        key, tp = "model.tokenizer_path", Path(cfg.model.tokenizer_path).expanduser()
    need(
        any((tp / f).is_file() for f in TOKENIZER_FILES),
        f"{key}={tp}: no tokenizer files in {tp} (expected one of {', '.join(TOKENIZER_FILES)}); "
        "copy the tokenizer of the model into the folder (tokenizer.save_pretrained)",
    )
    need(
        not cfg.data.multiturn.enable or bool(cfg.data.chat_template) or _has_chat_template(tp),
        f"data.multiturn.enable=true but the tokenizer in {tp} has no chat template; set data.chat_template "
        "or add chat_template to tokenizer_config.json",
    )
    reason = unsupported_reason(config)
    need(reason is None, f"model.partial_pretrain={p}: {reason}")
    # The model's config as the trainer will build it (override_config applied), read once and only when a check
    # below needs it: the towers, the frozen-tensor plan, the rotary check and the probe.
    hf_config = functools.cache(lambda: load_hf_config(cfg))
    images = has_image_column(cfg.data.train_files, cfg.data.image_key)
    if images:
        need(
            cfg.data.multiturn.enable,
            f"data.image_key={cfg.data.image_key}: the data has images, and vision-language SFT reads multi-turn "
            "rows: set data.multiturn.enable=true (or name another column in data.image_key)",
        )
        _check_vision(cfg, p, config)
    if is_multimodal(config):
        _check_multimodal(p, config, cfg, hf_config, images)
        config = config["text_config"]  # the trained model: the checks below are about it
    # Hybrid models: each SP rank takes a share of the recurrent layers' heads; refuse a size that cannot be exact.
    recurrent = recurrent_spec(config.get("model_type"))
    reason = recurrent and sp_reason(config, recurrent, cfg.ulysses_sequence_parallel_size)
    need(not reason, f"model.partial_pretrain={p}: {reason}")
    _check_layers_declared(p, config, cfg.model.trust_remote_code)
    vocab = config.get("vocab_size")
    need(
        vocab is None or (isinstance(vocab, int) and vocab > 0),
        f"model.partial_pretrain={p}: config.json has vocab_size={vocab!r}; it must be a positive integer",
    )
    # Dropout and router jitter draw random numbers laid out by how a batch is split over ranks, micro-batches and
    # packed rows, so no run with them is exact (and sft's packed attention applies no dropout): refuse them now.
    noise = training_noise({**config, **cfg.model.override_config})
    need(
        not noise,
        f"model.partial_pretrain={p}: config.json sets {', '.join(f'{k}={v}' for k, v in noise.items())}: dropout "
        "and router jitter are random in a layout that depends on how each batch is split and packed, so the loss "
        "would not be exact; set " + " ".join(f"+model.override_config.{k}=0.0" for k in noise),
    )
    _check_rope_switch(p, cfg, hf_config(), images)
    if needs_probe(config, cfg.model.trust_remote_code):
        # Outside the table (or remote code): measure that sft trains it exactly, before any weight loads (last:
        # it builds a small model, a second or two).
        reason = probe_reason(
            hf_config(), cfg.use_remove_padding, cfg.ulysses_sequence_parallel_size, cfg.model.trust_remote_code
        )
        need(reason is None, f"model.partial_pretrain={p}: {reason}")


def _check_layers_declared(p: Path, config: dict, trust_remote_code: bool) -> None:
    """FSDP shards the blocks a model class names in `_no_split_modules` (sft/parallel/fsdp.py): a class without them
    is refused here, before the data is tokenised, rather than when the model is built."""
    if trust_remote_code and config.get("auto_map"):
        return  # the class comes with the checkpoint: known only once imported
    import transformers
    from transformers.models.auto import modeling_auto

    model_type = config.get("model_type")
    names = [
        *(config.get("architectures") or []),
        modeling_auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES.get(model_type),
        modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type),
    ]
    classes = [c for c in (getattr(transformers, n, None) for n in names if isinstance(n, str)) if c is not None]
    need(
        not classes or any(getattr(c, "_no_split_modules", None) for c in classes),
        f"model.partial_pretrain={p}: {classes[0].__name__ if classes else model_type} declares no "
        "`_no_split_modules`, so sft cannot find its decoder layers to shard; this architecture is not supported",
    )


def _check_vision(cfg: SFTConfig, p: Path, config: dict) -> None:
    """Images in the data (the data.image_key column): a multimodal checkpoint of a supported family."""
    key = f"data.image_key={cfg.data.image_key}"
    need(
        is_multimodal(config),
        f"{key}: the data has images but model.partial_pretrain={p} is a text-only model ({config.get('model_type')}); "
        "use a vision-language checkpoint, or drop the column to train on text",
    )
    reason = vision_reason(config)
    need(reason is None, f"{key}: {reason}")
    need(not cfg.model.compile, "model.compile=true with images in the data is not supported yet; set it false")
    need(not cfg.model.fp8, "model.fp8 with images in the data is not supported yet; set it false")


def _check_multimodal(
    p: Path, config: dict, cfg: SFTConfig, hf_config: Callable[[], PretrainedConfig], images: bool
) -> None:
    """A multimodal checkpoint trains its text model with its own class, and copies its vision tensors byte for
    byte: the class must exist, its towers must build here, and the weights must be safetensors
    (sft/models/multimodal.py)."""
    need(
        model_class_name(config) is not None,
        f"model.partial_pretrain={p}: transformers has no class for model_type={config.get('model_type')!r} "
        f"(architectures={config.get('architectures')}); sft trains multimodal checkpoints with their own "
        "transformers class: upgrade transformers",
    )
    _check_towers_build(p, hf_config())  # read only once the class is known to exist
    need(
        bool(weight_files(p)),
        f"model.partial_pretrain={p}: a multimodal checkpoint needs safetensors weights (model.safetensors or an "
        "index), since sft copies its vision tensors byte for byte; re-save it with save_pretrained",
    )
    if not images:
        # Text only: which stored tensors stay frozen is planned from the files' headers now (the same plan the
        # model build makes), so a layout sft cannot map is refused before the data is tokenised.
        import torch

        lora_targets = cfg.model.target_modules if cfg.model.lora_rank > 0 else None
        try:
            with torch.device("meta"):
                build_text_only(hf_config(), p, lora_targets)
        except ValueError as exc:  # the plan's own refusal names the folder
            need(False, one_line(exc)[:300])
        except Exception as exc:  # noqa: BLE001 - a weights file whose header cannot be read
            need(False, f"model.partial_pretrain={p}: its safetensors headers cannot be read: {one_line(exc)[:300]}")


def _check_rope_switch(p: Path, cfg: SFTConfig, hf_config: PretrainedConfig, images: bool) -> None:
    """Rotary embeddings that pick their frequencies by the longest sequence in the batch. A model-wide `longrope`
    (Phi-3/3.5/4-mini 128k) is given each sample's own set (sft/models/rope_switch.py). Past the switch length, what
    that does not cover would give a short sample other positions beside a long one, so it is refused unless no
    sample can pass the switch: `dynamic` NTK (a continuous rescale), longrope keyed by layer type, and longrope
    with images in the data."""
    text = hf_config.get_text_config()
    params = getattr(text, "rope_parameters", None) or {}
    per_layer = bool(params) and all(isinstance(v, dict) for v in params.values())  # keyed by layer type
    for rope in params.values() if per_layer else [params]:
        kind = rope.get("rope_type")
        if kind == "longrope":
            if switch_length(text) is not None and not images:
                continue
            switch = longrope_switch(rope, text) or 0
        elif kind == "dynamic":
            switch = text.max_position_embeddings
        else:
            continue
        need(
            cfg.data.max_length <= switch,
            f"model.partial_pretrain={p}: its rotary embedding ({kind}) switches frequencies once the longest "
            f"sequence of a batch passes {switch} tokens, so with data.max_length={cfg.data.max_length} a sample's "
            f"positions would depend on which samples share its batch; set data.max_length<={switch}",
        )


def _check_towers_build(p: Path, hf_config: PretrainedConfig) -> None:
    """The checkpoint's class builds its vision (and audio) towers even when only its text model trains: a tower
    that needs a package this environment lacks (timm for Perception LM's and FastVLM's) would fail only at load,
    after the data is tokenised. Each tower is built here on the meta device (no memory, a fraction of a second)."""
    import torch
    from transformers import AutoModel

    text = hf_config.get_text_config()
    for name, sub in vars(hf_config).items():
        if not isinstance(sub, PretrainedConfig) or sub is text:
            continue
        try:
            with torch.device("meta"):
                AutoModel.from_config(copy.deepcopy(sub))  # a copy: from_config records its choices in the config
        except ImportError as exc:
            need(
                False,
                f"model.partial_pretrain={p}: its {name} ({sub.model_type}) cannot be built: {one_line(exc)[:300]}",
            )
        except (ValueError, KeyError):
            pass  # no AutoModel class for this sub-config: the checkpoint's own class builds it (sft/models/multimodal.py)


def check_vocab(tokenizer, hf_config) -> None:
    """Token ids beyond the embedding would index out of range (a CUDA assert, or garbage): refuse early."""
    hf_config = hf_config.get_text_config()  # a multimodal checkpoint's embedding is its text model's
    rows = getattr(hf_config, "vocab_size", None)
    n = len(tokenizer)
    need(
        rows is None or n <= rows,
        f"tokenizer has {n} tokens but the model's embedding has {rows} rows: ids >= {rows} would index out of "
        "range; use the tokenizer that belongs to model.partial_pretrain or resize the embedding and save the model",
    )
