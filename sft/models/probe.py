"""The packing probe: measure, before any weight loads, that sft trains a model type outside the family table exactly.

A small random instance of the user's architecture (same class and depth, widths shrunk, windows shorter than the
probe's samples, fp32 on CPU, seeded, in training mode) runs the probe's samples one at a time with the model's own
attention, and the way the trainer runs them: packed into one row through sft's varlen attention (or padded, with
`use_remove_padding=false`), the logits taken from the decoder's hidden states as sft's loss takes them. Equal
logits (to a tight tolerance) let the run go on with the generic row; a difference, a model whose attention never
reaches sft's attention function, a model that looks at later tokens, or (under Ulysses SP) mixing between tokens
outside the attention function refuses it in one line. `probe_reason` is what the config checks call.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Any

import torch
from transformers import AttentionInterface, AutoModelForCausalLM, PretrainedConfig
from transformers.masking_utils import AttentionMaskInterface

from sft.config.errors import one_line
from sft.data.batch import MicroBatch, padded_micro_batch
from sft.data.packing import packed_micro_batch
from sft.models.attention.varlen import sft_varlen_attention_forward
from sft.models.families import FAMILIES, final_softcap, logit_multiplier
from sft.models.loading import CausalLMWithLoss

logger = logging.getLogger("sft")

# Widths of the small instance, where the config has the key. Depth, layer patterns and every other key stay as
# the user's config says, so every kind of layer the model has is in the instance.
TINY = {
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_attention_heads": 4,
    "head_dim": 16,
    "vocab_size": 512,
    "moe_intermediate_size": 16,
    "shared_expert_intermediate_size": 16,
    "q_lora_rank": 16,
    "kv_lora_rank": 16,
    "qk_nope_head_dim": 8,
    "qk_rope_head_dim": 8,
    "v_head_dim": 12,
    "rotary_dim": 8,
    "hidden_size_per_layer_input": 8,
    "vocab_size_per_layer_input": 512,
}
# Lengths that must act inside the probe's samples: a window or chunk longer than every sample would hide itself.
SHORT = {"sliding_window": 8, "attention_chunk_size": 8}
# Sample lengths: longer than the windows above (but one), a boundary inside a sample at every SP cut up to 4.
LENGTHS = (13, 29, 6, 22)
MAX_PARAMS = 50_000_000
# |logit difference| allowed, relative to the largest reference logit: fp32 reordering is ~1e-6, a leak ~1e-1.
RTOL = 1e-4

_PACKED, _LOCAL = "sft_varlen_probe", "sft_token_local_probe"


def _count(module: torch.nn.Module) -> None:
    module.__dict__["_sft_probe_calls"] = module.__dict__.get("_sft_probe_calls", 0) + 1


def _packed_attention(module, query, key, value, attention_mask, **kwargs):
    """sft's varlen attention, counting its calls on the attention module."""
    _count(module)
    return sft_varlen_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _token_local_attention(module, query, key, value, attention_mask, **kwargs):
    """A stand-in that mixes no tokens: q/k `[b, h(_kv), s, d]`, v `[b, h_kv, s, d_v]` -> `[b, s, h, d_v]`."""
    _count(module)
    rep = query.shape[1] // key.shape[1]
    k, v = key.repeat_interleave(rep, dim=1), value.repeat_interleave(rep, dim=1)
    gate = torch.tanh((query * k).sum(-1, keepdim=True))  # [b, h, s, 1], token by token
    return (v * gate).transpose(1, 2).contiguous(), None


def _no_mask(*args: Any, **kwargs: Any) -> None:
    return None


def _register() -> None:
    for name, fn in ((_PACKED, _packed_attention), (_LOCAL, _token_local_attention)):
        AttentionInterface.register(name, fn)
        AttentionMaskInterface.register(name, _no_mask)


def tiny_config(hf_config: PretrainedConfig) -> PretrainedConfig:
    """The user's config with small widths, short windows and no cache; special ids inside the vocab."""
    d = hf_config.to_dict()
    heads, kv = d.get("num_attention_heads"), d.get("num_key_value_heads")
    mla_rope_heads = d.get("head_dim") is not None and d.get("head_dim") == d.get("qk_rope_head_dim")
    for key, value in TINY.items():
        if isinstance(d.get(key), int) and d[key] > 0:
            d[key] = value
    if isinstance(kv, int) and isinstance(heads, int):
        d["num_key_value_heads"] = 4 if kv == heads else 1 if kv == 1 else 2  # keep MHA / MQA / GQA
    if mla_rope_heads:  # MLA configs (DeepSeek-V3) size their rotary table by head_dim = qk_rope_head_dim
        d["head_dim"] = d["qk_rope_head_dim"]
    for key, value in SHORT.items():
        if isinstance(d.get(key), int) and d[key] > value:
            d[key] = value
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        if isinstance(d.get(key), int) and d[key] >= TINY["vocab_size"]:
            d[key] = None
    d["use_cache"] = False
    return type(hf_config).from_dict(d)


@dataclass
class _Instance:
    model: CausalLMWithLoss
    hidden: list[torch.Tensor]

    def calls(self) -> int:
        return sum(m.__dict__.get("_sft_probe_calls", 0) for m in self.model.lm.modules())

    def run(self, mb: MicroBatch) -> torch.Tensor:
        """The decoder's last hidden states `[b*s, h]` for a micro-batch, through the trainer's forward."""
        self.hidden.clear()
        self.model(**mb.inputs)
        return self.hidden[-1].reshape(-1, self.hidden[-1].shape[-1])

    def sft_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """What sft's loss computes from hidden states (sft/models/loss.py): (m * h) @ W.T, then soft-capping."""
        logits = (hidden * self.model.logit_multiplier) @ self.model.lm.get_output_embeddings().weight.t()
        cap = self.model.softcap
        return logits if cap is None else cap * torch.tanh(logits / cap)


def _build(cfg: PretrainedConfig, trust_remote_code: bool, attn: str | None, state: dict | None) -> _Instance:
    kwargs = {"attn_implementation": attn} if attn else {}
    lm = AutoModelForCausalLM.from_config(
        copy.deepcopy(cfg), dtype=torch.float32, trust_remote_code=trust_remote_code, **kwargs
    )
    if state is None:
        # Default inits hide bugs (zero biases, unit norms, near-uniform attention): every weight gets noise.
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in lm.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    else:
        lm.load_state_dict(state)
    # Training mode, as the trainer runs it: a branch or a random draw taken only in training shows as a difference
    # (dropout and router jitter by their config keys are refused before the probe runs).
    model = CausalLMWithLoss(lm.train(), softcap=final_softcap(cfg))
    model.logit_multiplier = logit_multiplier(cfg)
    hidden: list[torch.Tensor] = []

    def keep(module, args, output):
        hidden.append(output[0] if isinstance(output, tuple) else output.last_hidden_state)

    lm.get_decoder().register_forward_hook(keep)
    return _Instance(model, hidden)


def _samples(vocab: int) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    items = []
    for n in LENGTHS:
        ids = torch.randint(0, vocab, (n,), generator=gen)
        one = torch.ones(n, dtype=torch.long)
        items.append({"input_ids": ids, "attention_mask": one, "position_ids": torch.arange(n), "loss_mask": one})
    return items


def _diff(got: torch.Tensor, want: torch.Tensor) -> float:
    """Max |got - want| relative to the largest |want| (at least 1); inf when either is not finite."""
    if not (torch.isfinite(got).all() and torch.isfinite(want).all()):
        return float("inf")
    return float((got - want).abs().max() / want.abs().max().clamp_min(1.0))


def _padded(items: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
    width = max(len(it["input_ids"]) for it in items)

    def pad(t: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.pad(t, (0, width - len(t)))

    return [{k: pad(v) for k, v in it.items()} for it in items]


def measure(
    hf_config: PretrainedConfig, remove_padding: bool, sp: int, trust_remote_code: bool = False
) -> dict[str, float]:
    """Run the probe; the measured differences (see `probe_reason` for what each means). Raises what building or
    running the small instance raises."""
    _register()
    cfg = tiny_config(hf_config)
    with torch.device("meta"):
        shape = AutoModelForCausalLM.from_config(copy.deepcopy(cfg), trust_remote_code=trust_remote_code)
        params = sum(p.numel() for p in shape.parameters())
    if params > MAX_PARAMS:
        raise ValueError(f"the small instance still has {params / 1e6:.0f}M parameters (widths sft cannot shrink)")
    items = _samples(cfg.vocab_size)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # matrices this small only lose to threads (and to other processes' load)
    try:
        return _measure(cfg, items, remove_padding, sp, trust_remote_code)
    finally:
        torch.set_num_threads(threads)


def _measure(
    cfg: PretrainedConfig, items: list[dict[str, torch.Tensor]], remove_padding: bool, sp: int, trust_remote_code: bool
) -> dict[str, float]:
    out: dict[str, float] = {}
    # The CPU generator only (no CUDA context before the trainer picks its device), restored afterwards.
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.default_generator.manual_seed(0)
        ref = _build(cfg, trust_remote_code, "eager", None)
        state = ref.model.lm.state_dict()
        # One sample at a time, the model's own attention and head: the reference.
        want = [ref.model.lm(input_ids=it["input_ids"][None], use_cache=False).logits[0] for it in items]
        longest = max(range(len(items)), key=lambda i: len(items[i]["input_ids"]))
        m = len(items[longest]["input_ids"]) // 2
        prefix = ref.model.lm(input_ids=items[longest]["input_ids"][None, :m], use_cache=False).logits[0]
        out["causal"] = _diff(prefix, want[longest][:m])
        want_all = torch.cat(want)
        if remove_padding:
            packed = _build(cfg, trust_remote_code, _PACKED, state)
            mb = packed_micro_batch(items, pad_id=0, multiple_of=sp)
            hidden = packed.run(mb)[: want_all.shape[0]]  # the SP padding segment (if any) is last
            out["packed"] = _diff(packed.sft_logits(hidden), want_all)
            out["calls"] = float(packed.calls())
            own = packed.model.lm(**_model_kwargs(mb)).logits[0, : want_all.shape[0]]
            out["head"] = _diff(packed.sft_logits(hidden), own)
            if sp > 1:
                out["local"] = _locality(_build(cfg, trust_remote_code, _LOCAL, state), mb, cfg.vocab_size)
        if not remove_padding or out["packed"] > RTOL:
            padded = _build(cfg, trust_remote_code, None, state)
            mb = padded_micro_batch(_padded(items))
            hidden = padded.run(mb)
            real = mb.inputs["attention_mask"].reshape(-1).bool()
            out["padded"] = _diff(padded.sft_logits(hidden[real]), want_all)
    return out


def _model_kwargs(mb: MicroBatch) -> dict[str, Any]:
    """A packed micro-batch as the model's own forward takes it (as the trainer's forward passes it to the decoder)."""
    kwargs = {k: v for k, v in mb.inputs.items() if k not in ("labels", "target_index")}
    return dict(kwargs, attention_mask=torch.ones_like(mb.inputs["input_ids"]), use_cache=False)


def _locality(local: _Instance, mb: MicroBatch, vocab: int) -> float:
    """With attention replaced by a stand-in that mixes nothing, how much a token's change moves the other tokens'
    hidden states (0 when every layer outside the attention function works token by token, which Ulysses SP needs:
    each rank runs everything but attention on its own slice of the row). NaN when the stand-in was never called."""
    base = local.run(mb).clone()
    if local.calls() == 0:
        return float("nan")
    ids = mb.inputs["input_ids"]
    worst = 0.0
    for j in (0, ids.shape[1] // 2, ids.shape[1] - 1):
        changed = ids.clone()
        changed[0, j] = (changed[0, j] + 1) % vocab
        moved = local.run(MicroBatch(dict(mb.inputs, input_ids=changed), mb.real_mask, mb.sample_lens))
        others = torch.arange(ids.shape[1]) != j
        worst = max(worst, _diff(moved[others], base[others]))
    return worst


def _padded_exact(hf_config: PretrainedConfig, trust_remote_code: bool) -> bool:
    """Whether the probe measures padded rows exact (where packed ones could not even run: a model whose attention
    needs a mask that packed rows do not have)."""
    try:
        found = measure(hf_config, False, 1, trust_remote_code)
        return max(found["causal"], found.get("padded", 1.0)) <= RTOL
    except Exception:  # noqa: BLE001 - not even padded runs: no hint
        return False


def probe_reason(hf_config: PretrainedConfig, remove_padding: bool, sp: int, trust_remote_code: bool) -> str | None:
    """None when the probe shows sft trains this model exactly (one line logged); else why not, in one line."""
    model_type = hf_config.model_type
    what = f"model_type={model_type!r} is not in sft's table of tested families"
    if trust_remote_code and model_type in FAMILIES:
        what = f"model_type={model_type!r} runs remote code (config.json auto_map, model.trust_remote_code=true)"
    fix = "; add a row to sft/models/families.py (README 'Supported model families')"
    try:
        found = measure(hf_config, remove_padding, sp, trust_remote_code)
    except Exception as exc:  # noqa: BLE001 - whatever stops the instance, nothing was proved: refuse, saying what
        text = one_line(exc)[:300]
        padded_ok = remove_padding and _padded_exact(hf_config, trust_remote_code)
        hint = "; use_remove_padding=false trains it exactly" if padded_ok else fix
        return (
            f"{what}, and sft could not run a small random instance of it to check packing "
            f"({type(exc).__name__}: {text}){hint}"
        )
    padded_ok = found.get("padded", 1.0) <= RTOL
    if found["causal"] > RTOL:
        return (
            f"{what}, and its logits at a position change with later tokens (by {found['causal']:.2g}): sft trains "
            "causal LMs only"
        )
    if remove_padding:
        hint = "; use_remove_padding=false trains it exactly" if padded_ok else fix
        if found["calls"] == 0:
            return (
                f"{what}, and its attention never called sft's packed attention function (an attention module that "
                f"bypasses transformers' attention interface), so packed samples would see each other{hint}"
            )
        if found["head"] > RTOL:
            return (
                f"{what}, and its forward turns hidden states into logits differently from sft's loss "
                f"(hidden @ lm_head.weight.T), by {found['head']:.2g}{fix}"
            )
        if found["packed"] > RTOL:
            return (
                f"{what}, and packing is not exact for it: a small random instance's packed logits differ from "
                f"one-sample-at-a-time logits by {found['packed']:.2g} (tolerance {RTOL:.0e}){hint}"
            )
        if sp > 1 and not found["local"] <= RTOL:  # NaN (never called) fails too
            return (
                f"{what}, and with ulysses_sequence_parallel_size={sp} its layers outside the attention function mix "
                f"tokens (by {found['local']:.2g}), which an SP rank holding a slice of the row cannot compute; set "
                "ulysses_sequence_parallel_size=1"
            )
        logger.info(
            "model_type=%s: verified by sft's packing probe (packed == one sample at a time, max relative logit "
            "difference %.1e%s); training with the generic row: no fused kernels, no soft-capping or logit scale",
            model_type,
            found["packed"],
            f", token-local outside attention for SP={sp}" if sp > 1 else "",
        )
        return None
    if not padded_ok:
        return (
            f"{what}, and padded rows are not exact for it: a small random instance's logits differ from "
            f"one-sample-at-a-time logits by {found['padded']:.2g}{fix}"
        )
    logger.info(
        "model_type=%s: verified by sft's packing probe (padded == one sample at a time, max relative logit "
        "difference %.1e); training with the generic row: no fused kernels, no soft-capping or logit scale",
        model_type,
        found["padded"],
    )
    return None
