"""CUDA checks (NCCL, bf16 mixed precision); skipped on machines without a GPU."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from conftest import base_overrides
from test_e2e import torchrun

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.mark.parametrize("model_dtype", ["fp32", "bf16"])
def test_bf16_fsdp2_training_on_cuda(demo_dir, tmp_path, model_dtype):
    out = tmp_path / model_dtype
    overrides = base_overrides(demo_dir, out) + [
        "trainer.device=cuda",
        f"model.fsdp_config.model_dtype={model_dtype}",
        "model.enable_gradient_checkpointing=true",
        "data.train_batch_size=16",
        "data.micro_batch_size_per_gpu=4",
        "optim.lr=3e-3",
        "trainer.total_training_steps=20",
        "trainer.total_epochs=2",
        'trainer.logger=["console","file"]',
    ]
    r = torchrun(torch.cuda.device_count(), overrides)
    assert r.returncode == 0, r.stderr[-3000:]
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [m["train/loss"] for m in records if "train/loss" in m]
    assert len(losses) == 20 and all(map(lambda x: x == x, losses))
    assert sum(losses[-3:]) / 3 < 0.85 * losses[0], losses
    assert all(m["train/peak_mem_gb"] > 0 for m in records if "train/loss" in m)


def _losses(out) -> list[float]:
    return [
        m["train/loss"] for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "train/loss" in m
    ]


def _cuda_run(demo_dir, out, nproc: int, extra: list[str]) -> list[float]:
    overrides = base_overrides(demo_dir, out) + [
        "trainer.device=cuda",
        "data.train_batch_size=16",
        "data.micro_batch_size_per_gpu=8",
        "optim.lr=1e-3",
        "trainer.total_training_steps=10",
        'trainer.logger=["file"]',
        *extra,
    ]
    r = torchrun(nproc, overrides)
    assert r.returncode == 0, r.stderr[-3000:]
    return _losses(out)


def test_varlen_matches_padded_on_cuda(demo_dir, tmp_path):
    padded = _cuda_run(demo_dir, tmp_path / "padded", 1, [])
    packed = _cuda_run(demo_dir, tmp_path / "packed", 1, ["use_remove_padding=true"])
    diff = max(abs(a - b) for a, b in zip(padded, packed))
    print(f"varlen vs padded, bf16 on CUDA, 10 steps: max |loss diff| = {diff:.2e}")
    assert diff < 2e-2 * max(padded)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_sp2_matches_sp1_on_cuda(demo_dir, tmp_path):
    sp1 = _cuda_run(demo_dir, tmp_path / "sp1", 1, ["use_remove_padding=true"])
    sp2 = _cuda_run(demo_dir, tmp_path / "sp2", 2, ["use_remove_padding=true", "ulysses_sequence_parallel_size=2"])
    diff = max(abs(a - b) for a, b in zip(sp1, sp2))
    print(f"sp=2 vs sp=1, bf16 on CUDA, 10 steps: max |loss diff| = {diff:.2e}")
    assert diff < 2e-2 * max(sp1)


def test_compile_matches_eager_on_cuda(demo_dir, tmp_path):
    eager = _cuda_run(demo_dir, tmp_path / "eager", 1, ["use_remove_padding=true"])
    compiled = _cuda_run(demo_dir, tmp_path / "compiled", 1, ["use_remove_padding=true", "model.compile=true"])
    diff = max(abs(a - b) for a, b in zip(eager, compiled))
    print(f"compiled vs eager layers, bf16 on CUDA, 10 steps: max |loss diff| = {diff:.2e}")
    assert diff < 2e-2 * max(eager)


# model.fp8 runs where torchao is installed and the GPU has FP8 GEMMs (compute capability 8.9+).
FP8_READY = (
    torch.cuda.is_available()
    and importlib.util.find_spec("torchao") is not None
    and torch.cuda.get_device_capability() >= (8, 9)
)
needs_fp8 = pytest.mark.skipif(not FP8_READY, reason="needs torchao and a GPU with FP8 (compute capability 8.9+)")


@needs_fp8
def test_fp8_matches_bf16_on_cuda(demo_dir, tmp_path):
    """model.fp8 (torchao's FP8 GEMMs in the decoder's linears) against bf16, 10 steps of the demo model, packed rows:
    tensorwise with FP8 all-gather (true), rowwise, with compiled layers, with selective checkpointing."""
    bf16 = _cuda_run(demo_dir, tmp_path / "bf16", 1, ["use_remove_padding=true"])
    variants = {
        "true": ["model.fp8=true"],
        "rowwise": ["model.fp8=rowwise"],
        "true+compile": ["model.fp8=true", "model.compile=true"],
        "true+selective": ["model.fp8=true", "model.enable_gradient_checkpointing=true"]
        + ["model.gradient_checkpointing_mode=selective"],
    }
    for name, extra in variants.items():
        fp8 = _cuda_run(demo_dir, tmp_path / name.replace("+", "_"), 1, ["use_remove_padding=true", *extra])
        diff = max(abs(a - b) / b for a, b in zip(fp8, bf16))
        print(f"model.fp8 {name} vs bf16 on CUDA, 10 steps: max relative |loss diff| = {diff:.2e}")
        assert len(fp8) == len(bf16) and diff < 2e-2, (name, fp8, bf16)


def _fit_without_syncs(trainer) -> list[float]:
    """Train with any host sync in the micro-batch loop raising; the logged training losses."""
    trainer.sync_debug = "error"
    logged: list[dict] = []
    original = trainer.metrics.log
    trainer.metrics.log = lambda m, step: (logged.append(m), original(m, step))
    trainer.fit()
    return [m["train/loss"] for m in logged if "train/loss" in m]


@pytest.fixture
def cuda_rank(single_rank):
    return single_rank("cuda")


# Liger off first: its patch of the model classes is process-wide and cannot be undone.
@pytest.mark.parametrize(
    "family,liger,kernel,fp8",
    [
        ("qwen2", "false", "auto", "false"),
        ("qwen2", "true", "auto", "false"),
        ("qwen2", "true", "torch", "false"),
        ("qwen3_moe", "true", "auto", "false"),
        pytest.param("qwen2", "true", "auto", "true", marks=needs_fp8),
        pytest.param("qwen3_moe", "true", "auto", "true", marks=needs_fp8),
    ],
)
def test_micro_batch_loop_never_syncs_on_cuda(demo_dir, tmp_path, cuda_rank, family, liger, kernel, fp8):
    """The verl production keys (remove-padding, mb 2, bf16 master, checkpointing) train with the
    micro-batch loop and the queued AdamW update under torch.cuda.set_sync_debug_mode("error"): any host sync
    raises. The MoE
    case runs grouped-GEMM experts with Liger's norm/RoPE kernels (never Liger's fused MoE). `auto` runs
    the fastest attention kernel installed (FA4 where it is), `torch` PyTorch's own varlen kernel. With
    model.fp8=true the FP8 casts (scales on the device), the FP8 all-gathers and the weight-scale refresh after the
    queued update join the loop."""
    from family_models import write_family_model

    from sft.config.schema import load_config
    from sft.ops.patch import liger_installed
    from sft.trainer import FSDPSFTTrainer

    if liger == "true" and not liger_installed():
        pytest.skip("liger-kernel not installed")
    overrides = base_overrides(demo_dir, tmp_path / liger) + [f"model.fp8={fp8}"]
    if family != "qwen2":
        model = write_family_model(demo_dir / "model", tmp_path / family, family)
        overrides = [o for o in overrides if not o.startswith("model.partial_pretrain=")]
        overrides += [f"model.partial_pretrain={model}", "model.experts_implementation=grouped_mm"]
    overrides += [
        "trainer.device=cuda",
        "use_remove_padding=true",
        "model.fsdp_config.model_dtype=bf16",
        "model.enable_gradient_checkpointing=true",
        f"model.use_liger={liger}",
        f"model.attn_kernel={kernel}",
        "data.train_batch_size=16",
        "data.micro_batch_size_per_gpu=2",
        "data.max_token_len_per_gpu=512",  # several micro-batches per step on the demo's short samples
        "trainer.total_training_steps=3",
    ]
    trainer = FSDPSFTTrainer(load_config(overrides), cuda_rank)
    experts = {type(m).__name__ for m in trainer.model.modules() if m.__class__.__name__.endswith("Experts")}
    assert not any(name.startswith("Liger") for name in experts), experts
    assert (fp8 == "true") == any(type(m).__name__ == "Float8Linear" for m in trainer.model.modules())
    losses = _fit_without_syncs(trainer)
    assert len(losses) == 3 and all(x == x for x in losses)


@pytest.mark.parametrize("n", [5000, 18000], ids=["one_group", "three_groups"])
@pytest.mark.parametrize("softcap", [None, 30.0])
def test_fused_ce_on_cuda_matches_fp64(softcap, n):
    """The CUDA path of the fused loss (fp32-output GEMMs, sft's softmax kernel, the fp32 epilogue
    accumulation of the head gradient) against float64 autograd from the same bf16 values.
    5,000 rows: three chunks of 2,048, the last one short, in one head-gradient GEMM; 18,000: two full
    groups of 8,192 rows (sft/ops/fused_ce.py GRAD_W_ROWS) and a short one."""
    from sft.ops.fused_ce import fused_linear_cross_entropy

    torch.manual_seed(0)
    d, vocab = 256, 32000
    h = (torch.randn(n, d, device="cuda") * 0.5).bfloat16().requires_grad_()
    w = (torch.randn(vocab, d, device="cuda") * 0.05).bfloat16().requires_grad_()
    y = torch.randint(0, vocab, (n,), device="cuda")
    loss, correct = fused_linear_cross_entropy(h, w, y, softcap=softcap)
    (loss * 0.25).backward()
    h64, w64 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    logits = h64 @ w64.t()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    ref = torch.nn.functional.cross_entropy(logits, y, reduction="sum")
    (ref * 0.25).backward()
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-3)
    assert abs(int(correct) - int((logits.argmax(-1) == y).sum())) <= 1  # a near-tie may flip in fp32
    # dL/dlogits is rounded to bf16 before the two head GEMMs (as in any bf16 backward): compare in norm.
    for got, want in ((h.grad, h64.grad), (w.grad, w64.grad)):
        assert float((got.double() - want).norm() / want.norm()) < 1e-2


def test_joined_qkv_on_cuda_matches_fp64():
    """sft/ops/qkv_proj.py on CUDA in bf16 (in-place addmm_ of the k and v input gradients, GEMV bias gradients)
    against float64 autograd of the three projections from the same bf16 values."""
    from sft.ops.qkv_proj import _QKV

    torch.manual_seed(0)
    x = torch.randn(4096, 256, device="cuda").bfloat16().requires_grad_()
    params = []
    for n in (256, 64, 64):
        params += [(torch.randn(n, 256, device="cuda") * 0.05).bfloat16().requires_grad_()]
        params += [(torch.randn(n, device="cuda") * 0.1).bfloat16().requires_grad_()]
    cots = [torch.randn(4096, n, device="cuda").bfloat16() for n in (256, 64, 64)]
    sum((o.float() * c.float()).sum() for o, c in zip(_QKV.apply(x, *params), cots)).backward()
    x64 = x.detach().double().requires_grad_()
    p64 = [p.detach().double().requires_grad_() for p in params]
    refs = [torch.nn.functional.linear(x64, p64[i], p64[i + 1]) for i in (0, 2, 4)]
    sum((r * c.double()).sum() for r, c in zip(refs, cots)).backward()
    for got, want in zip([x.grad] + [p.grad for p in params], [x64.grad] + [p.grad for p in p64], strict=True):
        assert float((got.double() - want).norm() / want.norm()) < 1e-2


def test_liger_resolves_the_pinned_triton_kernels_on_cuda(monkeypatch):
    """The op names and implementation name sft pins (sft/ops/patch.py) are the ones Liger's dispatcher knows."""
    pytest.importorskip("liger_kernel.backends.dispatch")
    from liger_kernel.backends.dispatch import resolve_impl

    from sft.ops.patch import LIGER_TRITON_OPS, pin_liger_triton

    for op in LIGER_TRITON_OPS:
        monkeypatch.delenv(f"LIGER_KERNEL_IMPL_{op.upper()}", raising=False)
    pin_liger_triton()
    assert {op: resolve_impl(op).impl_name for op in LIGER_TRITON_OPS} == dict.fromkeys(
        LIGER_TRITON_OPS, "nvidia-triton"
    )


@pytest.mark.parametrize("rows,cols", [(4099, 1536), (3001, 896), (517, 5120), (64, 17000)])
def test_rms_norm_backward_on_cuda(rows, cols):
    """sft/ops/rms_norm.py's compiled Triton backward (and, past MAX_TRITON_COLS, the torch one) against fp64 math."""
    from sft.ops.rms_norm import rms_norm, triton_backward_runs

    g = torch.Generator(device="cuda").manual_seed(0)
    x = (torch.randn(rows, cols, device="cuda", generator=g) * 3).bfloat16().requires_grad_()
    w = (torch.rand(cols, device="cuda", generator=g) * 2 + 0.25).bfloat16().requires_grad_()
    dy = torch.randn(rows, cols, device="cuda", generator=g).bfloat16()
    assert triton_backward_runs(x) == (cols <= 16384)
    (rms_norm(x, w, 1e-6) * dy).sum().backward()
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    (w64 * x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-6) * dy.double()).sum().backward()
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=2**-7, atol=2e-2)
    assert float((w.grad.double() - w64.grad).norm() / w64.grad.norm()) < 4e-3


@pytest.mark.parametrize("rows,cols", [(4099, 8960), (3001, 4864), (7, 1001)])
def test_swiglu_kernels_on_cuda(rows, cols):
    """sft/ops/swiglu.py's compiled Triton kernels (in-place backward) against fp64 autograd of silu(a) * b."""
    from sft.ops.swiglu import silu_mul, triton_runs

    g = torch.Generator(device="cuda").manual_seed(0)
    a0, b0, dc = ((torch.randn(rows, cols, device="cuda", generator=g) * 3).bfloat16() for _ in range(3))
    a, b = a0.clone().requires_grad_(), b0.clone().requires_grad_()
    assert triton_runs(a)
    c = silu_mul(a * 1, b * 1)
    c.backward(dc)
    a64, b64 = a0.double().requires_grad_(), b0.double().requires_grad_()
    c64 = torch.nn.functional.silu(a64) * b64
    c64.backward(dc.double())
    for got, want in ((c, c64), (a.grad, a64.grad), (b.grad, b64.grad)):
        torch.testing.assert_close(got.double(), want.detach(), rtol=2**-7, atol=2e-2)


@pytest.mark.parametrize("window", [None, 24])
@pytest.mark.parametrize("kernel", ["torch", "flash_attn", "fa4"])
def test_image_blocks_on_cuda_match_the_reference(kernel, window):
    """Gemma 3's image blocks on a CUDA varlen kernel (the causal call plus one non-causal call over the block
    queries, bf16) against the exact fp32 reference, forward and backward, on a packed row of three samples."""
    from sft.models.attention import varlen
    from sft.models.attention.image_blocks import ImageBlocks
    from sft.models.attention.kernels import why_not
    from sft.models.attention.reference import AttnFeatures

    reason = why_not(kernel, torch.cuda.get_device_capability()[0])
    if reason is not None:
        pytest.skip(reason)
    lengths, image = [300, 517, 190], [(0, 64), (100, 164), (300, 364), (700, 764), (1007, 1071)]
    total = sum(lengths)
    is_image = torch.zeros(total, dtype=torch.bool)
    for a, b in image:
        is_image[a:b] = True
    bounds = [0, 300, 817, total]
    blocks = ImageBlocks.find(is_image, bounds).map_tensors(lambda t: t.cuda())
    cu = torch.tensor(bounds, dtype=torch.int32, device="cuda")
    g = torch.Generator(device="cuda").manual_seed(0)
    inputs = [torch.randn(total, h, 128, device="cuda", generator=g, dtype=torch.bfloat16) for h in (8, 2, 2)]
    grad_out = torch.randn(total, 8, 128, device="cuda", generator=g, dtype=torch.bfloat16)

    def run(dtype, features):
        q, k, v = (t.detach().to(dtype).requires_grad_() for t in inputs)
        out = varlen.varlen_attention(q, k, v, cu, cu, max(lengths), max(lengths), 128**-0.5, features)
        out.backward(grad_out.to(dtype))
        return [out.float(), *(t.grad.float() for t in (q, k, v))]

    varlen.set_attn_kernel(kernel)
    try:
        got = run(torch.bfloat16, AttnFeatures(window, blocks=blocks))
    finally:
        varlen.set_attn_kernel(None)
    want = run(torch.float32, AttnFeatures(window, blocks=blocks))  # fp32: the exact per-segment reference
    causal = run(torch.float32, AttnFeatures(window))
    for name, a, b, c in zip(("out", "dq", "dk", "dv"), got, want, causal):
        err, scale = (a - b).abs().max().item(), b.abs().max().item()
        print(f"{kernel} window={window} {name}: max |diff| {err:.3g} of max {scale:.3g}")
        assert err <= 2e-2 * scale, (name, err, scale)
        assert (c - b).abs().max().item() > 10 * err, f"{name}: the blocks make no difference here"


def test_gemma3_vision_micro_batch_never_syncs_on_cuda(demo_dir, tmp_path, cuda_rank):
    """A tiny Gemma 3 vision-language model trains packed (bf16 master weights, checkpointing) with the
    micro-batch loop under torch.cuda.set_sync_debug_mode("error"): the SigLIP tower on a batch of same-size images,
    the image features written over the image tokens, and the image blocks' extra varlen call never sync."""
    from vision_data import write_vision_rows
    from vision_models import write_vision_model

    from sft.config.schema import load_config
    from sft.trainer import FSDPSFTTrainer

    model = write_vision_model(demo_dir / "model", tmp_path / "gemma3", "gemma3")
    data = write_vision_rows(tmp_path / "data", 32, seed=0, layout="verl")
    overrides = [
        f"data.train_files={data}",
        f"data.val_files={data}",
        "data.multiturn.enable=true",
        "data.max_length=256",
        "data.train_batch_size=8",
        "data.micro_batch_size_per_gpu=2",
        "data.max_token_len_per_gpu=256",
        f"model.partial_pretrain={model}",
        "model.fsdp_config.model_dtype=bf16",
        "model.enable_gradient_checkpointing=true",
        "use_remove_padding=true",
        "trainer.device=cuda",
        "trainer.total_training_steps=3",
        "trainer.resume_mode=disable",
        "trainer.logger=[]",
        f"trainer.default_local_dir={tmp_path / 'out'}",
        "trainer.checkpoint.save_contents=[]",
    ]
    trainer = FSDPSFTTrainer(load_config(overrides), cuda_rank)
    losses = _fit_without_syncs(trainer)
    assert len(losses) == 3 and all(x == x for x in losses)


def _hybrid_overrides(demo_dir, model, out, *extra: str) -> list[str]:
    overrides = [o for o in base_overrides(demo_dir, out) if not o.startswith("model.partial_pretrain=")]
    return overrides + [
        f"model.partial_pretrain={model}",
        "trainer.device=cuda",
        "data.train_batch_size=16",
        "data.micro_batch_size_per_gpu=8",
        "optim.lr=1e-3",
        "trainer.total_training_steps=10",
        'trainer.logger=["file"]',
        *extra,
    ]


@pytest.fixture
def hybrid_on_fla(demo_dir, tmp_path):
    """A tiny Qwen3.5-style hybrid whose Gated DeltaNet heads are wide enough for fla's kernels (32), when fla's
    varlen kernels can run here."""
    from hybrid_models import write_hybrid_model

    from sft.models.recurrent.kernels import _fla, _fla_blocker

    if _fla() is None or (why := _fla_blocker()) is not None:
        pytest.skip(f"flash-linear-attention cannot run here: {why if _fla() else 'not installed'}")
    return write_hybrid_model(
        demo_dir / "model", tmp_path / "qwen3_5", "qwen3_5_text", linear_key_head_dim=32, linear_value_head_dim=32
    )


def test_hybrid_packed_on_fla_matches_padded_on_cuda(demo_dir, tmp_path, hybrid_on_fla):
    """Qwen3.5's Gated DeltaNet layers packed on fla's varlen kernels (restarting at every sample) against the
    model's own padded run, bf16 on CUDA, 10 steps."""
    padded = torchrun(1, _hybrid_overrides(demo_dir, hybrid_on_fla, tmp_path / "padded"))
    assert padded.returncode == 0, padded.stderr[-3000:]
    packed = torchrun(1, _hybrid_overrides(demo_dir, hybrid_on_fla, tmp_path / "packed", "use_remove_padding=true"))
    assert packed.returncode == 0, packed.stderr[-3000:]
    assert "flash-linear-attention varlen kernels" in packed.stdout + packed.stderr
    a, b = _losses(tmp_path / "padded"), _losses(tmp_path / "packed")
    diff = max(abs(x - y) for x, y in zip(a, b))
    print(f"hybrid on fla, packed vs padded, bf16 on CUDA, 10 steps: max |loss diff| = {diff:.2e} ({a[-1]:.4f})")
    assert len(a) == len(b) == 10 and diff < 2e-2 * max(a)


def test_hybrid_micro_batch_loop_never_syncs_on_cuda(demo_dir, tmp_path, cuda_rank, hybrid_on_fla):
    """The packed hybrid on fla's kernels (bf16 master weights, checkpointing) trains with host syncs as errors."""
    from sft.config.schema import load_config
    from sft.trainer import FSDPSFTTrainer

    overrides = _hybrid_overrides(demo_dir, hybrid_on_fla, tmp_path / "out", "use_remove_padding=true")
    overrides = [o for o in overrides if not o.startswith(("trainer.total_training_steps", "trainer.logger"))]
    overrides += [
        "trainer.total_training_steps=3",
        "trainer.logger=[]",
        "model.fsdp_config.model_dtype=bf16",
        "model.enable_gradient_checkpointing=true",
        "data.micro_batch_size_per_gpu=2",
        "data.max_token_len_per_gpu=512",
    ]
    trainer = FSDPSFTTrainer(load_config(overrides), cuda_rank)
    losses = _fit_without_syncs(trainer)
    assert len(losses) == 3 and all(x == x for x in losses)
