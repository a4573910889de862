"""verl's current command line (`sft.sft_trainer`, verl >= 0.7.1 key layout) onto our typed config."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from sft.cli import compose
from sft.config.errors import ConfigError
from sft.config.verl_layout import translate

ROOT = Path(__file__).resolve().parents[1]

# Every key of that layout with its default, as verl's sft_trainer_engine.yaml and the files it
# composes (model/hf_model.yaml, engine/fsdp.yaml, optim/fsdp.yaml) list them (key names and values only).
VERL_KEYS = """
data.train_batch_size=256 data.micro_batch_size_per_gpu=4 data.max_token_len_per_gpu=8192 data.use_dynamic_bsz=true
data.train_files=t.parquet data.val_files=null data.train_max_samples=-1 data.val_max_samples=-1
data.messages_key=messages data.tools_key=tools data.enable_thinking_key=enable_thinking
data.enable_thinking_default=none data.pad_mode=no_padding data.max_length=1024 data.truncation=error
data.balance_dp_token=false data.custom_cls.path=null data.custom_cls.name=null data.use_shm=false
data.num_workers=8 data.ignore_input_ids_mismatch=false
checkpoint.save_contents=[model,optimizer,extra] checkpoint.load_contents=[model,optimizer,extra]
trainer.default_local_dir=/tmp/x trainer.default_hdfs_dir=null trainer.project_name=gsm8k-sft
trainer.experiment_name=test trainer.total_epochs=4 trainer.total_training_steps=null trainer.logger=[console]
trainer.seed=1 trainer.save_freq=-1 trainer.test_freq=-1 trainer.max_ckpt_to_keep=null trainer.balance_batch=true
trainer.resume_mode=auto trainer.resume_from_path=null trainer.nnodes=1 trainer.n_gpus_per_node=1
trainer.profile_interval=[-1,-1]
model.path=/m model.hf_config_path=null model.tokenizer_path=null model.use_shm=false model.trust_remote_code=false
model.custom_chat_template=null model.external_lib=null model.enable_gradient_checkpointing=true
model.enable_activation_offload=false model.use_remove_padding=true model.truncate_padding=false model.lora_rank=0
model.lora_alpha=16 model.target_modules=all-linear model.exclude_modules=null model.lora_adapter_path=null
model.use_liger=false model.use_fused_kernels=false model.fused_kernel_options.impl_backend=torch
model.tiled_mlp.enabled=false model.tiled_mlp.num_shards=4 model.mtp.enable=false
engine=fsdp engine.wrap_policy.min_num_params=0 engine.param_offload=false engine.optimizer_offload=false
engine.offload_policy=false engine.reshard_after_forward=true engine.fsdp_size=-1 engine.forward_prefetch=false
engine.model_dtype=fp32 engine.use_orig_params=false engine.seed=42 engine.full_determinism=false
engine.ulysses_sequence_parallel_size=1 engine.entropy_from_logits_with_chunking=false
engine.entropy_from_logits_chunk_size=2048 engine.use_torch_compile=false engine.entropy_checkpointing=false
engine.use_no_sync_for_gradient_accumulation=true engine.pad_to_length=false engine.pad_to_length_bucket=1024
engine.forward_only=false engine.strategy=fsdp engine.dtype=bfloat16 engine.qat.enable=false
optim.optimizer=AdamW optim.optimizer_impl=torch.optim optim.lr=1e-3 optim.lr_warmup_steps_ratio=0.0
optim.total_training_steps=-1 optim.weight_decay=0.01 optim.lr_warmup_steps=-1 optim.betas=[0.9,0.999]
optim.clip_grad=1.0 optim.min_lr_ratio=0.0 optim.num_cycles=0.5 optim.lr_scheduler_type=constant
optim.lr_wsd_stable_steps_ratio=0.9 optim.zero_indexed_step=true optim.warmup_style=null
optim.override_optimizer_config=null
""".split()

# verl's documented multi-turn example (paths replaced by the test's).
EXAMPLE = (
    "data.train_files={d}/train.parquet data.val_files={d}/val.parquet data.messages_key=messages "
    "data.micro_batch_size_per_gpu=4 model.path={d}/model model.use_remove_padding=true engine=fsdp "
    "engine.ulysses_sequence_parallel_size=2 trainer.default_local_dir={out} trainer.project_name=multiturn-sft "
    "trainer.experiment_name=qwen trainer.total_training_steps=3"
)


def _parse(overrides: list[str]):
    ours, notes = translate(overrides)
    return compose(ours), notes


def test_every_key_of_the_layout_at_its_default_is_taken():
    """Typing any key of that layout at its own default value composes (nothing unknown, nothing refused)."""
    for item in VERL_KEYS:
        translate(["data.train_files=t.parquet", "model.path=/m", item])  # raises naming the key
    # sft has one seed: that layout's two (trainer.seed=1, engine.seed=42) cannot both be typed at odds.
    cfg, _ = _parse([k for k in VERL_KEYS if not k.startswith("engine.seed")])
    assert cfg.data.multiturn.enable and cfg.model.partial_pretrain == "/m" and cfg.trainer.seed == 1


def test_the_layout_gets_its_own_defaults():
    cfg, _ = _parse(["data.train_files=t.parquet", "model.path=/m"])
    assert cfg.model.partial_pretrain == "/m"
    assert cfg.optim.lr == pytest.approx(1e-3) and cfg.optim.betas == [0.9, 0.999]
    assert cfg.optim.lr_scheduler == "constant" and cfg.trainer.total_epochs == 4 and cfg.trainer.seed == 1
    # Its 8192 default is not typed: the trainer chooses the budget (sft/loop/budget.py) as for everyone.
    assert cfg.use_remove_padding and cfg.data.max_token_len_per_gpu is None
    typed, _ = _parse(["data.train_files=t.parquet", "model.path=/m", "data.max_token_len_per_gpu=8192"])
    assert typed.data.max_token_len_per_gpu == 8192
    assert cfg.trainer.logger == ["console", "wandb"] and cfg.trainer.project_name == "gsm8k-sft"
    assert cfg.model.compile is False  # that layout compiles by default; here only when typed


def test_compile_only_when_typed():
    """That layout's default (compile on) is not taken: measured slower than eager; the log says so."""
    base = ["data.train_files=t.parquet", "model.path=/m", "trainer.device=cuda"]
    cfg, notes = _parse(base)
    assert cfg.model.compile is False and any(n.startswith("engine.use_torch_compile not given") for n in notes)
    for typed in ("engine.use_torch_compile=true", "model.compile=true"):
        cfg, notes = _parse([*base, typed])
        assert cfg.model.compile is True and not any("engine.use_torch_compile not given" in n for n in notes)


def test_keys_map_onto_ours():
    cfg, notes = _parse(
        [
            "data.train_files=t.parquet",
            "model.path=/m",
            "model.tokenizer_path=/tok",
            "engine.ulysses_sequence_parallel_size=2",
            "engine.model_dtype=bf16",
            "engine.param_offload=true",
            "checkpoint.save_contents=[model,hf_model]",
            "optim.lr_scheduler_type=wsd",
            "optim.lr_wsd_stable_steps_ratio=0.8",
            "data.use_dynamic_bsz=false",
            "data.enable_thinking_default=false",
            "data.ignore_input_ids_mismatch=true",
            "model.override_config.attention_dropout=0.0",
            "model.lora_rank=8",
            "model.exclude_modules=[lm_head]",
        ]
    )
    assert cfg.ulysses_sequence_parallel_size == 2 and cfg.model.fsdp_config.model_dtype == "bf16"
    assert cfg.model.fsdp_config.offload_params and cfg.trainer.checkpoint.save_contents == ["model", "hf_model"]
    assert cfg.optim.lr_scheduler == "wsd" and cfg.optim.wsd_decay_ratio == pytest.approx(0.2)
    assert cfg.data.max_token_len_per_gpu is None  # use_dynamic_bsz=false: no cap
    assert cfg.data.apply_chat_template_kwargs == {"enable_thinking": False}
    assert cfg.model.tokenizer_path == "/tok" and cfg.model.override_config == {"attention_dropout": 0.0}
    assert cfg.model.lora_rank == 8 and cfg.model.exclude_modules == ["lm_head"]
    assert any("data.ignore_input_ids_mismatch" in n and "renders the whole conversation" in n for n in notes)


@pytest.mark.parametrize(
    "overrides, says",
    [
        (["model.path=/a", "model.partial_pretrain=/b"], "set the same thing (model.partial_pretrain)"),
        (["engine.ulysses_sequence_parallel_size=2", "ulysses_sequence_parallel_size=4"], "set the same thing"),
        (["engine=megatron"], "megatron"),
        (["engine.optimizer_offload=true"], "engine.param_offload"),
        (["engine.fsdp_size=4"], "hybrid sharding"),
        (["model.enable_activation_offload=true"], "activation offload"),
        (["data.processor=x"], "own processor"),
        (["data.prompt_key=question"], "messages data only"),
        (["profiler.tool=nsys"], "sft.bench --profile"),
        (["engine.turbo_config.distributed.tensor_parallel_size=2"], "fsdp_turbo"),
        (["data.pad_mode=no_padding", "model.use_remove_padding=false"], "needs model.use_remove_padding=true"),
        (["data.enable_thinking_default=maybe"], "choose none, true or false"),
        (["engine.no_such_key=1"], "unknown config key 'engine.no_such_key'"),
    ],
)
def test_refused_in_one_line(overrides, says):
    with pytest.raises(ConfigError) as err:
        translate(["data.train_files=t.parquet", "model.path=/m", *overrides])
    assert says in str(err.value) and "\n" not in str(err.value)


def test_both_layouts_may_agree():
    cfg, _ = _parse(
        ["data.train_files=t", "model.path=/m", "engine.ulysses_sequence_parallel_size=2"]
        + ["ulysses_sequence_parallel_size=2"]
    )
    assert cfg.ulysses_sequence_parallel_size == 2


def test_gsm8k_example_composes_to_the_same_config_as_our_command(demo_dir, tmp_path):
    """verl's gsm8k FSDP example (SP=2, LoRA) adapted to messages data == the equivalent sft.fsdp_sft_trainer keys."""
    d, out = demo_dir, tmp_path
    theirs = (
        f"data.train_files={d}/train.parquet data.val_files={d}/val.parquet data.micro_batch_size_per_gpu=64 "
        f"data.messages_key=messages optim.lr=1e-4 engine=fsdp engine.ulysses_sequence_parallel_size=2 "
        f"model.path={d}/model model.use_remove_padding=true trainer.default_local_dir={out} "
        "trainer.project_name=gsm8k-sft trainer.experiment_name=gsm8k-sft-qwen3-8b-instruct "
        "trainer.logger=[console,wandb] trainer.total_epochs=2 model.lora_rank=32 model.lora_alpha=16 "
        "model.target_modules=all-linear"
    ).split()
    ours = (
        f"data.train_files={d}/train.parquet data.val_files={d}/val.parquet data.micro_batch_size_per_gpu=64 "
        f"data.multiturn.enable=true data.multiturn.messages_key=messages "
        f"optim.lr=1e-4 optim.betas=[0.9,0.999] optim.lr_scheduler=constant ulysses_sequence_parallel_size=2 "
        f"model.partial_pretrain={d}/model use_remove_padding=true trainer.default_local_dir={out} "
        "trainer.project_name=gsm8k-sft trainer.experiment_name=gsm8k-sft-qwen3-8b-instruct "
        "trainer.logger=[console,wandb] trainer.total_epochs=2 model.lora_rank=32 "
        "model.lora_alpha=16 model.target_modules=all-linear"
    ).split()
    assert _parse(theirs)[0] == compose(ours)


def _torchrun(module: str, overrides: list[str], env: dict) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", module]
    return subprocess.run(cmd + overrides, capture_output=True, text=True, cwd=ROOT, timeout=300, env=env)


def test_verls_example_trains_like_our_command_line(demo_dir, tmp_path):
    """The documented example, 2 gloo processes with sp=2, gives the same losses as our layout's command."""
    import os

    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path)}
    small = ["data.train_batch_size=16", "data.max_length=256", "trainer.logger=[console,file]"]
    theirs = EXAMPLE.format(d=demo_dir, out=tmp_path / "theirs").split() + small
    r = _torchrun("sft.sft_trainer", theirs, env)
    assert r.returncode == 0, r.stderr[-3000:]
    ours = [
        f"data.train_files={demo_dir}/train.parquet",
        f"data.val_files={demo_dir}/val.parquet",
        "data.multiturn.enable=true",
        "data.micro_batch_size_per_gpu=4",
        f"model.partial_pretrain={demo_dir}/model",
        "use_remove_padding=true",
        "ulysses_sequence_parallel_size=2",
        f"trainer.default_local_dir={tmp_path / 'ours'}",
        "trainer.total_training_steps=3",
        "optim.lr=1e-3",
        "optim.betas=[0.9,0.999]",
        "optim.lr_scheduler=constant",
    ] + small
    r2 = _torchrun("sft.fsdp_sft_trainer", ours, env)
    assert r2.returncode == 0, r2.stderr[-3000:]

    def losses(run: str) -> list[float]:
        lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        return [json.loads(x)["train/loss"] for x in lines if "train/loss" in x]

    assert len(losses("theirs")) == 3 and losses("theirs") == losses("ours")
    assert "dp=1 sp=2" in r.stderr


def test_cfg_prints_our_layout(demo_dir, capsys):
    from sft.sft_trainer import main

    with pytest.raises(SystemExit) as done:
        main(["--cfg", f"data.train_files={demo_dir}/train.parquet", f"model.path={demo_dir}/model"])
    assert done.value.code == 0
    printed = capsys.readouterr().out
    assert f"partial_pretrain: {demo_dir}/model" in printed and "ulysses_sequence_parallel_size: 1" in printed


def test_override_config_and_tokenizer_path_reach_the_model(demo_dir, tmp_path):
    import shutil

    from sft.models.loading import load_hf_config, load_tokenizer

    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    for f in (demo_dir / "model").iterdir():
        if "token" in f.name or f.name.startswith(("vocab", "merges", "special", "chat")):
            shutil.copy(f, tok_dir / f.name)
    base = [f"data.train_files={demo_dir}/train.parquet", f"model.partial_pretrain={demo_dir}/model"]
    cfg = compose(base + ["+model.override_config.attention_dropout=0.25", f"model.tokenizer_path={tok_dir}"])
    assert load_hf_config(cfg).attention_dropout == 0.25
    assert load_tokenizer(cfg).name_or_path == str(tok_dir)
    bad = compose(base + ["+model.override_config.no_such_entry=1"])
    with pytest.raises(ValueError, match="model.override_config.no_such_entry"):
        load_hf_config(bad)
