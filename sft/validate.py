"""Checks of the composed config that need no model, data or process group.

`validate_config` runs right after composition (before anything expensive) and raises
`ConfigError` with one line naming the key, the value and the fix. `Plan` holds the values
derived from the config and the world (per-rank batch, accumulation, steps); they are never
written back into the config.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

from sft.data.files import expand_paths
from sft.distributed import WorldInfo, resolve_device_type
from sft.kernels import check_liger
from sft.optim import resolve_warmup_steps
from sft.schema import ModelConfig, SFTConfig

LOGGERS = ("console", "file", "wandb", "tensorboard")
CONTENTS = ("model", "optimizer", "extra", "hf_model")
SCHEDULERS = ("cosine", "wsd", "constant")
MODEL_DTYPES = ("fp32", "float32", "bf16", "bfloat16")


class ConfigError(ValueError):
    """A user-facing configuration problem; the message is one line."""


def _need(ok: bool, msg: str) -> None:
    if not ok:
        raise ConfigError(msg)


def _check_files(key: str, value) -> list[str]:
    files = [value] if isinstance(value, str) else list(value or [])
    _need(len(files) > 0 and all(isinstance(f, str) for f in files), f"{key}={value!r}: give a path or a list of paths")
    try:
        # Files, globs and folders: each must give at least one data file.
        return expand_paths(files, key)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc


def _check_data(cfg: SFTConfig) -> None:
    d = cfg.data
    _check_files("data.train_files", d.train_files)
    if d.val_files is not None:
        _check_files("data.val_files", d.val_files)
    _need(
        d.micro_batch_size is None,
        f"data.micro_batch_size={d.micro_batch_size}: verl's deprecated global micro-batch is not supported; "
        "set data.micro_batch_size_per_gpu instead",
    )
    _need(d.train_batch_size > 0, f"data.train_batch_size={d.train_batch_size}: must be > 0")
    _need(d.micro_batch_size_per_gpu > 0, f"data.micro_batch_size_per_gpu={d.micro_batch_size_per_gpu}: must be > 0")
    _need(d.max_length > 1, f"data.max_length={d.max_length}: must be > 1")
    _need(
        d.truncation in ("left", "right", "error"),
        f"data.truncation={d.truncation!r}: choose left, right or error",
    )
    _need(
        d.on_bad_sample in ("error", "skip"),
        f"data.on_bad_sample={d.on_bad_sample!r}: choose error (stop at the first bad row) or skip (drop bad rows)",
    )
    _need(
        d.multiturn.train_on in ("all", "last"),
        f"data.multiturn.train_on={d.multiturn.train_on!r}: choose all (every assistant turn) or last",
    )
    _need(
        d.balance_dp_token,
        "data.balance_dp_token=false: sft always normalises the loss by the global number of target tokens "
        "(verl's balance_dp_token=true); remove the key or set it to true",
    )
    _need(not d.use_shm, "data.use_shm=true: shared-memory copies are not supported; read the files from local disk")
    _need(
        (d.custom_cls.path is None) == (d.custom_cls.name is None),
        "data.custom_cls: set both data.custom_cls.path (a .py file) and data.custom_cls.name (the class)",
    )


def _check_model(cfg: SFTConfig) -> None:
    m = cfg.model
    p = Path(m.partial_pretrain).expanduser()
    _need(
        p.is_dir(),
        f"model.partial_pretrain={m.partial_pretrain}: not a directory; give a local Hugging Face model folder",
    )
    _need(
        m.strategy == "fsdp2",
        f"model.strategy={m.strategy!r}: sft supports FSDP2 only; set model.strategy=fsdp2 (or remove the key)",
    )
    _need(
        m.fsdp_config.model_dtype in MODEL_DTYPES,
        f"model.fsdp_config.model_dtype={m.fsdp_config.model_dtype!r}: choose fp32 or bf16",
    )
    _need(
        m.fsdp_config.wrap_policy.min_num_params == 0,
        f"model.fsdp_config.wrap_policy.min_num_params={m.fsdp_config.wrap_policy.min_num_params}: sft shards each "
        "decoder layer and the root; size-based wrapping is not supported, remove the key",
    )
    _need(not m.use_shm, "model.use_shm=true: shared-memory model copies are not supported; use a local model folder")
    defaults = ModelConfig(partial_pretrain="")
    if m.lora_rank == 0:
        for key in ("lora_alpha", "target_modules", "lora_adapter_path"):
            _need(
                getattr(m, key) == getattr(defaults, key),
                f"model.{key}={getattr(m, key)!r} is set but model.lora_rank=0: set model.lora_rank>0 to use LoRA "
                f"or remove model.{key}",
            )
    _need(m.lora_rank >= 0, f"model.lora_rank={m.lora_rank}: must be >= 0")
    if m.lora_rank > 0:
        _check_lora(m)
    _need(
        m.gradient_checkpointing_mode in ("full", "selective"),
        f"model.gradient_checkpointing_mode={m.gradient_checkpointing_mode!r}: choose full or selective",
    )
    _need(
        m.enable_gradient_checkpointing or m.gradient_checkpointing_mode == "full",
        f"model.gradient_checkpointing_mode={m.gradient_checkpointing_mode} needs "
        "model.enable_gradient_checkpointing=true (or remove the mode)",
    )
    _need(
        m.use_liger in (True, False, "auto"),
        f"model.use_liger={m.use_liger!r}: choose true, false or auto",
    )
    _need(
        not (m.compile and m.gradient_checkpointing_mode == "selective"),
        "model.gradient_checkpointing_mode=selective with model.compile=true: the compiled layer hides its matmuls "
        "from the checkpoint policy; use gradient_checkpointing_mode=full with compile",
    )
    if m.use_liger is True:
        try:
            check_liger(resolve_device_type(cfg.trainer.device))
        except ValueError as exc:
            raise ConfigError(str(exc)) from None


def _check_lora(m: ModelConfig) -> None:
    """LoRA keys that need no model; module names are checked against the model (on meta) when it is built."""
    _need(m.lora_alpha > 0, f"model.lora_alpha={m.lora_alpha}: must be > 0 (the update is scaled by alpha / rank)")
    t = m.target_modules
    _need(
        (isinstance(t, str) and bool(t)) or (isinstance(t, list) and bool(t) and all(isinstance(x, str) for x in t)),
        f"model.target_modules={t!r}: give all-linear or a list of module names, e.g. [q_proj,v_proj]",
    )
    if m.lora_adapter_path is None:
        return
    p = Path(m.lora_adapter_path).expanduser()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        _need(
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
        _need(
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
    """Cheap checks of the model folder (json files only), so a broken folder fails before anything loads."""
    p = Path(cfg.model.partial_pretrain).expanduser()
    _need(
        (p / "config.json").is_file(),
        f"model.partial_pretrain={p}: not a Hugging Face model folder: no config.json in {p}",
    )
    config = _read_json(p / "config.json")
    _need(
        any(any(p.glob(pat)) for pat in WEIGHT_PATTERNS),
        f"model.partial_pretrain={p}: no weights in {p}; expected model.safetensors or pytorch_model.bin "
        "(or sharded files with their .index.json), as save_pretrained writes them",
    )
    _need(
        any((p / f).is_file() for f in TOKENIZER_FILES),
        f"model.partial_pretrain={p}: no tokenizer files in {p} (expected one of {', '.join(TOKENIZER_FILES)}); "
        "copy the tokenizer of the model into the folder (tokenizer.save_pretrained)",
    )
    _need(
        not cfg.data.multiturn.enable or bool(cfg.data.chat_template) or _has_chat_template(p),
        f"data.multiturn.enable=true but the tokenizer in {p} has no chat template; set data.chat_template "
        "or add chat_template to tokenizer_config.json",
    )
    vocab = config.get("vocab_size")
    _need(
        vocab is None or (isinstance(vocab, int) and vocab > 0),
        f"model.partial_pretrain={p}: config.json has vocab_size={vocab!r}; it must be a positive integer",
    )


def check_vocab(tokenizer, hf_config) -> None:
    """Token ids beyond the embedding would index out of range (a CUDA assert, or garbage): refuse early."""
    rows = getattr(hf_config, "vocab_size", None)
    n = len(tokenizer)
    _need(
        rows is None or n <= rows,
        f"tokenizer has {n} tokens but the model's embedding has {rows} rows: ids >= {rows} would index out of "
        "range; use the tokenizer that belongs to model.partial_pretrain or resize the embedding and save the model",
    )


def _check_output_dir(cfg: SFTConfig) -> None:
    """The final checkpoint is always saved: find out now, not after training, if it cannot be written."""
    out = Path(cfg.trainer.default_local_dir).expanduser().absolute()
    existing = out
    while not existing.exists():
        existing = existing.parent
    _need(
        existing.is_dir(),
        f"trainer.default_local_dir={out}: {existing} is a file, not a directory; choose another output folder",
    )
    _need(
        os.access(existing, os.W_OK | os.X_OK),
        f"trainer.default_local_dir={out}: {existing} is not writable; choose a writable output folder",
    )


def _check_optim(cfg: SFTConfig) -> None:
    o = cfg.optim
    _need(o.lr > 0, f"optim.lr={o.lr}: must be > 0")
    _need(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), f"optim.betas={o.betas}: two values in [0, 1)")
    _need(o.weight_decay >= 0, f"optim.weight_decay={o.weight_decay}: must be >= 0")
    _need(0 <= o.lr_warmup_steps_ratio <= 1, f"optim.lr_warmup_steps_ratio={o.lr_warmup_steps_ratio}: in [0, 1]")
    _need(o.lr_warmup_steps >= -1, f"optim.lr_warmup_steps={o.lr_warmup_steps}: -1 (use the ratio) or >= 0")
    _need(o.clip_grad > 0, f"optim.clip_grad={o.clip_grad}: must be > 0")
    _need(o.lr_scheduler in SCHEDULERS, f"optim.lr_scheduler={o.lr_scheduler!r}: choose one of {', '.join(SCHEDULERS)}")
    _need(0 <= o.min_lr_ratio <= 1, f"optim.min_lr_ratio={o.min_lr_ratio}: in [0, 1]")
    _need(0 < o.wsd_decay_ratio <= 1, f"optim.wsd_decay_ratio={o.wsd_decay_ratio}: in (0, 1]")


def _check_trainer(cfg: SFTConfig, world: WorldInfo) -> None:
    t = cfg.trainer
    _need(t.total_epochs >= 1, f"trainer.total_epochs={t.total_epochs}: must be >= 1")
    _need(
        t.total_training_steps is None or t.total_training_steps > 0,
        f"trainer.total_training_steps={t.total_training_steps}: null or > 0",
    )
    bad = [x for x in t.logger if x not in LOGGERS]
    _need(not bad, f"trainer.logger: unknown {bad}; choose from {', '.join(LOGGERS)}")
    for tracker in ("wandb", "tensorboard"):  # optional packages: missing ones fail here, not after the model loads
        _need(
            tracker not in t.logger or importlib.util.find_spec(tracker) is not None,
            f"trainer.logger contains {tracker!r} but the {tracker} package is not installed; "
            f"`pip install {tracker}` (or `bash scripts/setup.sh trackers`), or remove it from trainer.logger",
        )
    for key in ("save_freq", "test_freq"):
        v = getattr(t, key)
        _need(v == -1 or v > 0, f"trainer.{key}={v}: -1 (only at the end) or a positive number of steps")
    _need(
        t.max_ckpt_to_keep is None or t.max_ckpt_to_keep >= 1,
        f"trainer.max_ckpt_to_keep={t.max_ckpt_to_keep}: null or >= 1",
    )
    _need(
        t.resume_mode in ("auto", "disable", "resume_path"),
        f"trainer.resume_mode={t.resume_mode!r}: choose auto, disable or resume_path",
    )
    _need(
        t.resume_mode != "resume_path" or bool(t.resume_from_path),
        "trainer.resume_mode=resume_path needs trainer.resume_from_path=<a global_step_N folder>",
    )
    for key in ("save_contents", "load_contents"):
        bad = [x for x in getattr(t.checkpoint, key) if x not in CONTENTS]
        _need(not bad, f"trainer.checkpoint.{key}: unknown {bad}; choose from {', '.join(CONTENTS)}")
    _need(
        t.checkpoint.hf_dtype in ("bf16", "fp32"),
        f"trainer.checkpoint.hf_dtype={t.checkpoint.hf_dtype!r}: choose bf16 or fp32",
    )
    _need(
        t.default_hdfs_dir is None,
        "trainer.default_hdfs_dir: copying checkpoints to HDFS is not supported; remove the key and copy "
        "trainer.default_local_dir yourself",
    )
    _need(t.device in ("auto", "cpu", "cuda"), f"trainer.device={t.device!r}: choose auto, cpu or cuda")
    _need(t.preempt_grace_s > 0, f"trainer.preempt_grace_s={t.preempt_grace_s}: must be > 0 seconds")
    _need(t.dist_timeout_s > 0, f"trainer.dist_timeout_s={t.dist_timeout_s}: must be > 0 seconds")
    nnodes = max(1, world.world_size // max(1, world.local_world_size))
    _need(
        t.nnodes is None or t.nnodes == nnodes,
        f"trainer.nnodes={t.nnodes} but torchrun started {nnodes} node(s); remove the key or match --nnodes",
    )
    _need(
        t.n_gpus_per_node is None or t.n_gpus_per_node == world.local_world_size,
        f"trainer.n_gpus_per_node={t.n_gpus_per_node} but torchrun started {world.local_world_size} process(es) "
        "per node; remove the key or match --nproc_per_node",
    )


def _check_parallel(cfg: SFTConfig, world: WorldInfo) -> None:
    sp = cfg.ulysses_sequence_parallel_size
    _need(sp >= 1, f"ulysses_sequence_parallel_size={sp}: must be >= 1")
    _need(
        world.world_size % sp == 0,
        f"ulysses_sequence_parallel_size={sp} does not divide the world size {world.world_size}; "
        "choose a divisor of the number of processes",
    )
    dp = world.world_size // sp
    b, mb = cfg.data.train_batch_size, cfg.data.micro_batch_size_per_gpu
    budget = cfg.data.max_token_len_per_gpu
    _need(
        sp == 1 or cfg.use_remove_padding,
        f"ulysses_sequence_parallel_size={sp} needs use_remove_padding=true: sequence parallelism splits "
        "the packed, padding-free row",
    )
    if budget is None:
        _need(
            b % (dp * mb) == 0,
            f"data.train_batch_size={b} is not divisible by data-parallel ranks ({dp}) x "
            f"data.micro_batch_size_per_gpu ({mb}) = {dp * mb}; make the global batch a multiple of {dp * mb}",
        )
        return
    _need(
        cfg.use_remove_padding,
        f"data.max_token_len_per_gpu={budget} needs use_remove_padding=true (token budgets pack samples)",
    )
    _need(
        budget * sp >= cfg.data.max_length,
        f"data.max_token_len_per_gpu={budget} x ulysses_sequence_parallel_size={sp} is below "
        f"data.max_length={cfg.data.max_length}: a sample of full length would not fit; raise it",
    )
    _need(
        b % dp == 0,
        f"data.train_batch_size={b} is not divisible by the {dp} data-parallel ranks; make it a multiple of {dp}",
    )


def validate_config(cfg: SFTConfig, world: WorldInfo) -> None:
    """Raise ConfigError for the first problem found, before any model or data is loaded."""
    _check_data(cfg)
    _check_model(cfg)
    _check_optim(cfg)
    _check_trainer(cfg, world)
    _check_parallel(cfg, world)
    # Last: these read the file system; the config-only checks above name the cheaper fixes first.
    _check_model_folder(cfg)
    _check_output_dir(cfg)


@dataclass(frozen=True)
class Plan:
    """Numbers derived from the config, the world and the dataset size."""

    dp_size: int
    sp_size: int
    per_rank_batch: int  # samples per data-parallel rank per optimizer step
    micro_batches: int  # gradient-accumulation steps per optimizer step
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int


def make_plan(cfg: SFTConfig, world_size: int, train_len: int) -> Plan:
    sp = cfg.ulysses_sequence_parallel_size
    dp = world_size // sp
    b = cfg.data.train_batch_size
    steps_per_epoch = train_len // b
    _need(
        steps_per_epoch > 0,
        f"data.train_batch_size={b} is larger than the training set ({train_len} usable samples); "
        "lower data.train_batch_size or add data",
    )
    total = cfg.trainer.total_training_steps or steps_per_epoch * cfg.trainer.total_epochs
    _need(
        total <= steps_per_epoch * cfg.trainer.total_epochs,
        f"trainer.total_training_steps={total} needs more than trainer.total_epochs={cfg.trainer.total_epochs} "
        f"epochs of {steps_per_epoch} steps; raise trainer.total_epochs",
    )
    o = cfg.optim
    warmup = resolve_warmup_steps(total, o.lr_warmup_steps, o.lr_warmup_steps_ratio)
    _need(
        warmup < total or total == 1,
        f"optim warmup of {warmup} steps is not shorter than the {total} training steps; "
        "lower optim.lr_warmup_steps / optim.lr_warmup_steps_ratio",
    )
    return Plan(
        dp_size=dp,
        sp_size=sp,
        per_rank_batch=b // dp,
        micro_batches=math.ceil(b // dp / cfg.data.micro_batch_size_per_gpu),
        steps_per_epoch=steps_per_epoch,
        total_steps=total,
        warmup_steps=warmup,
    )
