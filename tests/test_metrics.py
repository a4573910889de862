"""Metric sinks (sft/loop/loggers.py), FLOP accounting (sft/loop/flops.py) and step rates
(sft/loop/throughput.py), checked against hand-computed values."""

from __future__ import annotations

import io
import json
import logging
import sys
import time
from types import SimpleNamespace

import pytest
import torch

from sft.loop.flops import matmul_params, mfu, model_flops_per_token, peak_flops_per_gpu, useful_flops
from sft.loop.loggers import MetricsLogger
from sft.loop.throughput import StepTimer, step_rates


def _logger(backends: list[str], out_dir, rank: int = 0, **kw) -> MetricsLogger:
    return MetricsLogger(
        backends=backends,
        out_dir=str(out_dir),
        project="proj",
        experiment="exp",
        config={"optim": {"lr": 3e-4}, "marker": "cfg-marker-7731"},
        total_steps=10,
        rank=rank,
        **kw,
    )


def test_file_appends_across_lifetimes(tmp_path) -> None:
    out = tmp_path / "a" / "b"  # missing folders are created
    first = _logger(["file"], out)
    first.log({"train/loss": 2.5, "train/lr": 1e-5}, step=1)
    first.log({"train/loss": 2.25, "train/tokens": 512}, step=2)
    # Flushed per line: readable before close (a crash keeps history).
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    first.close()

    second = _logger(["file"], out, resume=True)
    second.log({"train/loss": 2.0, "val/loss": 2.1}, step=3)
    second.close()

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert [r["train/loss"] for r in rows] == [2.5, 2.25, 2.0]
    assert rows[1]["train/tokens"] == 512 and isinstance(rows[1]["train/tokens"], int)
    assert rows[2]["val/loss"] == 2.1


def test_tensor_values_are_written_as_numbers(tmp_path) -> None:
    ml = _logger(["file"], tmp_path)
    ml.log({"train/loss": torch.tensor(1.5)}, step=4)
    ml.close()
    ml.close()  # closing twice is harmless
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == {
        "step": 4,
        "train/loss": 1.5,
    }


def test_nonzero_rank_is_a_noop(tmp_path, monkeypatch) -> None:
    # Rank 1 must build no sink: the wandb/tensorboard ones would import their packages.
    for sink in ("_Wandb", "_TensorBoard", "_JsonlFile", "_Console"):
        monkeypatch.setattr(f"sft.loop.loggers.{sink}", lambda *a, **k: pytest.fail("a sink was built on rank 1"))
    out = tmp_path / "run"
    ml = _logger(["console", "file", "wandb", "tensorboard"], out, rank=1)
    ml.log({"train/loss": 1.0}, step=1)
    ml.close()
    assert ml.run_id is None
    assert not out.exists()


def test_unknown_backend_message(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"trainer.logger.*'mlflow'.*console.*tensorboard"):
        _logger(["console", "mlflow"], tmp_path)
    # Refused on every rank, so the other ranks do not wait on a dead rank 0.
    with pytest.raises(ValueError, match="trainer.logger"):
        _logger(["mlflow"], tmp_path, rank=3)


@pytest.mark.parametrize("rank", [0, 3])
def test_missing_tracker_package_message(tmp_path, monkeypatch, rank) -> None:
    # A None entry in sys.modules makes the package unimportable (find_spec returns None).
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ValueError, match=r"trainer.logger contains 'wandb' but .* not installed; `pip install wandb`"):
        _logger(["console", "wandb"], tmp_path, rank=rank)


def test_missing_tracker_package_is_a_config_error(monkeypatch) -> None:
    from sft.cli import compose
    from sft.config.checks import _check_trainer
    from sft.config.errors import ConfigError
    from sft.parallel.distributed import WorldInfo

    monkeypatch.setitem(sys.modules, "tensorboard", None)
    cfg = compose(["data.train_files=t.parquet", "model.partial_pretrain=m", "trainer.logger=[console,tensorboard]"])
    with pytest.raises(ConfigError, match=r"trainer.logger contains 'tensorboard' but .* `pip install tensorboard`"):
        _check_trainer(cfg, WorldInfo(rank=0, local_rank=0, world_size=1, local_world_size=1))


def test_console_lines(tmp_path, caplog) -> None:
    caplog.set_level(logging.INFO, logger="sft")
    ml = _logger(["console"], tmp_path)
    train = {
        "train/loss": 2.34123,
        "train/lr": 1.2e-5,
        "train/grad_norm": 0.871,
        "train/tokens_per_s_per_gpu": 12345.0,
        "train/step_time_s": 1.2,
    }
    ml.log(train, step=1)
    ml.log({**train, "val/loss": 2.5}, step=2)
    ml.close()
    lines = [r.getMessage() for r in caplog.records if r.name == "sft"]
    assert lines[0] == "step 1/10 | loss 2.3412 | lr 1.2e-05 | gnorm 0.871 | 12.3k tok/s/gpu | 1.20 s"
    assert lines[1].startswith("step 2/10 | loss 2.3412 |") and "ETA 0:00:00 (20%)" in lines[1]
    assert lines[2] == "step 2/10 | val loss 2.5000"
    assert not list(tmp_path.iterdir())  # the console writes no files
    caplog.clear()
    ml = _logger(["console"], tmp_path)
    ml.log({"train/loss": 1.0, "train/peak_mem_gb": 12.345}, step=1)
    assert caplog.records[-1].getMessage() == "step 1/10 | loss 1.0000 | mem 12.3 GB"


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_on_a_terminal(tmp_path, monkeypatch) -> None:
    term = _Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    log = logging.getLogger("sft")  # as setup_logging configures it on rank 0
    log.handlers[:] = [logging.StreamHandler(term)]
    log.setLevel(logging.INFO)
    log.propagate = False
    ml = _logger(["console"], tmp_path)
    for step in (4, 5, 6):  # a resumed run: the bar starts at its first logged step
        ml.log({"train/loss": 2.0 / step, "train/lr": 1e-4, "train/tokens_per_s_per_gpu": 2500.0}, step=step)
    ml.log({"val/loss": 0.75}, step=6)
    bar_lines = term.getvalue().split("\r")
    ml.close()
    assert any("6/10" in part and "loss 0.3333 | lr 0.0001 | 2.5k tok/s/gpu" in part for part in bar_lines)
    assert "step 6/10 | val loss 0.7500\n" in term.getvalue()  # printed above the bar, whole
    assert "step 4/10 | loss" not in term.getvalue()  # no plain train lines on a terminal
    assert log.handlers and isinstance(log.handlers[0], logging.StreamHandler)  # redirect undone
    assert log.handlers[0].stream is term


def test_plain_lines_when_not_a_terminal(tmp_path, monkeypatch, caplog) -> None:
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    caplog.set_level(logging.INFO, logger="sft")
    ml = _logger(["console"], tmp_path)
    ml.log({"train/loss": 1.5}, step=1)
    ml.close()
    assert [r.getMessage() for r in caplog.records] == ["step 1/10 | loss 1.5000"]
    assert "\r" not in sys.stderr.getvalue()


def test_tensorboard_event_file(tmp_path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ml = _logger(["tensorboard"], tmp_path)
    ml.log({"train/loss": 3.0}, step=1)
    ml.log({"train/loss": 2.0}, step=2)
    ml.close()
    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [
        (1, 3.0),
        (2, 2.0),
    ]


def test_wandb_offline(tmp_path, monkeypatch) -> None:
    try:
        import wandb  # noqa: F401
    except ImportError:
        pytest.skip("wandb is not installed")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    ml = _logger(["wandb", "file"], tmp_path / "out")
    ml.log({"train/loss": 1.25}, step=1)
    run_id = ml.run_id
    ml.close()
    assert isinstance(run_id, str) and run_id
    run_dirs = list((tmp_path / "out" / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(run_dirs) == 1
    # Offline runs keep the config in the run's record log (run-<id>.wandb, protobuf with
    # JSON-encoded values); online/synced runs also write files/config.yaml.
    record = (run_dirs[0] / f"run-{run_id}.wandb").read_bytes()
    assert b'"cfg-marker-7731"' in record and b'{"lr":0.0003}' in record

    # A resumed run (the id comes back from the checkpoint) continues the same run id;
    # offline, wandb writes a second folder with that id, merged by `wandb sync`. Folders are named
    # by the second the run starts (offline-run-YYYYMMDD_HHMMSS-id): a real relaunch is seconds apart,
    # so wait for the next second rather than let two starts in one second share a folder.
    time.sleep(1.1)
    resumed = _logger(["wandb"], tmp_path / "out", resume=True, run_id=run_id)
    resumed.log({"train/loss": 1.0}, step=2)
    resumed.close()
    assert resumed.run_id == run_id
    run_dirs = sorted((tmp_path / "out" / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(run_dirs) == 2
    assert b'"cfg-marker-7731"' in (run_dirs[1] / f"run-{run_id}.wandb").read_bytes()


# A small GQA decoder: hidden 64, 8 heads of d = 64/8 = 8, 2 kv heads, MLP 256, 2 layers.
_CFG = SimpleNamespace(
    hidden_size=64,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=8,
    num_key_value_heads=2,
    vocab_size=1000,
)
# Per layer: q 64*64 = 4096, o 4096, k 64*(2*8) = 1024, v 1024  -> attention 10240
#            gate/up/down 3*64*256 = 49152                     -> layer 59392
# N = 2*59392 + LM head 1000*64 = 118784 + 64000 = 182784 (embedding lookup not counted)
_N = 182_784


def test_matmul_params_by_hand() -> None:
    assert matmul_params(_CFG) == _N
    # head_dim decoupled from hidden/heads (Qwen3 style): d = 16, 8 heads, 2 kv heads.
    # q 64*128 = 8192, o 8192, k 64*32 = 2048, v 2048, MLP 49152 -> layer 69632
    # N = 2*69632 + 64000 = 203264
    assert matmul_params(SimpleNamespace(**vars(_CFG), head_dim=16)) == 203_264


def test_matmul_params_equals_linear_weights_of_a_real_model() -> None:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(**vars(_CFG), tie_word_embeddings=True)
    model = Qwen2ForCausalLM(cfg)
    # Every nn.Linear weight (the tied LM head included) is a matmul; biases are not.
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert matmul_params(cfg) == linear == _N


@pytest.mark.parametrize("model_type", ["starcoder2", "glm4", "cohere2", "olmo3"])
def test_matmul_params_follows_each_familys_mlp(model_type) -> None:
    """The MLP's matrix count comes from the family row: StarCoder2's plain c_fc/c_proj MLP has 2 matrices
    (N = 182784 - 2*64*256 = 150016), GLM-4's fused gate_up_proj is still 3; q/k norms are not matmuls."""
    from transformers import AutoConfig, AutoModelForCausalLM

    ids = dict(pad_token_id=None, bos_token_id=None, eos_token_id=None)
    cfg = AutoConfig.for_model(model_type, **vars(_CFG), head_dim=8, tie_word_embeddings=False, **ids)
    model = AutoModelForCausalLM.from_config(cfg)
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert matmul_params(cfg) == linear == (150_016 if model_type == "starcoder2" else _N)


def _moe_weights(model: torch.nn.Module, top_k: int, n_experts: int) -> tuple[int, int, int]:
    """(nn.Linear weights, router weights, top_k / n_experts of the 3-D expert weights) of a real model."""
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    routers = sum(m.weight.numel() for n, m in model.named_modules() if n.endswith("mlp.gate"))
    experts = sum(
        (m.gate_up_proj.numel() + m.down_proj.numel()) * top_k // n_experts
        for n, m in model.named_modules()
        if n.endswith("mlp.experts")
    )
    return linear, routers, experts


def test_matmul_params_counts_the_shared_expert() -> None:
    """Qwen2-MoE: router + top-k routed experts + the always-on shared expert and its hidden x 1 gate."""
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    cfg = Qwen2MoeConfig(
        **vars(_CFG), num_experts=8, num_experts_per_tok=3, moe_intermediate_size=16, shared_expert_intermediate_size=48
    )
    model = Qwen2MoeForCausalLM(cfg)
    linear, routers, experts = _moe_weights(model, top_k=3, n_experts=8)  # linear incl. the shared expert
    shared = sum(m.weight.numel() for n, m in model.named_modules() if "shared_expert" in n and hasattr(m, "weight"))
    assert routers > 0 and experts > 0 and shared == 2 * (3 * 64 * 48 + 64)
    assert matmul_params(cfg) == linear + routers + experts


def test_model_flops_per_token_by_hand() -> None:
    # 6N = 1,096,704; 12*L*H*d*s = 12*2*8*8*128 = 196,608; sum 1,293,312
    assert model_flops_per_token(_CFG, 128) == 1_293_312


def test_useful_flops_by_hand() -> None:
    # Two real samples of 100 and 28 tokens: T = 128, sum s^2 = 10000 + 784 = 10784.
    # 6N*T = 1,096,704 * 128 = 140,378,112; 6*L*H*d*sum s^2 = 768 * 10784 = 8,282,112
    assert useful_flops(_CFG, [100, 28]) == 148_660_224
    # One full row of s tokens: useful attention is half of the model convention's.
    model_attn = model_flops_per_token(_CFG, 128) * 128 - 6 * _N * 128
    assert useful_flops(_CFG, [128]) - 6 * _N * 128 == model_attn / 2


def test_peak_flops_and_mfu(monkeypatch) -> None:
    assert peak_flops_per_gpu(torch.device("cpu")) is None
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "NVIDIA H100 80GB HBM3")
    assert peak_flops_per_gpu(cuda) == 989e12
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "NVIDIA H200")
    assert peak_flops_per_gpu(cuda) == 989e12
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "NVIDIA A10G")
    assert peak_flops_per_gpu(cuda) is None
    # 2 GPUs, 2 s, 989e12 each: 989e12 FLOPs is a quarter of what they could do.
    assert mfu(989e12, 2.0, 989e12, n_gpus=2) == pytest.approx(0.25)
    assert mfu(1.0, 1.0, None) is None


def test_step_rates(monkeypatch) -> None:
    # 2 GPUs, 0.5 s: 1000 real tokens are 1000 tok/s per GPU; 989e12 useful FLOPs a quarter of the peak.
    cpu = step_rates(1000.0, 400.0, 989e12, 0.5, 2, None, torch.device("cpu"))
    assert cpu == {
        "train/step_time_s": 0.5,
        "train/tokens_per_s_per_gpu": 1000.0,
        "train/trained_tokens_per_s_per_gpu": 400.0,
    }  # no peak: no MFU; not CUDA: no memory
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a: 3 * 1024**3)
    cuda = step_rates(1000.0, 400.0, 989e12, 0.5, 2, 989e12, torch.device("cuda"))
    assert cuda["train/mfu"] == pytest.approx(1.0) and cuda["train/peak_mem_gb"] == 3.0


def test_config_checks_use_the_loggers_own_backend_list() -> None:
    from sft.config import checks
    from sft.loop.loggers import LOGGER_BACKENDS

    assert not hasattr(checks, "LOGGERS") and checks.LOGGER_BACKENDS is LOGGER_BACKENDS


def test_step_timer_skips_warmup() -> None:
    timer = StepTimer(torch.device("cpu"), warmup=1)
    assert timer.median_s is None
    for _ in range(3):
        timer.start()
        elapsed = timer.stop()
        assert elapsed >= 0.0
    assert len(timer.times) == 2 and timer.median_s is not None


@pytest.mark.parametrize("dense_layers", [{}, {"mlp_only_layers": [0]}, {"decoder_sparse_step": 2}])
def test_matmul_params_counts_active_experts_of_a_real_moe_model(dense_layers) -> None:
    """MoE MFU is on active parameters: the real model's linear weights, the router, and top-k of the
    E experts' weights in each sparse layer (dense layers keep their full MLP)."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    cfg = Qwen3MoeConfig(**vars(_CFG), num_experts=8, num_experts_per_tok=3, moe_intermediate_size=16, **dense_layers)
    model = Qwen3MoeForCausalLM(cfg)
    linear, routers, experts = _moe_weights(model, top_k=3, n_experts=8)
    assert routers > 0 and experts > 0
    assert matmul_params(cfg) == linear + routers + experts


def test_flops_formula_is_exact_wherever_mfu_is_reported(demo_dir, tmp_path) -> None:
    """Where `flops_reason` is None (MFU reported), N equals the nn.Linear weights of the real model, for every dense
    family the tests build; where the formula does not hold (MLA, recurrent mixers, a type outside the table),
    `flops_reason` says why and the trainer reports no MFU."""
    from family_models import FAMILY_TYPES, write_family_model
    from hybrid_models import write_hybrid_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from sft.loop.flops import flops_reason
    from sft.models.families import moe_spec, num_experts

    checked = []
    for t in FAMILY_TYPES:
        cfg = AutoConfig.from_pretrained(write_family_model(demo_dir / "model", tmp_path / t, t))
        spec = moe_spec(cfg)
        if spec is not None and cfg.model_type in (
            "mixtral",
            "gpt_oss",
            "minimax_m2",
            "olmoe",
            "flex_olmo",
            "granitemoe",
        ):
            del cfg.moe_intermediate_size  # the test rows set it; these families' experts use intermediate_size
        model = AutoModelForCausalLM.from_config(cfg)
        active = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
        if spec is not None:  # + the routers' weights + top-k / E of the 3-D expert weights
            k, e = int(getattr(cfg, spec.top_k_key)), num_experts(cfg, spec)
            for m in model.modules():
                name = type(m).__name__
                weight = getattr(m, "weight", None)  # a router holding a Linear is counted with the Linears
                if name.lower().endswith(spec.router_suffix) and isinstance(weight, torch.nn.Parameter):
                    active += weight.numel()
                if name.endswith("Experts"):
                    active += sum(p.numel() * k // e for p in m.parameters(recurse=False) if p.dim() == 3)
        if flops_reason(cfg) is None:
            assert matmul_params(cfg) == active, t
            checked.append(t)
    assert len(checked) >= 15 and {"glm4_moe", "qwen2_moe", "mixtral", "gpt_oss"} <= set(checked), checked
    mla = AutoConfig.from_pretrained(write_family_model(demo_dir / "model", tmp_path / "mla", "deepseek_v3"))
    assert "multi-head latent attention" in flops_reason(mla)
    hybrid = AutoConfig.from_pretrained(write_hybrid_model(demo_dir / "model", tmp_path / "gdn", "qwen3_5_text"))
    assert "recurrent layers" in flops_reason(hybrid)
    assert "no row" in flops_reason(AutoConfig.for_model("exaone4"))
