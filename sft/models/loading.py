"""Load the tokenizer, the HF config and the weights of `model.partial_pretrain`.

Every rank builds the model on the meta device (no memory); after sharding, rank 0 alone
reads the weights from disk and they reach the other ranks' shards by broadcast, so host
memory holds one full copy, not one per rank. `CausalLMWithLoss` is the FSDP root: it runs
the decoder and the chunked loss inside one root forward, so the LM head's weight is
gathered while the loss uses it and logits are never materialised in full.
"""

from __future__ import annotations

import copy
import importlib
import logging
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig

from sft.config.schema import DTYPES, SFTConfig
from sft.models.attention.bidirectional import register_vision_attention
from sft.models.attention.kernels import KERNELS as ATTN_KERNELS
from sft.models.attention.kernels import choose_attn_kernel
from sft.models.attention.varlen import register_varlen_attention, set_attn_kernel
from sft.models.families import (
    final_softcap,
    logit_multiplier,
    mlp_kernel,
    moe_spec,
    recurrent_spec,
    unsupported_reason,
)
from sft.models.lora import add_lora
from sft.models.loss import target_linear_cross_entropy
from sft.models.moe import RouterStats, experts_kwargs
from sft.models.multimodal import (
    FrozenPart,
    build_text_only,
    is_multimodal,
    model_class,
    override_target,
    processor_files,
    text_config,
)
from sft.models.recurrent.install import install_packed_mixers, sp_reason
from sft.models.recurrent.kernels import backend_for
from sft.models.recurrent.packed import NoMasks
from sft.models.rope_switch import PerSampleLongRope, install_per_sample_longrope, long_tokens, switch_length
from sft.models.vision import PIXEL_KEYS, VisionFamily, embed_images, freeze
from sft.models.vision import family as vision_family
from sft.models.vision import tower as vision_tower
from sft.ops.fp8 import FP8_UNFUSED, convert_to_fp8, fp8_recipe
from sft.ops.patch import apply_liger, liger_wanted
from sft.ops.qkv_proj import join_qkv
from sft.parallel.distributed import DistContext, resolve_device_type
from sft.parallel.fsdp import selective_checkpoint_context
from sft.parallel.ulysses import check_sp_heads

logger = logging.getLogger("sft")


def import_external_lib(cfg: SFTConfig) -> None:
    """`model.external_lib` registers custom architectures with the Auto classes on import."""
    if cfg.model.external_lib:
        importlib.import_module(cfg.model.external_lib)


def load_tokenizer(cfg: SFTConfig):
    """Tokenizer of the model folder, with `data.chat_template` applied and a pad token set."""
    import_external_lib(cfg)
    source = cfg.model.tokenizer_path or cfg.model.partial_pretrain
    tok = AutoTokenizer.from_pretrained(source, trust_remote_code=cfg.model.trust_remote_code)
    if cfg.data.chat_template:
        tok.chat_template = cfg.data.chat_template
    if tok.pad_token_id is None:
        # Padding is masked out of attention and loss, so any id works; EOS is always present.
        tok.pad_token = tok.eos_token
    return tok


def load_hf_config(cfg: SFTConfig) -> PretrainedConfig:
    import_external_lib(cfg)
    hf_config = AutoConfig.from_pretrained(cfg.model.partial_pretrain, trust_remote_code=cfg.model.trust_remote_code)
    for key, value in cfg.model.override_config.items():
        target = override_target(hf_config, key)  # a multimodal checkpoint's text entries: its text_config
        if not hasattr(target, key):
            raise ValueError(
                f"model.override_config.{key}: {type(target).__name__} has no such entry; "
                "check the name against the model's config.json"
            )
        setattr(target, key, value)
    # No KV cache while training: it costs memory and makes torch.compile recompile.
    text_config(hf_config).use_cache = False
    return hf_config


class CausalLMWithLoss(nn.Module):
    """FSDP root: decoder forward + chunked cross-entropy against `labels` (-100 = no target).

    Returns the sum of token losses, the number of target tokens and the number of targets whose
    argmax prediction is right (token accuracy), for this micro-batch.
    """

    def __init__(
        self,
        lm: nn.Module,
        chunk_size: int = 4096,
        fused_loss: bool = False,
        softcap: float | None = None,
        routing: RouterStats | None = None,
    ) -> None:
        super().__init__()
        self.lm = lm
        self.chunk_size = chunk_size
        # sft's fused linear CE (CUDA): gradients in the forward, no chunk recompute, no host sync.
        self.fused_loss = fused_loss
        self.softcap = softcap  # final-logit soft-capping, applied chunk by chunk in the loss
        self.routing = routing  # MoE: router aux loss and metrics (sft/models/moe.py)
        self.recurrent = False  # packed recurrent mixers (sft/models/recurrent/): no per-layer masks at all
        # longrope's frequency set per sample (sft/models/rope_switch.py)
        self.long_rope: PerSampleLongRope | None = None
        self.logit_multiplier = 1.0  # set from the family table: (h * m) @ W.T == m * logits
        # Multimodal checkpoints: the tensors outside the language model, kept unchanged (sft/models/multimodal.py).
        self.frozen: FrozenPart | None = None
        # Vision-language SFT (images in the data): the family's vision traits and image token (sft/models/vision.py).
        self.vision: VisionFamily | None = None
        self.image_token_id = -1
        self.processor_files: dict[str, bytes] = {}  # a multimodal checkpoint's processor files (rank 0), for exports

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        labels: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        target_index: torch.Tensor | None = None,
        **attn_kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # MoE routing inputs (sft/models/moe.py): sample id per token and the aux loss's weight in this loss.
        sample_index, rows = attn_kwargs.pop("sample_index", None), attn_kwargs.pop("sample_rows", 0)
        aux_weight = attn_kwargs.pop("aux_weight", 0.0)
        if self.routing is not None:
            self.routing.start()
        if self.long_rope is not None:
            self.long_rope.tokens = long_tokens(
                self.long_rope.switch,
                input_ids,
                attention_mask,
                attn_kwargs.get("cu_seq_lens_q"),
                attn_kwargs.get("sp_group"),
            )
        if attention_mask is None and "cu_seq_lens_q" in attn_kwargs:
            # Packed row: with no 2-D mask, transformers scans position_ids for packed sequences and
            # reads the answer back from the GPU (a host sync per forward). An all-ones mask skips
            # that scan; sft's registered mask function turns it into no mask (sft/models/attention/varlen.py).
            attention_mask = NoMasks() if self.recurrent else torch.ones_like(input_ids)
        zero = None
        decoder = self.lm.get_decoder()
        if self.vision is not None:  # the micro-batch's images, written over this slice's image tokens
            pixels = {k: attn_kwargs.pop(k) for k in PIXEL_KEYS if k in attn_kwargs}
            span, index = attn_kwargs.pop("image_span"), attn_kwargs.pop("image_index")
            embeds, extra, zero = embed_images(
                self.lm, self.vision, input_ids, pixels, span, index, self.image_token_id
            )
            attn_kwargs.update(extra, inputs_embeds=embeds)
            if self.vision.bidirectional and "cu_seq_lens_q" not in attn_kwargs:
                # Padded rows: the model's own wrapper builds its masks with each image's block attending both
                # ways (from the token types); packed rows carry the blocks to sft's varlen attention
                # (`image_blocks`, sft/data/vision_batch.py).
                decoder = self.lm.model
                attn_kwargs[self.vision.token_types] = (input_ids == self.image_token_id).long()
        else:
            attn_kwargs["input_ids"] = input_ids
        out = decoder(
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
            **attn_kwargs,
        )
        hidden = out.last_hidden_state  # [b, s, h]
        head = self.lm.get_output_embeddings()
        hidden, labels = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)  # [b*s, h], [b*s]
        if self.logit_multiplier != 1.0:
            hidden = hidden * self.logit_multiplier
        if target_index is None:  # (costs a device sync; the trainer passes it from the host)
            target_index = (labels != -100).nonzero().squeeze(1)
        loss_sum, n_correct = target_linear_cross_entropy(
            hidden, head.weight, labels, target_index, self.chunk_size, fused=self.fused_loss, softcap=self.softcap
        )
        if zero is not None:
            loss_sum = loss_sum + zero  # every vision weight in the graph, on every rank
        if self.routing is not None and sample_index is not None and torch.is_grad_enabled():
            aux = aux_weight * self.routing.aux_sum(sample_index, rows, attn_kwargs.get("sp_group"))
            loss_sum = loss_sum + (aux - aux.detach())  # the aux gradient flows; the returned value stays the CE
        return loss_sum, (labels != -100).sum(), n_correct


def check_supported_head(hf_config: PretrainedConfig) -> None:
    """Refuse what sft/models/families.py's table cannot train (validation already did, from config.json)."""
    reason = unsupported_reason(hf_config.to_dict())
    if reason is not None:
        raise ValueError(f"model.partial_pretrain: {reason}")


def _kv_head_counts(hf_config: PretrainedConfig) -> set[int]:
    """The KV head counts of the attention layers: per layer where the config varies them (transformers'
    heterogeneous configs, e.g. Gemma 4's global layers, refuse a global read of a per-layer key)."""
    configs = hf_config.per_layer_config if getattr(hf_config, "is_heterogeneous", False) else [hf_config]
    return {getattr(c, "num_key_value_heads", None) or c.num_attention_heads for c in configs}


def build_meta_model(hf_config: PretrainedConfig, cfg: SFTConfig, vision: bool = False) -> CausalLMWithLoss:
    """The model skeleton on the meta device, in the master-weight dtype; `vision`: images in the data, so a
    multimodal checkpoint keeps its vision tower (sft/models/vision.py)."""
    check_supported_head(hf_config)
    # A multimodal checkpoint is built whole from its own config, then cut down to its language model and LM head;
    # the text model's config says everything else (heads, family row, MoE, soft-capping).
    full_config, hf_config = hf_config, text_config(hf_config)
    dtype = DTYPES[cfg.model.fsdp_config.model_dtype]
    extra = {}
    if cfg.use_remove_padding:
        # Packed rows: attention goes through our varlen function, found by name in transformers'
        # attention registry (no model code is patched).
        extra["attn_implementation"] = register_varlen_attention()
        device = torch.device(resolve_device_type(cfg.trainer.device))
        kernel = choose_attn_kernel(cfg.model.attn_kernel, device, compiled=cfg.model.compile)
        set_attn_kernel(kernel)
        if kernel is not None:
            logger.info(
                "attention: %s, %s (model.attn_kernel=%s)", kernel, ATTN_KERNELS[kernel].title, cfg.model.attn_kernel
            )
        n_heads = hf_config.num_attention_heads
        for kv_heads in _kv_head_counts(hf_config):
            check_sp_heads(n_heads, kv_heads, cfg.ulysses_sequence_parallel_size)
        recurrent = recurrent_spec(hf_config.model_type)
        if recurrent is not None and (
            why := sp_reason(hf_config.to_dict(), recurrent, cfg.ulysses_sequence_parallel_size)
        ):
            raise ValueError(why)
    with torch.device("meta"):
        # A copy: from_config records the attention choice in the config object it is given, and
        # the original is exported with checkpoints (where "sft_varlen" would not load).
        kwargs = dict(dtype=dtype, **extra, **experts_kwargs(hf_config, cfg.model.experts_implementation))
        if is_multimodal(full_config) and "experts_implementation" in kwargs:
            # Addressed to the text model: a wrapper whose own module does not declare the choice (Kimi K2.5's)
            # refuses it at the top level, and the experts are the text model's anyway.
            kwargs["experts_implementation"] = {"text_config": kwargs["experts_implementation"]}
        frozen = None
        if vision:  # the whole model, its own class; the vision side trains unless frozen
            lm = model_class(full_config)._from_config(copy.deepcopy(full_config), **kwargs)
        elif is_multimodal(full_config):
            lora_targets = cfg.model.target_modules if cfg.model.lora_rank > 0 else None
            if "attn_implementation" in kwargs:
                # The text model's only: towers removed below may not know sft's name (DeepSeek-VL-Hybrid's SAM
                # encoder looks its attention class up by it), and keep their default.
                kwargs["attn_implementation"] = {"text_config": kwargs["attn_implementation"]}
            lm, frozen = build_text_only(full_config, Path(cfg.model.partial_pretrain), lora_targets, **kwargs)
        else:
            lm = AutoModelForCausalLM.from_config(
                copy.deepcopy(hf_config), trust_remote_code=cfg.model.trust_remote_code, **kwargs
            )
        add_lora(lm, cfg.model, language_only=vision)  # no-op unless model.lora_rank > 0
    recurrent = recurrent_spec(hf_config.model_type) if cfg.use_remove_padding else None
    # Packed rows: the recurrent mixers restart at every sample and split over SP ranks (sft/models/recurrent/).
    mixers = 0 if recurrent is None else install_packed_mixers(lm, recurrent)
    if mixers:
        device = torch.device(resolve_device_type(cfg.trainer.device))
        backend = backend_for(device)
        # The reference on a GPU is exact but slow: say it where a user looks for why a run is slow.
        log = logger.warning if device.type == "cuda" and backend.startswith("exact") else logger.info
        log("recurrent layers: %d %s mixers, %s", mixers, recurrent.kind, backend)
    if cfg.use_remove_padding:
        assert lm.get_decoder().config._attn_implementation == extra["attn_implementation"], "varlen not selected"
    device_type = resolve_device_type(cfg.trainer.device)
    recipe = fp8_recipe(cfg.model.fp8)
    if recipe is not None:  # before the fused kernels and the joined q/k/v, which then leave these layers alone
        spec = moe_spec(hf_config)
        n, kept = convert_to_fp8(lm, recipe, spec and spec.router_suffix, emulate=device_type != "cuda")
        logger.info("FP8 (%s, torchao): %d linear layers; %d left in the model dtype (sft/ops/fp8.py)", recipe, n, kept)
        if not cfg.model.compile and device_type == "cuda":
            logger.warning("model.fp8 without model.compile=true: %s", FP8_UNFUSED)
    liger = liger_wanted(cfg.model.use_liger, device_type, hf_config.model_type, cfg.model.compile)
    if liger:
        apply_liger(lm.get_decoder() if is_multimodal(full_config) else lm, required=cfg.model.use_liger is True)
    if not cfg.model.compile:  # its hooks and per-call outputs would break compiled graphs
        logger.info(
            "attention projections: q, k and v as one autograd node in %d layers (sft/ops/qkv_proj.py)", join_qkv(lm)
        )
    if cfg.model.enable_gradient_checkpointing:
        # HF's own per-layer checkpointing keeps parameter names unchanged (checkpoint wrappers would not).
        # Renamed activation_checkpointing_enable (with a renamed argument) in newer transformers.
        ac_kwargs = {"use_reentrant": False}
        if cfg.model.gradient_checkpointing_mode == "selective":
            ac_kwargs["context_fn"] = selective_checkpoint_context()
        if hasattr(lm, "activation_checkpointing_enable"):
            lm.activation_checkpointing_enable(activation_checkpointing_kwargs=ac_kwargs)
        else:
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=ac_kwargs)
    fused = resolve_device_type(cfg.trainer.device) == "cuda"
    logger.info("loss: %s", "fused linear cross-entropy" if fused else "chunked linear cross-entropy")
    spec, coef = moe_spec(hf_config), cfg.model.router_aux_loss_coef
    routing = None
    if spec is not None:
        coef = float(getattr(hf_config, spec.coef_key, 0.0) or 0.0) if coef is None else coef
        routing = RouterStats(lm, spec, coef)
    model = CausalLMWithLoss(lm, fused_loss=fused, softcap=final_softcap(hf_config), routing=routing)
    model.logit_multiplier = logit_multiplier(hf_config)
    model.recurrent = mixers > 0
    switch = None if vision else switch_length(hf_config)  # (with images the config checks refuse long rows)
    if switch is not None:
        model.long_rope = install_per_sample_longrope(lm.get_decoder(), switch)
        if model.long_rope is None and cfg.data.max_length > switch:  # never the batch-wide switch in silence
            raise ValueError(
                f"model_type={hf_config.model_type}: its longrope rotary module is not where sft patches it "
                f"(decoder.rotary_emb); set data.max_length<={switch}"
            )
        if model.long_rope is not None:
            logger.info("rotary: longrope, each sample at the frequencies it has alone (long past %d tokens)", switch)
    model.frozen = frozen
    if vision:
        model.vision = vision_family(full_config)
        if model.vision.grid:
            # All the micro-batch's images in one varlen call; set on the built tower's own config, past
            # transformers' check of the name (its "flash" makes the towers pass the image boundaries instead of
            # looping in Python). Fixed-size towers (Gemma 3's SigLIP) take a plain batch with their own attention.
            vision_tower(lm, model.vision).config._attn_implementation = register_vision_attention()
        else:
            vision_tower(lm, model.vision).config._attn_implementation = "sdpa"  # not the decoder's packed one
        model.image_token_id = int(full_config.image_token_id)
        tower_n, proj_n = freeze(lm, model.vision, cfg.model.freeze_vision_tower, cfg.model.freeze_projector)
        logger.info(
            "vision-language SFT: %s; frozen: %d vision tower and %d projector parameters",
            type(lm).__name__,
            tower_n,
            proj_n,
        )
    # Fused norms and SwiGLU keep fewer activations: the token budget's memory estimate uses it.
    model.liger_layers = liger and mlp_kernel(hf_config.model_type) != "none"
    return model


def load_weights(model: CausalLMWithLoss, cfg: SFTConfig, ctx: DistContext) -> None:
    """Materialise the sharded model and fill it from rank 0's copy of the checkpoint."""
    model.to_empty(device=ctx.device)
    full_sd: dict[str, torch.Tensor] = {}
    buffers: dict[str, torch.Tensor] = {}
    if ctx.is_main:
        dtype = DTYPES[cfg.model.fsdp_config.model_dtype]
        if model.vision is not None:  # the whole checkpoint, by its own class
            src = type(model.lm).from_pretrained(cfg.model.partial_pretrain, dtype=dtype)
        elif model.frozen is None:
            src = AutoModelForCausalLM.from_pretrained(
                cfg.model.partial_pretrain,
                dtype=dtype,
                trust_remote_code=cfg.model.trust_remote_code,
                use_cache=False,
            )
        else:  # its own class, cut to the language model; the rest is read as stored, for the exports
            src = model.frozen.load_language_model(Path(cfg.model.partial_pretrain), dtype)
            model.frozen.read(Path(cfg.model.partial_pretrain))
        if model.vision is not None or model.frozen is not None:
            model.processor_files = processor_files(Path(cfg.model.partial_pretrain))
        add_lora(
            src, cfg.model, load_adapter=True, language_only=model.vision is not None
        )  # same names as the meta model; A random, B zero or the adapter
        full_sd = {f"lm.{k}": v for k, v in src.state_dict().items()}
        # Non-persistent buffers (rotary inv_freq) are not in the state dict but were garbage
        # after to_empty: take rank 0's real values.
        buffers = {f"lm.{k}": b for k, b in src.named_buffers()}
        del src
    set_model_state_dict(
        model,
        full_sd,
        options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=True),
    )
    for name, buf in model.named_buffers():
        src_buf = buffers[name].to(ctx.device) if ctx.is_main else torch.empty_like(buf)
        dist.broadcast(src_buf, src=0, group=ctx.world_group)
        buf.copy_(src_buf)
    model.lm.tie_weights()
