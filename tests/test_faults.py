"""Faults a user meets in practice: a broken model folder or output path is refused before
anything loads (exit 2, one line); a checkpoint write that fails on one rank (disk full) stops
every rank with one message and leaves the previous checkpoint and the tracker untouched; a
newest checkpoint with deleted files is skipped on resume for the previous one."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import base_overrides
from distributed_helper import run_ranks
from test_e2e import ROOT, torchrun
from transformers import AutoConfig, AutoTokenizer

from sft.config.errors import ConfigError
from sft.config.model_checks import check_vocab


def run_trainer(overrides: list[str]) -> subprocess.CompletedProcess:
    """One process, no torchrun: config errors are found before the process group starts."""
    cmd = [sys.executable, "-m", "sft.fsdp_sft_trainer", *overrides]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120)


def broken_copy(demo: Path, tmp: Path, drop: list[str], edit_tokenizer_config: dict | None = None) -> Path:
    model = tmp / "model"
    shutil.copytree(demo / "model", model)
    for name in drop:
        (model / name).unlink()
    if edit_tokenizer_config is not None:
        cfg = json.loads((model / "tokenizer_config.json").read_text())
        (model / "tokenizer_config.json").write_text(json.dumps({**cfg, **edit_tokenizer_config}))
    return model


@pytest.mark.parametrize(
    "drop, needle",
    [
        (["config.json"], "not a Hugging Face model folder: no config.json in {model}"),
        (["model.safetensors"], "no weights in {model}; expected model.safetensors or pytorch_model.bin"),
        (["tokenizer.json", "tokenizer_config.json"], "no tokenizer files in {model}"),
        (
            ["chat_template.jinja"],
            "data.multiturn.enable=true but the tokenizer in {model} has no chat template; set data.chat_template "
            "or add chat_template to tokenizer_config.json",
        ),
    ],
)
def test_broken_model_folder_fails_before_loading(demo_dir, tmp_path, capsys, drop, needle):
    """In-process through the command line's code (a subprocess per case would cost ~7 s of imports)."""
    from sft.cli import run_cli

    model = broken_copy(demo_dir, tmp_path, drop)
    out = tmp_path / "out"
    rc = run_cli([*base_overrides(demo_dir, out), f"model.partial_pretrain={model}"], lambda cfg, ctx: None)
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sft: config error: "), err
    assert needle.format(model=model) in lines[0]
    assert not out.exists()


def test_command_exits_2_on_a_folder_without_config(demo_dir, tmp_path):
    model = broken_copy(demo_dir, tmp_path, ["config.json"])
    out = tmp_path / "out"
    r = run_trainer([*base_overrides(demo_dir, out), f"model.partial_pretrain={model}"])
    assert r.returncode == 2, r.stderr[-3000:]
    assert (
        r.stderr
        == f"sft: config error: model.partial_pretrain={model}: not a Hugging Face model folder: no config.json in {model}\n"
    )
    assert not out.exists()


def test_chat_template_from_config_key_is_accepted(demo_dir, tmp_path):
    """A template given by data.chat_template or inside tokenizer_config.json is enough."""
    from sft.cli import compose
    from sft.config.checks import validate_config
    from sft.parallel.distributed import WorldInfo

    model = broken_copy(demo_dir, tmp_path, ["chat_template.jinja"])
    ov = [*base_overrides(demo_dir, tmp_path / "out"), f"model.partial_pretrain={model}"]
    world = WorldInfo(rank=0, world_size=1, local_rank=0, local_world_size=1)
    validate_config(compose([*ov, "data.chat_template='{{ messages }}'"]), world)
    broken_copy(demo_dir, tmp_path / "b", ["chat_template.jinja"], {"chat_template": "{{ messages }}"})
    validate_config(compose([*ov, f"model.partial_pretrain={tmp_path}/b/model"]), world)


def test_output_dir_under_a_file_fails_at_start(demo_dir, tmp_path, capsys):
    from sft.cli import run_cli

    (tmp_path / "afile").write_text("x")
    out = tmp_path / "afile" / "run"
    assert run_cli(base_overrides(demo_dir, out), lambda cfg, ctx: None) == 2
    err = capsys.readouterr().err
    assert f"sft: config error: trainer.default_local_dir={out}: {tmp_path}/afile is a file" in err


def test_check_vocab(demo_dir):
    tok = AutoTokenizer.from_pretrained(demo_dir / "model")
    cfg = AutoConfig.from_pretrained(demo_dir / "model")
    check_vocab(tok, cfg)
    cfg.vocab_size = len(tok) - 1
    with pytest.raises(ConfigError, match=f"tokenizer has {len(tok)} tokens but the model's embedding has"):
        check_vocab(tok, cfg)


# ----- checkpoint faults: 2 gloo ranks, real saves -----
def run_overrides(demo: Path, out: Path, steps: int) -> list[str]:
    return base_overrides(demo, out) + [
        "data.train_max_samples=48",
        "data.train_batch_size=8",
        "data.micro_batch_size_per_gpu=4",
        f"trainer.total_training_steps={steps}",
        "trainer.save_freq=2",
        "trainer.resume_mode=auto",
        'trainer.checkpoint.save_contents=["model","optimizer","extra","hf_model"]',
    ]


def disk_full_at_step(overrides: list[str], step: int, fail_rank: int, what: str, err_dir: str) -> None:
    """Runs in a spawned rank: one rank's write of checkpoint `step` fails as on a full disk."""
    import torch.distributed as dist

    import sft.checkpoint.extra_state as es
    import sft.checkpoint.hf_export as hx
    import sft.checkpoint.manager as ck
    from sft.config.schema import load_config
    from sft.parallel.distributed import init_distributed, teardown
    from sft.trainer import FSDPSFTTrainer

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    # `what` names the writer that fails: the extra state's tensors, or the HF export's weights.
    modules = {"extra_state": es, "hf_export": hx}
    original = modules[what].save_file

    def save_file(tensors, filename, *args, **kwargs):
        hit = f"global_step_{step}/" in str(filename) and dist.get_rank() == fail_rank
        return full() if hit else original(tensors, filename, *args, **kwargs)

    modules[what].save_file = save_file
    cfg = load_config(overrides)
    ctx = init_distributed("cpu", cfg.ulysses_sequence_parallel_size)
    try:
        FSDPSFTTrainer(cfg, ctx).fit()
    except ck.CheckpointWriteError as exc:
        Path(err_dir, f"rank{ctx.rank}.txt").write_text(str(exc))
    finally:
        teardown()


def assert_step_2_intact(out: Path) -> None:
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    assert (out / "latest_checkpointed_iteration.txt").read_text() == "2"
    assert (out / "global_step_2" / "COMPLETE").exists()
    dcp_to_torch_save(out / "global_step_2" / "dcp", out.parent / "full.pt")  # every shard file reads back
    state = torch.load(out.parent / "full.pt", weights_only=False)
    assert state["model"].keys() and state["optimizer"]
    assert load_file(out / "global_step_2" / "huggingface" / "model.safetensors")


@pytest.mark.parametrize("fail_rank, what", [(1, "extra_state"), (0, "hf_export")])
def test_disk_full_while_saving_stops_all_ranks_and_keeps_the_last_checkpoint(demo_dir, tmp_path, fail_rank, what):
    out, errs = tmp_path / "run", tmp_path / "errs"
    errs.mkdir()
    run_ranks(disk_full_at_step, 2, run_overrides(demo_dir, out, 6), 4, fail_rank, what, str(errs))
    messages = [(errs / f"rank{r}.txt").read_text() for r in (0, 1)]
    assert messages[0] == messages[1] and "\n" not in messages[0]  # every rank stopped, with the same line
    assert f"could not write checkpoint {out}/global_step_4 (rank {fail_rank}: OSError: [Errno 28]" in messages[0]
    assert "No space left on device" in messages[0] and "GB free on" in messages[0]
    assert "last complete checkpoint (step 2) is untouched" in messages[0]
    assert not (out / "global_step_4").exists() and not (out / "global_step_6").exists()
    assert_step_2_intact(out)


def test_resume_skips_a_newest_checkpoint_with_deleted_files(demo_dir, tmp_path):
    out = tmp_path / "run"
    r = torchrun(2, run_overrides(demo_dir, out, 4))
    assert r.returncode == 0, r.stderr[-3000:]
    shards = list((out / "global_step_4" / "dcp").glob("*.distcp"))
    assert shards
    for f in shards:
        f.unlink()
    r = torchrun(2, run_overrides(demo_dir, out, 6) + ['trainer.logger=["file"]'])
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"checkpoint {out}/global_step_4 could not be loaded" in r.stderr
    assert f"resuming from {out}/global_step_2 instead of {out}/global_step_4" in r.stderr
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert sorted(set(steps)) == [3, 4, 5, 6]
    # Step 4 was trained again and saved afresh over the damaged folder.
    assert (out / "global_step_4" / "COMPLETE").exists() and not (out / "global_step_4" / "BROKEN").exists()
    assert list((out / "global_step_4" / "dcp").glob("*.distcp"))
    assert (out / "latest_checkpointed_iteration.txt").read_text() == "6"


def test_non_finite_loss_stops_before_the_update_and_keeps_the_checkpoint(demo_dir, tmp_path):
    """A NaN loss at step 3 stops the run with one line naming the step, before the optimizer
    step; the checkpoint of step 2 stays the latest and complete."""
    from workers import nan_at_step

    out = tmp_path / "run"
    overrides = base_overrides(demo_dir, out) + [
        "data.train_batch_size=8",
        "data.micro_batch_size_per_gpu=4",
        "trainer.total_training_steps=5",
        "trainer.save_freq=2",
        'trainer.checkpoint.save_contents=["model","optimizer","extra"]',
    ]
    run_ranks(nan_at_step, 2, overrides, 3, str(tmp_path / "result.pt"))
    result = torch.load(tmp_path / "result.pt", weights_only=False)
    assert result["code"] == 3
    assert "sft: error: step 3: non-finite loss nan" in result["stderr"]
    assert "the optimizer step was skipped" in result["stderr"]
    assert result["unchanged"] is True  # the queued fused update skipped itself: weights and AdamW state as before
    assert (out / "latest_checkpointed_iteration.txt").read_text() == "2"
    assert (out / "global_step_2" / "COMPLETE").exists() and not (out / "global_step_3").exists()


@pytest.mark.parametrize(
    "extra, refused",
    [
        (["use_remove_padding=true"], True),
        (["use_remove_padding=false"], True),
        (["use_remove_padding=true", "+model.override_config.attention_dropout=0.0"], "dropout"),
        (["+model.override_config.attention_dropout=0.0", "+model.override_config.dropout=0.0"], False),
    ],
)
def test_dropout_refused_before_loading(demo_dir, tmp_path, capsys, extra, refused):
    """A config.json with dropout (StarCoder2 ships 0.1 attention, residual and embedding dropout; OPT a 0.1
    `dropout`): random masks laid out by how each batch is split and packed make no run exact, in any mode, so it is
    refused in one line before loading, every key named with its override, until each is overridden to 0."""
    from sft.cli import run_cli

    model = broken_copy(demo_dir, tmp_path, [])
    cfg = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**cfg, "attention_dropout": 0.1, "dropout": 0.2}))
    out = tmp_path / "out"
    overrides = [o for o in base_overrides(demo_dir, out) if not o.startswith("use_remove_padding=")]
    rc = run_cli([*overrides, f"model.partial_pretrain={model}", *extra], lambda cfg, ctx: None)
    err = capsys.readouterr().err
    head = f"sft: config error: model.partial_pretrain={model}: config.json sets "
    tail = (
        ": dropout and router jitter are random in a layout that depends on how each batch is split and packed, so "
        "the loss would not be exact; set "
    )
    if refused is True:
        assert rc == 2 and err.strip() == (
            f"{head}attention_dropout=0.1, dropout=0.2{tail}+model.override_config.attention_dropout=0.0 "
            "+model.override_config.dropout=0.0"
        ), err
    elif refused == "dropout":
        assert rc == 2 and err.strip() == f"{head}dropout=0.2{tail}+model.override_config.dropout=0.0", err
    else:
        assert rc == 0, err
