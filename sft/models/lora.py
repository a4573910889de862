"""LoRA through peft: adapters injected in place into the HF model, their export and their merge.

`add_lora` turns the targeted linear layers into peft LoRA layers (base weights frozen, only
`lora_A`/`lora_B` train) on the meta model and on rank 0's source copy alike, so the names
match when weights are broadcast; the source copy may take its adapter from `model.lora_adapter_path`.
Checkpoints get `lora_adapter/` laid out as `PeftModel.save_pretrained` writes it, and exports
get plain HF names with `W + (alpha / r) * B @ A` for every adapted layer (online and in `sft.merge`).
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from sft.config.schema import ModelConfig

if TYPE_CHECKING:
    from peft import LoraConfig
    from peft.tuners.lora import LoraLayer

logger = logging.getLogger("sft")

ADAPTER = "default"  # peft's adapter name inside the modules; PeftModel.save_pretrained drops it from the keys
PEFT_PREFIX = "base_model.model."  # what PeftModel puts before the HF model's own module paths
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


def lora_layers(lm: nn.Module) -> dict[str, LoraLayer]:
    """Module path -> LoRA layer, in module order (every rank iterates them the same way)."""
    # peft costs seconds of start-up, so only add_lora imports it: until then no model has LoRA layers.
    if "peft" not in sys.modules:
        return {}
    from peft.tuners.lora import LoraLayer

    return {n: m for n, m in lm.named_modules() if isinstance(m, LoraLayer)}


def is_lora(lm: nn.Module) -> bool:
    return bool(lora_layers(lm))


def all_linear(lm: nn.Module) -> list[str]:
    """`model.target_modules=all-linear`: the path of every `nn.Linear` but the LM head and MoE routers. Not peft's own
    "all-linear", which also wraps MoE experts and routers (3-D weights, as parameter wrappers) that sft's loss,
    merge and export do not adapt: a router with an adapter would change the routing."""
    from sft.models.families import moe_spec

    head = lm.get_output_embeddings()
    # Routers by the class-name suffix the family table gives (as the router statistics and FP8 find them); some
    # hold an nn.Linear (Gemma 4's router.proj).
    spec = moe_spec(lm.config.get_text_config())
    routers = [n for n, mod in lm.named_modules() if spec and type(mod).__name__.lower().endswith(spec.router_suffix)]
    return [
        n
        for n, mod in lm.named_modules()
        if isinstance(mod, nn.Linear) and mod is not head and not any(n.startswith(r + ".") for r in routers)
    ]


def _check_targets(lm: nn.Module, targets: list[str]) -> None:
    """Each entry must match (as peft matches: the path or a suffix after a dot) linear layers only;
    the LM head is refused because the fused loss reads its weight directly (an adapter there would be ignored)."""
    head = lm.get_output_embeddings()
    modules = dict(lm.named_modules())
    linear = sorted({n.rsplit(".", 1)[-1] for n, m in modules.items() if isinstance(m, nn.Linear) and m is not head})
    for t in targets:
        if not isinstance(t, str) or not t:
            raise ValueError(f"model.target_modules: {t!r} is not a module name; give names such as {linear[:3]}")
        hits = [n for n in modules if n == t or n.endswith("." + t)]
        if not hits:
            raise ValueError(
                f"model.target_modules: {t!r} matches no module of {type(lm).__name__}; its linear layers are "
                f"named {', '.join(linear)}; use model.target_modules=all-linear or some of those"
            )
        bad = [n for n in hits if not isinstance(modules[n], nn.Linear) or modules[n] is head]
        if bad:
            raise ValueError(
                f"model.target_modules: {t!r} matches {bad[0]} ({type(modules[bad[0]]).__name__}), which sft cannot "
                f"adapt (linear layers only, not the LM head); choose among {', '.join(linear)}"
            )


def add_lora(lm: nn.Module, m: ModelConfig, load_adapter: bool = False, language_only: bool = False) -> None:
    """Inject LoRA layers into `lm` in place when `model.lora_rank > 0` (else nothing).

    Works on the meta device (empty adapters) and on real weights (peft's init: A random, B zero, so
    the model starts as the base model). `load_adapter=True` then fills them from `model.lora_adapter_path`.
    `language_only` (a vision-language model): adapters in the text decoder only, named by full path, since the
    vision tower's blocks share leaf names (gate_proj, ...); the tower stays frozen, as every base weight."""
    if m.lora_rank <= 0:
        return
    from peft import LoraConfig, inject_adapter_in_model

    targets = m.target_modules if isinstance(m.target_modules, str) else list(m.target_modules)
    if targets == "all-linear":
        targets = all_linear(lm)
    else:
        # A single other string would be a regex to peft; here it names one module.
        targets = [targets] if isinstance(targets, str) else targets
        _check_targets(lm, targets)
    if language_only:
        inside = {id(x) for x in lm.get_decoder().modules()}
        named = {n: x for n, x in lm.named_modules() if id(x) in inside and isinstance(x, nn.Linear)}
        targets = [n for n in named if any(n == t or n.endswith("." + t) for t in targets)]
    exclude = (
        m.exclude_modules
        if m.exclude_modules is None or isinstance(m.exclude_modules, str)
        else list(m.exclude_modules)
    )
    config = LoraConfig(
        r=m.lora_rank,
        lora_alpha=m.lora_alpha,
        target_modules=targets,
        exclude_modules=exclude,
        lora_dropout=0.0,
        bias="none",
    )
    # Through a holder that has no `config`: for MoE model types whose layout changed in transformers v5, peft reads
    # gate_proj/up_proj/down_proj as also naming the experts' 3-D weights and wraps them (and would wrap a
    # `shared_experts.gate_proj` target's experts too). sft adapts linear layers only; the module paths are unchanged.
    holder = nn.Module()
    holder.add_module("lm", lm)
    inject_adapter_in_model(config, holder)
    for layer in lora_layers(lm).values():
        # One dtype per FSDP unit: peft leaves meta adapters in fp32 whatever the base dtype is.
        dtype = layer.get_base_layer().weight.dtype
        layer.lora_A[ADAPTER].to(dtype=dtype)
        layer.lora_B[ADAPTER].to(dtype=dtype)
    if not load_adapter:  # the meta model; rank 0's source copy would say the same again
        n_train = sum(p.numel() for p in lm.parameters() if p.requires_grad)
        logger.info(
            "LoRA r=%d alpha=%d on %d layers: %d trainable parameters",
            m.lora_rank,
            m.lora_alpha,
            len(lora_layers(lm)),
            n_train,
        )
    if load_adapter and m.lora_adapter_path:
        _load_adapter(lm, Path(m.lora_adapter_path).expanduser())


def peft_key(path: str, which: str) -> str:
    """The key PeftModel.save_pretrained writes for the `lora_A`/`lora_B` weight of the module at `path`."""
    return f"{PEFT_PREFIX}{path}.{which}.weight"


def _load_adapter(lm: nn.Module, folder: Path) -> None:
    """Copy a saved adapter into the injected LoRA layers; the two key sets must be equal."""
    saved = load_file(str(folder / ADAPTER_WEIGHTS))
    wanted = {
        peft_key(p, w): getattr(layer, w)[ADAPTER].weight
        for p, layer in lora_layers(lm).items()
        for w in ("lora_A", "lora_B")
    }
    missing, extra = sorted(wanted.keys() - saved.keys()), sorted(saved.keys() - wanted.keys())
    if missing or extra:
        first = (
            f"the adapter lacks {missing[0]}" if missing else f"the adapter has {extra[0]}, which the model does not"
        )
        raise ValueError(
            f"model.lora_adapter_path={folder}: {first} ({len(missing)} missing, {len(extra)} unexpected); "
            f"set model.target_modules to the adapter's target_modules in {ADAPTER_CONFIG}"
        )
    with torch.no_grad():
        for key, param in wanted.items():
            if saved[key].shape != param.shape:
                raise ValueError(
                    f"model.lora_adapter_path={folder}: {key} has shape {tuple(saved[key].shape)}, the model expects "
                    f"{tuple(param.shape)}; the adapter was trained on another base model"
                )
            param.copy_(saved[key])
    logger.info("LoRA adapter loaded from %s", folder)


def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a (possibly FSDP-sharded) parameter; a collective for a DTensor."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def adapter_state(lm: nn.Module) -> dict[str, torch.Tensor]:
    """Full LoRA tensors under PeftModel's names, on CPU; every rank must call it (gathers)."""
    out = {}
    for path, layer in lora_layers(lm).items():
        for which in ("lora_A", "lora_B"):
            out[peft_key(path, which)] = _full(getattr(layer, which)[ADAPTER].weight).detach().cpu().contiguous()
    return out


def adapter_config(lm: nn.Module, base_model: str | None, full_paths: bool = False) -> LoraConfig:
    """The config PeftModel.from_pretrained needs, with the real r and lora_alpha of the layers. `full_paths`: name
    each adapted module by its path (a multimodal checkpoint's vision tower, absent from `lm`, has the same leaves)."""
    from peft import LoraConfig

    layers = lora_layers(lm)
    first = next(iter(layers.values()))
    leaves = sorted({p.rsplit(".", 1)[-1] for p in layers})
    # Leaf names are what users write; fall back to full paths when the leaves would adapt more modules.
    covered = {n for n, _ in lm.named_modules() if n.rsplit(".", 1)[-1] in leaves}
    targets = leaves if covered == set(layers) and not full_paths else sorted(layers)
    return LoraConfig(
        r=first.r[ADAPTER],
        lora_alpha=first.lora_alpha[ADAPTER],
        target_modules=targets,
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_model,
    )


def write_adapter(out: Path, state: dict[str, torch.Tensor], config: LoraConfig) -> None:
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(out))
    save_file(state, out / ADAPTER_WEIGHTS, metadata={"format": "pt"})


def plain_name(name: str) -> str:
    """`x.q_proj.base_layer.weight` -> `x.q_proj.weight`: the name the HF model has without peft."""
    return name.replace(".base_layer.", ".")


def merge_weight(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """W + scaling * B @ A, computed in fp32 and returned in W's dtype."""
    return (w.float() + scaling * (b.float() @ a.float())).to(w.dtype)


def merged_tensors(lm: nn.Module, named: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """(plain HF name, full tensor) for the online export: LoRA weights folded into their base weights.

    Gathers one tensor at a time like the plain export; every rank must iterate it in the same order."""
    layers = lora_layers(lm)
    for name, t in named:
        module, _, leaf = name.rpartition(".")
        if ".lora_" in name:
            continue  # folded into the base weight below
        if module.endswith(".base_layer") and leaf == "weight" and module[: -len(".base_layer")] in layers:
            layer = layers[module[: -len(".base_layer")]]
            w, a, b = _full(t), _full(layer.lora_A[ADAPTER].weight), _full(layer.lora_B[ADAPTER].weight)
            yield plain_name(name), merge_weight(w.detach(), a.detach(), b.detach(), layer.scaling[ADAPTER])
        else:
            yield plain_name(name), _full(t)


class OfflineMerge:
    """LoRA tensors of a DCP checkpoint (read once: they are small) and the scaling, for `sft.merge`."""

    def __init__(self, lora: dict[str, torch.Tensor], adapter_dir: Path) -> None:
        try:
            cfg = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
            self.scaling = cfg["lora_alpha"] / cfg["r"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{adapter_dir / ADAPTER_CONFIG}: cannot read the LoRA scaling ({exc!r})") from exc
        self.lora = lora  # HF-relative names, e.g. model.layers.0.self_attn.q_proj.lora_A.default.weight

    @staticmethod
    def is_lora_key(name: str) -> bool:
        return ".lora_" in name

    def apply(self, name: str, t: torch.Tensor) -> tuple[str, torch.Tensor]:
        module, _, leaf = name.rpartition(".")
        if module.endswith(".base_layer") and leaf == "weight":
            path = module[: -len(".base_layer")]
            a = self.lora[f"{path}.lora_A.{ADAPTER}.weight"]
            b = self.lora[f"{path}.lora_B.{ADAPTER}.weight"]
            t = merge_weight(t, a, b, self.scaling)
        return plain_name(name), t
