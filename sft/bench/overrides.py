"""The benchmark's Hydra overrides: defaults per model shape, then the user's keys, then the keys it owns.

The user's keys are never replaced: only data, model, step count and output folder are the
benchmark's own (`OWNED`); with remove-padding the token budget stays the trainer's choice.
"""

from __future__ import annotations

from pathlib import Path

# Keys the benchmark owns (they fix which data, which model and how many steps).
OWNED = ("data.train_files", "model.partial_pretrain", "trainer.total_training_steps", "trainer.total_epochs",
         "trainer.resume_mode", "trainer.default_local_dir")  # fmt: skip
# Per shape kind: samples per data-parallel rank per step (the global batch scales with dp, so the
# work per GPU stays the same), micro-batch size, data.max_length and checkpointing. No token
# budget: with remove-padding the trainer chooses it (sft/loop/budget.py), as it does for every user.
SHAPE_DEFAULTS = {
    # CPU-sized: the tiny model's CPU attention is a per-sample loop, so rows stay short.
    "tiny": {"batch_per_dp": 8, "micro_batch": 8, "max_length": 1024, "checkpointing": "false"},
    "large": {"batch_per_dp": 32, "micro_batch": 4, "max_length": 4096, "checkpointing": "true"},
}


def override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def merge(*groups: list[str]) -> list[str]:
    """Hydra overrides, later ones replacing earlier ones of the same key (order kept)."""
    out: dict[str, str] = {}
    for group in groups:
        for o in group:
            out[override_key(o)] = o
    return list(out.values())


def bench_overrides(
    shape: str, user: list[str], steps: int, dp: int, workdir: Path, parquet: Path, probe=None
) -> list[str]:
    """Defaults for the shape, then the user's overrides, then the keys the benchmark owns.

    With `probe` (the config composed from a first pass) the default that depends on the user's
    choices is added: a micro-batch size that divides the per-rank batch, unless the user set one.
    """
    d = SHAPE_DEFAULTS["tiny" if shape == "tiny" else "large"]
    base = [
        "use_remove_padding=true",
        "data.multiturn.enable=true",
        f"data.train_batch_size={d['batch_per_dp'] * dp}",
        f"data.micro_batch_size_per_gpu={d['micro_batch']}",
        f"data.max_length={d['max_length']}",
        f"model.enable_gradient_checkpointing={d['checkpointing']}",
        "trainer.logger=[]",
        "trainer.checkpoint.save_contents=[]",
    ]
    owned = [
        f"data.train_files={parquet}",
        f"model.partial_pretrain={workdir}/model-{shape}",
        f"trainer.total_training_steps={steps}",
        "trainer.total_epochs=1",
        "trainer.resume_mode=disable",
        f"trainer.default_local_dir={workdir}/ckpt-sft",
    ]
    merged = merge(base, user, owned)
    if probe is None:
        return merged
    keys = set(map(override_key, user))
    if "data.micro_batch_size_per_gpu" not in keys:
        mbs = max(1, min(d["micro_batch"], probe.data.train_batch_size // dp))
        merged = merge(merged, [f"data.micro_batch_size_per_gpu={mbs}"])
    return merged
