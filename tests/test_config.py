"""Config composition (schema + YAML + overrides) and every validation error, named by key."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sft.cli import compose
from sft.config.checks import validate_config
from sft.config.errors import ConfigError
from sft.config.schema import SFTConfig
from sft.loop.plan import make_plan
from sft.parallel.distributed import WorldInfo

ROOT = Path(__file__).resolve().parents[1]
WORLD2 = WorldInfo(rank=0, local_rank=0, world_size=2, local_world_size=2)


@pytest.fixture
def paths(tmp_path: Path) -> list[str]:
    (tmp_path / "train.parquet").write_bytes(b"")
    model = tmp_path / "model"
    model.mkdir()
    # The least that validate_config's model-folder checks accept (they read json files only).
    (model / "config.json").write_text('{"model_type": "qwen2"}')
    (model / "model.safetensors").write_bytes(b"")
    (model / "tokenizer_config.json").write_text('{"chat_template": "{{ messages }}"}')
    return [f"data.train_files={tmp_path}/train.parquet", f"model.partial_pretrain={tmp_path}/model"]


def verl_production(p: list[str]) -> list[str]:
    """The production command our users run with verl's fsdp_sft_trainer (paths replaced)."""
    return [
        p[0],
        f"data.val_files={p[0].split('=', 1)[1]}",
        "data.multiturn.enable=true",
        "data.multiturn.messages_key=messages",
        "data.max_length=4096",
        "data.truncation=right",
        "data.train_batch_size=128",
        "data.micro_batch_size_per_gpu=2",
        "data.balance_dp_token=True",
        p[1],
        "model.trust_remote_code=true",
        "model.enable_gradient_checkpointing=true",
        "model.strategy=fsdp2",
        "model.fsdp_config.model_dtype=bf16",
        "optim.lr=2e-5",
        "optim.lr_warmup_steps_ratio=0.05",
        "optim.clip_grad=1.0",
        "optim.lr_scheduler=cosine",
        "ulysses_sequence_parallel_size=2",
        "use_remove_padding=true",
        "trainer.total_epochs=2",
        "trainer.save_freq=500",
        "trainer.test_freq=500",
        "trainer.max_ckpt_to_keep=5",
        "trainer.default_local_dir=/tmp/x",
        "trainer.project_name=proj",
        "trainer.experiment_name=exp",
        'trainer.logger=["console","wandb"]',
        "trainer.seed=42",
        "trainer.resume_mode=auto",
        'trainer.checkpoint.save_contents=["model","optimizer","extra","hf_model"]',
    ]


def test_yaml_values_equal_schema_defaults():
    """The YAML shows every schema key, with the schema's default (one source of defaults)."""
    shown = yaml.safe_load((ROOT / "sft/config/sft_trainer.yaml").read_text())
    shown.pop("defaults")

    def walk(node, obj, prefix=""):
        fields = {f.name for f in dataclasses.fields(obj)}
        assert set(node) == fields, f"{prefix}: yaml keys {sorted(node)} != schema {sorted(fields)}"
        for name in fields:
            value = getattr(obj, name)
            if dataclasses.is_dataclass(value):
                walk(node[name], value, f"{prefix}{name}.")
            elif name not in ("train_files", "partial_pretrain", "load_contents", "default_local_dir"):
                assert node[name] == value, f"{prefix}{name}: yaml {node[name]!r} != schema {value!r}"

    walk(shown, SFTConfig())


def test_verl_production_command_parses(paths):
    cfg = compose(verl_production(paths))
    assert cfg.data.train_batch_size == 128 and cfg.data.micro_batch_size_per_gpu == 2
    assert cfg.trainer.logger == ["console", "wandb"]
    assert cfg.trainer.checkpoint.load_contents == ["model", "optimizer", "extra", "hf_model"]
    assert cfg.trainer.default_local_dir == "/tmp/x"
    assert cfg.ulysses_sequence_parallel_size == 2 and cfg.use_remove_padding is True


def test_smoke_variant_and_other_verl_keys_parse(paths):
    extra = [
        "trainer.total_training_steps=10",
        "trainer.total_epochs=999",
        "trainer.save_freq=5",
        "trainer.test_freq=5",
        "trainer.resume_mode=disable",
        'trainer.logger=["console"]',
        "data.prompt_key=q",
        "data.response_key=a",
        "data.prompt_dict_keys=[x,y]",
        "data.response_dict_keys=[z]",
        "data.train_max_samples=100",
        "data.val_max_samples=10",
        "data.multiturn.tools_key=tools",
        "data.multiturn.enable_thinking_key=think",
        "+data.apply_chat_template_kwargs.enable_thinking=false",
        "data.custom_cls.path=null",
        "model.external_lib=null",
        "model.fsdp_config.cpu_offload=true",
        "model.lora_rank=0",
        "model.use_liger=false",
        "optim.betas=[0.9,0.99]",
        "optim.weight_decay=0.0",
        "optim.min_lr_ratio=0.1",
        "optim.lr_warmup_steps=3",
        "trainer.resume_from_path=null",
        "trainer.checkpoint.load_contents=[model]",
        "trainer.device=cpu",
    ]
    cfg = compose(verl_production(paths)[:-13] + extra)
    assert cfg.trainer.total_training_steps == 10 and cfg.optim.betas == [0.9, 0.99]
    assert cfg.data.apply_chat_template_kwargs == {"enable_thinking": False}
    assert cfg.trainer.checkpoint.load_contents == ["model"]


@pytest.mark.parametrize(
    "override,needle",
    [
        ("data.nope=3", "unknown config key 'data.nope'"),
        ("trainer.totl_epochs=3", "unknown config key 'trainer.totl_epochs'"),
        ("+data.nope=3", "unknown config key 'data.nope'"),  # `+` must not smuggle a key past the schema
        ("+foo=1", "unknown config key 'foo'"),
        ("data.train_batch_size=abc", "data.train_batch_size"),
        ("trainer.save_freq=often", "trainer.save_freq"),
    ],
)
def test_compose_errors_name_the_key(paths, override, needle):
    with pytest.raises(ConfigError) as e:
        compose([*paths, override])
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_missing_required_key():
    with pytest.raises(ConfigError, match="data.train_files is required"):
        compose([])


@pytest.mark.parametrize(
    "override,needle",
    [
        ("data.micro_batch_size=8", "data.micro_batch_size_per_gpu"),
        ("data.train_batch_size=6", "data.train_batch_size=6 is not divisible"),
        ("data.micro_batch_size_per_gpu=0", "data.micro_batch_size_per_gpu=0"),
        ("data.truncation=middle", "data.truncation='middle'"),
        ("data.balance_dp_token=false", "data.balance_dp_token=false"),
        ("data.use_shm=true", "data.use_shm=true"),
        ("data.custom_cls.path=x.py", "data.custom_cls"),
        ("data.val_files=/does/not/exist.parquet", "data.val_files: file not found: /does/not/exist.parquet"),
        ("model.strategy=fsdp", "model.strategy='fsdp'"),
        ("model.fsdp_config.model_dtype=fp8", "model.fsdp_config.model_dtype='fp8'"),
        ("model.fsdp_config.wrap_policy.min_num_params=100", "wrap_policy.min_num_params=100"),
        ("model.use_shm=true", "model.use_shm=true"),
        ("model.lora_alpha=32", "model.lora_alpha=32 is set but model.lora_rank=0"),
        ("model.lora_rank=-1", "model.lora_rank=-1: must be >= 0"),
        ("model.lora_adapter_path=/x", "model.lora_adapter_path='/x' is set but model.lora_rank=0"),
        ("model.use_liger=true", "model.use_liger=true: Liger's kernels run on CUDA GPUs only"),
        (
            "model.gradient_checkpointing_mode=some",
            "model.gradient_checkpointing_mode='some': choose auto, full or selective",
        ),
        ("model.use_liger=maybe", "model.use_liger='maybe': choose true, false or auto"),
        (
            "model.compile=true model.gradient_checkpointing_mode=selective",
            "model.gradient_checkpointing_mode=selective with model.compile=true",
        ),
        ("model.compile=true model.use_liger=true", "model.use_liger=true with model.compile=true"),
        ("optim.lr=0", "optim.lr=0"),
        ("optim.betas=[0.9]", "optim.betas"),
        ("optim.lr_scheduler=linear", "optim.lr_scheduler='linear'"),
        ("optim.lr_warmup_steps_ratio=1.5", "optim.lr_warmup_steps_ratio=1.5"),
        ("optim.clip_grad=0", "optim.clip_grad=0"),
        ("trainer.logger=[console,mlflow]", "trainer.logger: unknown ['mlflow']"),
        ("trainer.save_freq=0", "trainer.save_freq=0"),
        ("trainer.max_ckpt_to_keep=0", "trainer.max_ckpt_to_keep=0"),
        ("trainer.resume_mode=maybe", "trainer.resume_mode='maybe'"),
        ("trainer.resume_mode=resume_path", "trainer.resume_from_path"),
        ("trainer.checkpoint.save_contents=[weights]", "trainer.checkpoint.save_contents: unknown ['weights']"),
        ("trainer.default_hdfs_dir=hdfs://x", "trainer.default_hdfs_dir"),
        ("trainer.device=tpu", "trainer.device='tpu'"),
        ("trainer.nnodes=2", "trainer.nnodes=2 but torchrun started 1 node"),
        ("trainer.n_gpus_per_node=8", "trainer.n_gpus_per_node=8 but torchrun started 2"),
        ("ulysses_sequence_parallel_size=3", "ulysses_sequence_parallel_size=3 does not divide the world size 2"),
        (
            "ulysses_sequence_parallel_size=2 use_remove_padding=false",
            "ulysses_sequence_parallel_size=2 needs use_remove_padding=true",
        ),
        (
            "data.max_token_len_per_gpu=4096 use_remove_padding=false",
            "data.max_token_len_per_gpu=4096 needs use_remove_padding=true",
        ),
        ("trainer.checkpoint.hf_dtype=fp16", "trainer.checkpoint.hf_dtype='fp16'"),
        ("model.attn_kernel=fa3", "model.attn_kernel='fa3': choose one of auto, fa4, flash_attn, torch"),
        ("model.attn_kernel=torch use_remove_padding=false", "which only use_remove_padding=true runs"),
        ("model.attn_kernel=torch trainer.device=cpu", "model.attn_kernel=torch: attention kernels run on CUDA GPUs"),
        ("trainer.total_epochs=0", "trainer.total_epochs=0"),
        ("trainer.dist_timeout_s=0", "trainer.dist_timeout_s=0"),
        ("trainer.preempt_grace_s=0", "trainer.preempt_grace_s=0"),
    ],
)
def test_validation_errors(paths, override, needle):
    cfg = compose([*paths, "data.train_batch_size=8", "data.micro_batch_size_per_gpu=2", *override.split(" ")])
    with pytest.raises(ConfigError) as e:
        validate_config(cfg, WORLD2)
    assert needle in str(e.value), str(e.value)
    assert "\n" not in str(e.value)


def test_a_named_attention_kernel_must_be_installed(paths, monkeypatch):
    import sft.config.model_checks

    monkeypatch.setattr(sft.config.model_checks, "resolve_device_type", lambda device: "cuda")  # as on a GPU machine
    monkeypatch.setattr(sft.config.model_checks, "attn_installed", lambda name: name == "torch")
    base = [*paths, "data.train_batch_size=8", "data.micro_batch_size_per_gpu=2"]
    validate_config(compose([*base, "model.attn_kernel=torch"]), WORLD2)
    with pytest.raises(ConfigError, match=r"model.attn_kernel=fa4: FlashAttention-4 .* is not installed \(pip install"):
        validate_config(compose([*base, "model.attn_kernel=fa4"]), WORLD2)
    with pytest.raises(ConfigError, match="model.attn_kernel=fa4 with model.compile=true: torch.compile cannot trace"):
        validate_config(compose([*base, "model.attn_kernel=fa4", "model.compile=true"]), WORLD2)


def test_token_budget_rules(paths):
    base = [*paths, "use_remove_padding=true", "data.max_length=1024", "data.train_batch_size=6"]
    cfg = compose([*base, "data.max_token_len_per_gpu=512"])
    with pytest.raises(ConfigError, match="below data.max_length=1024: a sample of full length would not fit"):
        validate_config(cfg, WORLD2)
    # With sp=2 each GPU holds half of the packed row, so 512 per GPU fits a 1024-token sample;
    # a token budget needs only the global batch to split over dp ranks (6 % 1), not micro-batches.
    cfg = compose([*base, "data.max_token_len_per_gpu=512", "ulysses_sequence_parallel_size=2"])
    validate_config(cfg, WORLD2)
    cfg = compose([*base, "data.train_batch_size=7", "data.max_token_len_per_gpu=2048"])
    with pytest.raises(ConfigError, match="data.train_batch_size=7 is not divisible by the 2 data-parallel ranks"):
        validate_config(cfg, WORLD2)


def test_missing_files_are_named(tmp_path):
    cfg = compose([f"data.train_files={tmp_path}/nope.parquet", f"model.partial_pretrain={tmp_path}"])
    with pytest.raises(ConfigError, match=f"data.train_files: file not found: {tmp_path}/nope.parquet"):
        validate_config(cfg, WORLD2)


def test_plan_numbers_and_errors(paths):
    cfg = compose([*paths, "data.train_batch_size=8", "data.micro_batch_size_per_gpu=2", "trainer.total_epochs=3"])
    plan = make_plan(cfg, world_size=2, train_len=35)
    assert (plan.dp_size, plan.per_rank_batch, plan.micro_batches) == (2, 4, 2)
    assert (plan.steps_per_epoch, plan.total_steps, plan.warmup_steps) == (4, 12, 0)
    with pytest.raises(ConfigError, match="larger than the training set"):
        make_plan(cfg, world_size=2, train_len=7)
    cfg = compose([*paths, "data.train_batch_size=8", "trainer.total_training_steps=20"])
    with pytest.raises(ConfigError, match="raise trainer.total_epochs"):
        make_plan(cfg, world_size=2, train_len=35)
    cfg = compose([*paths, "data.train_batch_size=8", "optim.lr_warmup_steps=4"])
    with pytest.raises(ConfigError, match="warmup of 4 steps"):
        make_plan(cfg, world_size=2, train_len=35)


def test_cli_prints_one_line_and_exit_code_2(paths):
    r = subprocess.run(
        [sys.executable, "-m", "sft.fsdp_sft_trainer", *paths, "data.bogus=1"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "sft: config error: unknown config key 'data.bogus' (from data.bogus=1): it is not in "
        "sft/config/sft_trainer.yaml; check the spelling"
    ]


def test_a_resume_that_would_load_no_weights_is_refused(demo_dir, tmp_path):
    """load_contents follows save_contents unless set: with save_contents=[] a resume would load nothing and start
    again from step 1, silently. It is refused before loading, for an explicit path and for an automatic resume that
    finds a checkpoint; with load_contents set, or nothing to resume, it passes."""
    from conftest import base_overrides

    ckpt = tmp_path / "out" / "global_step_3"
    ckpt.mkdir(parents=True)
    (ckpt / "COMPLETE").write_text("{}")
    one = WorldInfo(rank=0, local_rank=0, world_size=1, local_world_size=1)
    base = [*base_overrides(demo_dir, tmp_path / "out"), "trainer.device=cpu"]
    for extra in (
        ["trainer.resume_mode=resume_path", f"trainer.resume_from_path={ckpt}"],
        ["trainer.resume_mode=auto"],
    ):
        with pytest.raises(ConfigError, match="would load no model weights"):
            validate_config(compose([*base, *extra]), one)
        validate_config(compose([*base, *extra, "trainer.checkpoint.load_contents=[model,optimizer,extra]"]), one)
    validate_config(
        compose(
            [
                *base[:-1],
                f"trainer.default_local_dir={tmp_path / 'empty'}",
                "trainer.device=cpu",
                "trainer.resume_mode=auto",
            ]
        ),
        one,
    )
