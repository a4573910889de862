"""Driver of scripts/gpu_families.sh (issue 15): model-family equivalences and MoE throughput.

  python3 scripts/gpu_families.py assets WORKDIR        model folders + parquets (DRY=1: tiny shapes)
  python3 scripts/gpu_families.py report WORKDIR OUT    table of the runs' metrics.jsonl (printed last)

Equivalence models: Gemma 3 / gpt-oss / Qwen3-MoE shapes at reduced width with a 256-token window
(samples are ~800 tokens, so windows matter). Speed model: Qwen3-30B-A3B dimensions with
$MOE_LAYERS layers, against the dense Qwen2.5-1.5B shape on the same samples. MFU is useful MFU
(sft.loop.metrics: active parameters for MoE, i.e. attention, router, top-k experts and LM head).
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import sys
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from sft.loop.metrics import matmul_params, useful_flops

DRY = os.environ.get("DRY") == "1"
PEAK = 989e12  # bf16 dense H100/H200 SXM (docs/DESIGN.md)
WINDOW = 16 if DRY else 256
SMALL = (
    dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2)
    if DRY
    else dict(
        hidden_size=1024, intermediate_size=2816, num_hidden_layers=6, num_attention_heads=16, num_key_value_heads=4
    )
)
HEAD_DIM = 16 if DRY else 64
LAYERS = ["sliding_attention", "full_attention", "sliding_attention"] * (1 if DRY else 2)
EXPERTS = dict(num_experts_per_tok=2 if DRY else 4, moe_intermediate_size=64 if DRY else 512, router_aux_loss_coef=0.01)
N_EXP = 4 if DRY else 16
EQUIV = {
    "gemma3_text": dict(layer_types=LAYERS, sliding_window=WINDOW, query_pre_attn_scalar=HEAD_DIM),
    "gpt_oss": dict(EXPERTS, layer_types=LAYERS, sliding_window=WINDOW, num_local_experts=N_EXP),
    "qwen3_moe": dict(EXPERTS, num_experts=N_EXP, num_local_experts=N_EXP, mlp_only_layers=[], decoder_sparse_step=1),
}
# Qwen3-30B-A3B: hidden 2048, 32 heads x 128, 4 KV heads, 128 experts (top 8) of width 768, vocab 151936.
A3B = (
    dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=8, num_local_experts=8)
    | dict(num_experts_per_tok=2, moe_intermediate_size=32, intermediate_size=128, vocab_size=1024)
    if DRY
    else dict(hidden_size=2048, num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128)
    | dict(num_local_experts=128, num_experts_per_tok=8, moe_intermediate_size=768, intermediate_size=6144)
    | dict(vocab_size=151936)
)
A3B_LAYERS = int(os.environ.get("MOE_LAYERS", "2" if DRY else "4"))


def write_model(model_type: str, kw: dict, tok_dir: Path, out: Path) -> None:
    if (out / "config.json").exists():
        return
    out.mkdir(parents=True, exist_ok=True)
    for f in tok_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template", "generation_config")):
            shutil.copy(f, out / f.name)
    vocab = kw.pop("vocab_size", None) or AutoConfig.from_pretrained(tok_dir).vocab_size
    cfg = AutoConfig.for_model(model_type, vocab_size=vocab, max_position_embeddings=8192, attention_dropout=0.0, **kw)
    cfg.use_cache = False
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(out)


def assets(work: Path) -> None:
    from sft.bench.assets import ensure_assets

    tiny, data = ensure_assets(work, "tiny", 64 if DRY else 512, 256 if DRY else 2048, 0)
    _, fixed = ensure_assets(
        work, "tiny", 32 if DRY else 1024, 256 if DRY else 4096, 0, sample_length=128 if DRY else 4096
    )
    for t, extra in EQUIV.items():
        write_model(t, dict(SMALL, head_dim=HEAD_DIM, **extra), tiny, work / f"eq-{t}")
    write_model("qwen3_moe", dict(A3B, num_hidden_layers=A3B_LAYERS, mlp_only_layers=[]), tiny, work / "a3b")
    dense, _ = ensure_assets(work, "tiny" if DRY else "qwen2.5-1.5b", 8, 256, 0)
    if not (work / "dense").exists():
        (work / "dense").symlink_to(dense)
    print(data, fixed, work / "dense")


def _metrics(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def report(work: Path, out: Path) -> None:
    rows, lines = {}, []
    for t in EQUIV:
        pad, rm = _metrics(work / f"eq-{t}-padded"), _metrics(work / f"eq-{t}-rmpad")
        if not (work / f"eq-{t}-padded").exists():  # EQ=0: not run
            continue
        a = [m["train/loss"] for m in pad if "train/loss" in m]
        b = [m["train/loss"] for m in rm if "train/loss" in m]
        rel = max((abs(x - y) / abs(x) for x, y in zip(a, b)), default=float("nan")) if a and len(a) == len(b) else None
        rows[f"equiv {t}"] = {"steps": len(a), "max_rel_loss_diff": rel, "padded": a, "rmpad": b}
        lines.append(f"equiv {t:12s} steps {len(a):3d}  max rel |loss padded - rmpad| {rel}")
    seq = int(os.environ.get("SEQ", "128" if DRY else "4096"))
    for name in ("grouped_mm", "eager", "dense"):
        run = work / ("dense-1.5b" if name == "dense" else f"a3b-{name}")
        ms = [m for m in _metrics(run) if "train/loss" in m]
        timed = ms[2:] or ms
        if not timed:
            lines.append(f"{name:10s} no steps (see its log)")
            continue
        cfg = AutoConfig.from_pretrained(work / ("dense" if name == "dense" else "a3b"))
        tps = statistics.median(m["train/tokens_per_s_per_gpu"] for m in timed)
        # sft.loop.metrics counts active parameters of MoE layers (router + top-k experts) and the LM head.
        mfu = tps * useful_flops(cfg, [seq]) / seq / PEAK
        peak = max((m.get("train/peak_mem_gb") or 0.0) for m in ms)
        load = ms[-1].get("train/moe_max_load")
        rows[name] = {
            "tokens_per_s": tps,
            "useful_mfu_active": mfu,
            "peak_mem_gb": peak,
            "steps": len(ms),
            "active_matmul_params": matmul_params(cfg),
            "max_load": load,
            "step_s": statistics.median(m.get("train/step_time_s", 0.0) for m in timed),
        }
        lines.append(
            f"{name:10s} {tps:10.0f} tok/s/GPU  useful MFU (active {matmul_params(cfg) / 1e9:.2f}B) {100 * mfu:5.1f}%  "
            f"peak {peak:6.1f} GB  aux {ms[-1].get('train/aux_loss')}  max load {load}"
        )
    g, e, d = rows.get("grouped_mm"), rows.get("eager"), rows.get("dense")
    if g and e:
        lines.append(f"grouped_mm / eager speed-up: {g['tokens_per_s'] / e['tokens_per_s']:.2f}x")
    if g and d:
        lines.append(f"MoE useful MFU / dense 1.5B: {g['useful_mfu_active'] / d['useful_mfu_active']:.2f}")
    (out / "families.json").write_text(json.dumps(rows, indent=1))
    (out / "families.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    cmd, work = sys.argv[1], Path(sys.argv[2])
    assets(work) if cmd == "assets" else report(work, Path(sys.argv[3]))
