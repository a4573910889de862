"""Checks of the composed config that need no model, data or process group.

`validate_config` runs right after composition (before anything expensive) and raises
`ConfigError` with one line naming the key, the value and the fix; the model section and the
model folder are checked in sft/config/model_checks.py.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

from sft.checkpoint.manager import complete_steps
from sft.config.errors import ConfigError, either, need
from sft.config.model_checks import _check_model, _check_model_folder
from sft.config.schema import (
    CONTENTS,
    DEVICES,
    FP8_RECIPES,
    HF_DTYPES,
    ON_BAD_SAMPLE,
    RESUME_MODES,
    SCHEDULERS,
    TRAIN_ON,
    TRUNCATIONS,
    SFTConfig,
)
from sft.data.files import expand_paths
from sft.loop.loggers import LOGGER_BACKENDS
from sft.ops.fp8 import device_reason, misaligned_widths, torchao_reason
from sft.parallel.distributed import WorldInfo, resolve_device_type


def _check_files(key: str, value) -> list[str]:
    files = [value] if isinstance(value, str) else list(value or [])
    need(len(files) > 0 and all(isinstance(f, str) for f in files), f"{key}={value!r}: give a path or a list of paths")
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
    need(
        d.micro_batch_size is None,
        f"data.micro_batch_size={d.micro_batch_size}: verl's deprecated global micro-batch is not supported; "
        "set data.micro_batch_size_per_gpu instead",
    )
    need(d.train_batch_size > 0, f"data.train_batch_size={d.train_batch_size}: must be > 0")
    need(d.micro_batch_size_per_gpu > 0, f"data.micro_batch_size_per_gpu={d.micro_batch_size_per_gpu}: must be > 0")
    need(d.max_length > 1, f"data.max_length={d.max_length}: must be > 1")
    need(
        d.truncation in TRUNCATIONS,
        f"data.truncation={d.truncation!r}: choose {either(TRUNCATIONS)}",
    )
    need(
        d.on_bad_sample in ON_BAD_SAMPLE,
        f"data.on_bad_sample={d.on_bad_sample!r}: choose error (stop at the first bad row) or skip (drop bad rows)",
    )
    need(
        d.multiturn.train_on in TRAIN_ON,
        f"data.multiturn.train_on={d.multiturn.train_on!r}: choose all (every assistant turn) or last",
    )
    need(
        d.balance_dp_token,
        "data.balance_dp_token=false: sft always normalises the loss by the global number of target tokens "
        "(verl's balance_dp_token=true); remove the key or set it to true",
    )
    need(not d.use_shm, "data.use_shm=true: shared-memory copies are not supported; read the files from local disk")
    need(
        (d.custom_cls.path is None) == (d.custom_cls.name is None),
        "data.custom_cls: set both data.custom_cls.path (a .py file) and data.custom_cls.name (the class)",
    )


def _check_output_dir(cfg: SFTConfig) -> None:
    """The final checkpoint is always saved: find out now, not after training, if it cannot be written."""
    out = Path(cfg.trainer.default_local_dir).expanduser().absolute()
    existing = out
    while not existing.exists():
        existing = existing.parent
    need(
        existing.is_dir(),
        f"trainer.default_local_dir={out}: {existing} is a file, not a directory; choose another output folder",
    )
    need(
        os.access(existing, os.W_OK | os.X_OK),
        f"trainer.default_local_dir={out}: {existing} is not writable; choose a writable output folder",
    )


def _check_optim(cfg: SFTConfig) -> None:
    o = cfg.optim
    need(o.lr > 0, f"optim.lr={o.lr}: must be > 0")
    need(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), f"optim.betas={o.betas}: two values in [0, 1)")
    need(o.weight_decay >= 0, f"optim.weight_decay={o.weight_decay}: must be >= 0")
    need(0 <= o.lr_warmup_steps_ratio <= 1, f"optim.lr_warmup_steps_ratio={o.lr_warmup_steps_ratio}: in [0, 1]")
    need(o.lr_warmup_steps >= -1, f"optim.lr_warmup_steps={o.lr_warmup_steps}: -1 (use the ratio) or >= 0")
    need(o.clip_grad > 0, f"optim.clip_grad={o.clip_grad}: must be > 0")
    need(o.lr_scheduler in SCHEDULERS, f"optim.lr_scheduler={o.lr_scheduler!r}: choose {either(SCHEDULERS)}")
    need(0 <= o.min_lr_ratio <= 1, f"optim.min_lr_ratio={o.min_lr_ratio}: in [0, 1]")
    need(0 < o.wsd_decay_ratio <= 1, f"optim.wsd_decay_ratio={o.wsd_decay_ratio}: in (0, 1]")


def _check_resume_loads(cfg: SFTConfig) -> None:
    """A resume that would load no weights is refused: `load_contents` follows `save_contents` unless set (verl's
    default), so a run that saves no `model` state would otherwise "resume" by starting again from step 1."""
    t = cfg.trainer
    if t.resume_mode == "disable" or "model" in t.checkpoint.load_contents:
        return
    found = t.resume_from_path if t.resume_mode == "resume_path" else None
    if t.resume_mode == "auto":
        steps = complete_steps(Path(t.default_local_dir).expanduser())
        found = f"{t.default_local_dir}/global_step_{steps[-1]}" if steps else None
    need(
        found is None,
        f"trainer.checkpoint.load_contents={list(t.checkpoint.load_contents)}: resuming from {found} would load no "
        "model weights (load_contents follows save_contents unless set); set "
        "trainer.checkpoint.load_contents=[model,optimizer,extra], or trainer.resume_mode=disable to start afresh",
    )


def _check_trainer(cfg: SFTConfig, world: WorldInfo) -> None:
    t = cfg.trainer
    _check_resume_loads(cfg)
    need(t.total_epochs >= 1, f"trainer.total_epochs={t.total_epochs}: must be >= 1")
    need(
        t.total_training_steps is None or t.total_training_steps > 0,
        f"trainer.total_training_steps={t.total_training_steps}: null or > 0",
    )
    bad = [x for x in t.logger if x not in LOGGER_BACKENDS]
    need(not bad, f"trainer.logger: unknown {bad}; choose from {', '.join(LOGGER_BACKENDS)}")
    for tracker in ("wandb", "tensorboard"):  # optional packages: missing ones fail here, not after the model loads
        need(
            tracker not in t.logger or importlib.util.find_spec(tracker) is not None,
            f"trainer.logger contains {tracker!r} but the {tracker} package is not installed; "
            f"`pip install {tracker}` (or `bash scripts/setup.sh trackers`), or remove it from trainer.logger",
        )
    for key in ("save_freq", "test_freq"):
        v = getattr(t, key)
        need(v == -1 or v > 0, f"trainer.{key}={v}: -1 (only at the end) or a positive number of steps")
    need(
        t.max_ckpt_to_keep is None or t.max_ckpt_to_keep >= 1,
        f"trainer.max_ckpt_to_keep={t.max_ckpt_to_keep}: null or >= 1",
    )
    need(
        t.resume_mode in RESUME_MODES,
        f"trainer.resume_mode={t.resume_mode!r}: choose {either(RESUME_MODES)}",
    )
    need(
        t.resume_mode != "resume_path" or bool(t.resume_from_path),
        "trainer.resume_mode=resume_path needs trainer.resume_from_path=<a global_step_N folder>",
    )
    for key in ("save_contents", "load_contents"):
        bad = [x for x in getattr(t.checkpoint, key) if x not in CONTENTS]
        need(not bad, f"trainer.checkpoint.{key}: unknown {bad}; choose from {', '.join(CONTENTS)}")
    need(
        t.checkpoint.hf_dtype in HF_DTYPES,
        f"trainer.checkpoint.hf_dtype={t.checkpoint.hf_dtype!r}: choose {either(HF_DTYPES)}",
    )
    need(
        t.default_hdfs_dir is None,
        "trainer.default_hdfs_dir: copying checkpoints to HDFS is not supported; remove the key and copy "
        "trainer.default_local_dir yourself",
    )
    need(t.device in DEVICES, f"trainer.device={t.device!r}: choose {either(DEVICES)}")
    need(t.preempt_grace_s > 0, f"trainer.preempt_grace_s={t.preempt_grace_s}: must be > 0 seconds")
    need(t.dist_timeout_s > 0, f"trainer.dist_timeout_s={t.dist_timeout_s}: must be > 0 seconds")
    nnodes = max(1, world.world_size // max(1, world.local_world_size))
    need(
        t.nnodes is None or t.nnodes == nnodes,
        f"trainer.nnodes={t.nnodes} but torchrun started {nnodes} node(s); remove the key or match --nnodes",
    )
    need(
        t.n_gpus_per_node is None or t.n_gpus_per_node == world.local_world_size,
        f"trainer.n_gpus_per_node={t.n_gpus_per_node} but torchrun started {world.local_world_size} process(es) "
        "per node; remove the key or match --nproc_per_node",
    )


def _check_parallel(cfg: SFTConfig, world: WorldInfo) -> None:
    sp = cfg.ulysses_sequence_parallel_size
    need(sp >= 1, f"ulysses_sequence_parallel_size={sp}: must be >= 1")
    need(
        world.world_size % sp == 0,
        f"ulysses_sequence_parallel_size={sp} does not divide the world size {world.world_size}; "
        "choose a divisor of the number of processes",
    )
    dp = world.world_size // sp
    b, mb = cfg.data.train_batch_size, cfg.data.micro_batch_size_per_gpu
    budget = cfg.data.max_token_len_per_gpu
    need(
        sp == 1 or cfg.use_remove_padding,
        f"ulysses_sequence_parallel_size={sp} needs use_remove_padding=true: sequence parallelism splits "
        "the packed, padding-free row",
    )
    if budget is None:
        need(
            b % (dp * mb) == 0,
            f"data.train_batch_size={b} is not divisible by data-parallel ranks ({dp}) x "
            f"data.micro_batch_size_per_gpu ({mb}) = {dp * mb}; make the global batch a multiple of {dp * mb}",
        )
        return
    need(
        cfg.use_remove_padding,
        f"data.max_token_len_per_gpu={budget} needs use_remove_padding=true (token budgets pack samples)",
    )
    need(
        budget * sp >= cfg.data.max_length,
        f"data.max_token_len_per_gpu={budget} x ulysses_sequence_parallel_size={sp} is below "
        f"data.max_length={cfg.data.max_length}: a sample of full length would not fit; raise it",
    )
    need(
        b % dp == 0,
        f"data.train_batch_size={b} is not divisible by the {dp} data-parallel ranks; make it a multiple of {dp}",
    )


def _check_fp8(cfg: SFTConfig, world: WorldInfo) -> None:
    """`model.fp8`: its value, then what it needs (no LoRA, an FP8 GPU, torchao), cheapest first."""
    fp8 = cfg.model.fp8
    need(
        isinstance(fp8, bool) or fp8 in FP8_RECIPES,
        f"model.fp8={fp8!r}: choose false, true (sft's choice, tensorwise), {either(FP8_RECIPES)}",
    )
    if fp8 is False:
        return
    fp8 = str(fp8).lower()  # as typed: true, tensorwise, rowwise
    need(
        cfg.model.lora_rank == 0,
        f"model.fp8={fp8} with model.lora_rank={cfg.model.lora_rank}: FP8 training is for full fine-tuning; "
        "set model.fp8=false for LoRA",
    )
    reason = device_reason(resolve_device_type(cfg.trainer.device), world.local_rank)
    need(reason is None, f"model.fp8={fp8}: {reason}; set model.fp8=false")
    reason = torchao_reason()
    need(reason is None, f"model.fp8={fp8}: {reason}; or set model.fp8=false")


def _check_fp8_widths(cfg: SFTConfig) -> None:
    """FP8 GEMMs take widths that are multiples of 16: read them from config.json (after the folder checks)."""
    fp8 = str(cfg.model.fp8).lower()
    if fp8 == "false":
        return
    config = json.loads((Path(cfg.model.partial_pretrain).expanduser() / "config.json").read_text())
    config = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    config = {**config, **cfg.model.override_config}
    bad = misaligned_widths(config)
    need(
        not bad,
        f"model.fp8={fp8}: FP8 GEMMs need layer widths that are multiples of 16, and this model has "
        f"{', '.join(f'{k}={v}' for k, v in bad.items())}; set model.fp8=false",
    )


def validate_config(cfg: SFTConfig, world: WorldInfo) -> None:
    """Raise ConfigError for the first problem found, before any model or data is loaded."""
    _check_data(cfg)
    _check_model(cfg)
    _check_fp8(cfg, world)
    _check_optim(cfg)
    _check_trainer(cfg, world)
    _check_parallel(cfg, world)
    # Last: these read the file system; the config-only checks above name the cheaper fixes first.
    _check_model_folder(cfg)
    _check_fp8_widths(cfg)
    _check_output_dir(cfg)
