"""The packing probe (sft/models/probe.py): a model type outside the family table trains only when a small random
instance of it is measured exact, and is refused in one line before anything loads otherwise.

The planted architectures (tests/probe_models.py, registered through `model.external_lib`) leak across packed
samples, bypass transformers' attention interface, mix tokens outside attention (fine on one rank, wrong under
Ulysses SP), or add a bias in the LM head that sft's loss would leave out. The model folders hold an empty weights file: a refusal that came after loading would fail otherwise.
An unlisted standard type trained through the spawned trainer runs, packed == padded, is in tests/test_families.py
(exaone4)."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import probe_models  # noqa: F401  (registers the planted architectures, as model.external_lib does)
import pytest
from conftest import base_overrides
from family_models import COMMON
from transformers import AutoConfig

from sft.cli import compose
from sft.config.checks import validate_config
from sft.config.errors import ConfigError
from sft.parallel.distributed import WorldInfo

PACKED = ["use_remove_padding=true"]
SP2 = ["use_remove_padding=true", "ulysses_sequence_parallel_size=2"]


def _folder(demo_dir: Path, root: Path, model_type: str, bare: dict | None = None, **extra) -> Path:
    """A model folder of `model_type` (the demo tokenizer, a small config, or `bare` and the vocabulary) whose weights
    file is empty."""
    folder = root / model_type
    folder.mkdir(parents=True)
    for f in (demo_dir / "model").iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(f, folder / f.name)
    vocab = AutoConfig.from_pretrained(demo_dir / "model").vocab_size
    keys = dict(bare, vocab_size=vocab) if bare is not None else dict(COMMON, num_hidden_layers=3, vocab_size=vocab)
    AutoConfig.for_model(model_type, **keys, **extra).save_pretrained(folder)
    (folder / "model.safetensors").write_bytes(b"")
    return folder


def _validate(demo_dir: Path, tmp: Path, folder: Path, extra: list[str], world: int = 1) -> None:
    overrides = base_overrides(demo_dir, tmp / "out") + [
        f"model.partial_pretrain={folder}",
        "model.external_lib=probe_models",
        *extra,
    ]
    validate_config(compose(overrides), WorldInfo(rank=0, world_size=world, local_rank=0, local_world_size=world))


@pytest.mark.parametrize(
    "model_type,extra,expect",
    [
        (
            "sft_token_shift",
            PACKED,
            r"model_type='sft_token_shift' is not in sft's table .* packed logits differ from one-sample-at-a-time "
            r"logits by 0\.\d+ .*; use_remove_padding=false trains it exactly",
        ),
        ("sft_token_shift", SP2, "packed logits differ"),
        ("sft_own_attention", PACKED, "never called sft's packed attention function"),
        ("sft_own_attention", SP2, "never called sft's packed attention function"),
        ("sft_segment_mix", SP2, "ulysses_sequence_parallel_size=2 its layers outside the attention function mix"),
        ("sft_head_bias", PACKED, "turns hidden states into logits differently from sft's loss"),
        ("sft_train_shift", PACKED, "packed logits differ"),  # the probe runs in training mode, as training does
    ],
)
def test_planted_architectures_refused_before_loading(demo_dir, tmp_path, model_type, extra, expect):
    folder = _folder(demo_dir, tmp_path, model_type)
    with pytest.raises(ConfigError, match=expect) as err:
        _validate(demo_dir, tmp_path, folder, extra, world=2 if extra is SP2 else 1)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "model_type,extra",
    [
        ("sft_token_shift", []),  # its leak only looks back: right-padded rows are exact
        ("sft_own_attention", []),
        ("sft_segment_mix", PACKED),  # restarts with every sample: exact packed on one rank
        ("helium", SP2),  # a standard architecture outside the table
    ],
)
def test_exact_architectures_train_with_one_log_line(demo_dir, tmp_path, caplog, model_type, extra):
    folder = _folder(demo_dir, tmp_path, model_type)
    with caplog.at_level(logging.INFO, logger="sft"):
        _validate(demo_dir, tmp_path, folder, extra, world=2 if extra is SP2 else 1)
    lines = [r.getMessage() for r in caplog.records if "verified by sft's packing probe" in r.getMessage()]
    assert len(lines) == 1 and model_type in lines[0], lines


def test_a_type_whose_packed_instance_cannot_run_is_pointed_to_padded_rows(demo_dir, tmp_path):
    """StableLM's attention asks the packed forward for a mask that packed rows do not have: the probe cannot run it
    packed, and says that padded rows (measured exact) train it; padded, it trains."""
    folder = _folder(demo_dir, tmp_path, "stablelm")
    with pytest.raises(
        ConfigError, match=r"could not run a small random instance .*\); use_remove_padding=false trains it exactly$"
    ):
        _validate(demo_dir, tmp_path, folder, PACKED)
    _validate(demo_dir, tmp_path, folder, [])


def test_what_the_probe_cannot_measure_needs_a_row(demo_dir, tmp_path):
    """Final soft-capping is applied by sft's loss, not by the forward the probe compares: a row must say so."""
    folder = _folder(demo_dir, tmp_path, "helium", final_logit_softcapping=30.0)
    with pytest.raises(
        ConfigError, match=r"config.final_logit_softcapping=30.0 \(final-logit soft-capping\) needs a row"
    ):
        _validate(demo_dir, tmp_path, folder, PACKED)


REMOTE_CODE = """
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaDecoderLayer


class ShiftLayer(LlamaDecoderLayer):
    def forward(self, hidden_states, *args, **kwargs):
        return super().forward(hidden_states + 0.5 * F.pad(hidden_states, (0, 0, 1, 0))[:, :-1], *args, **kwargs)


class ShiftForCausalLM(LlamaForCausalLM):
    def __init__(self, config):
        super().__init__(config)
        for layer in self.model.layers:
            layer.__class__ = ShiftLayer
"""


def test_remote_code_of_a_listed_type_goes_through_the_probe(demo_dir, tmp_path):
    """model_type=llama is in the table, but with model.trust_remote_code=true its auto_map class runs instead of
    transformers' Llama: the table's promise does not hold for it, the probe decides."""
    folder = _folder(demo_dir, tmp_path, "llama")
    (folder / "modeling_shift.py").write_text(REMOTE_CODE)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_shift.ShiftForCausalLM"}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=r"model_type='llama' runs remote code .* packed logits differ"):
        _validate(demo_dir, tmp_path, folder, PACKED + ["model.trust_remote_code=true"])
    _validate(demo_dir, tmp_path, folder, PACKED)  # without remote code, transformers' Llama: the table's row


# Found by building every causal-LM type of transformers: accepted by the checks, then failing after loading.
@pytest.mark.parametrize(
    "model_type,config,extra,expect",
    [
        # dropout under GPT-2's keys (its summary head's is not the LM's): every key named, with its override
        (
            "gpt2",
            dict(n_embd=32, n_layer=2, n_head=4, n_inner=64, attn_pdrop=0.1),
            PACKED,
            r"sets attn_pdrop=0\.1, embd_pdrop=0\.1, resid_pdrop=0\.1: dropout and router jitter are random in a "
            r"layout that depends on how each batch is split and packed, .*; set \+model.override_config.attn_pdrop=0.0 \+model.override_config.embd_pdrop=0.0 "
            r"\+model.override_config.resid_pdrop=0.0$",
        ),
        # a class without `_no_split_modules`: FSDP finds no blocks to shard
        ("biogpt", dict(COMMON, num_hidden_layers=2), [], r"BioGptForCausalLM declares no `_no_split_modules`"),
    ],
)
def test_refused_in_the_checks_not_after_loading(demo_dir, tmp_path, model_type, config, extra, expect):
    folder = _folder(demo_dir, tmp_path, model_type, bare=config)
    with pytest.raises(ConfigError, match=expect) as err:
        _validate(demo_dir, tmp_path, folder, extra)
    assert "\n" not in str(err.value)


def test_dropout_override_is_accepted(demo_dir, tmp_path):
    folder = _folder(demo_dir, tmp_path, "gpt2", bare=dict(n_embd=32, n_layer=2, n_head=4, n_inner=64, attn_pdrop=0.1))
    off = [f"+model.override_config.{k}=0.0" for k in ("attn_pdrop", "resid_pdrop", "embd_pdrop")]
    _validate(demo_dir, tmp_path, folder, [*PACKED, *off])


def test_a_draft_model_reading_another_models_keys_is_refused():
    """Gemma 4's assistant (a draft model for assisted decoding) reads every layer's keys and values from its target
    model: sft cannot train it alone."""
    from sft.models.families import unsupported_reason

    text = dict(model_type="gemma4_text", num_hidden_layers=2, num_kv_shared_layers=2)
    reason = unsupported_reason(dict(model_type="gemma4_assistant", text_config=text))
    assert "num_kv_shared_layers=2 of its 2 layers" in reason and "draft model" in reason
    assert unsupported_reason(dict(model_type="gemma4_text", num_hidden_layers=3, num_kv_shared_layers=1)) is None


@pytest.mark.parametrize(
    "model_type,config",
    [
        ("mamba", dict(hidden_size=32, num_hidden_layers=2, state_size=8)),
        ("mbart", dict(d_model=32, decoder_layers=2, decoder_attention_heads=4, decoder_ffn_dim=64, encoder_layers=2)),
    ],
)
def test_blocks_named_inside_blocks_are_sharded_once(model_type, config):
    """Mamba names its block and the mixer inside it in `_no_split_modules`, MBart its layers and their attention:
    FSDP shards the outermost only (sharding both failed at the first forward, DTensor mixed with Tensor)."""
    from transformers import AutoModelForCausalLM

    from sft.parallel.fsdp import decoder_layers

    lm = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **config, vocab_size=64))
    names = set(lm._no_split_modules)
    named = [m for m in lm.modules() if type(m).__name__ in names]
    layers = decoder_layers(lm)
    assert len(named) > len(layers) == 2, (len(named), len(layers))
    for outer in layers:
        assert not any(outer is not other and any(m is outer for m in other.modules()) for other in layers)


def test_small_instance_of_an_mla_model_runs():
    """DeepSeek-V3-style MLA sizes its rotary table by head_dim = qk_rope_head_dim: the probe's small instance keeps
    the two equal (shrinking head_dim alone broke the rotary product, and the probe could only refuse)."""
    import torch
    from transformers import AutoModelForCausalLM

    from sft.models.probe import tiny_config

    cfg = tiny_config(AutoConfig.for_model("deepseek_v3", num_hidden_layers=2, first_k_dense_replace=2))
    assert cfg.head_dim == cfg.qk_rope_head_dim == 8
    lm = AutoModelForCausalLM.from_config(cfg)
    logits = lm(input_ids=torch.arange(12)[None], use_cache=False).logits
    assert logits.shape == (1, 12, cfg.vocab_size) and torch.isfinite(logits).all()
