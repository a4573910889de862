"""A rank's extra state in a checkpoint (counters, data position, lr schedule, wandb id, RNG states).

Written as `extra_state_rank_R.json` (plain data; Python's and numpy's Mersenne-Twister states as
integers) and `rng_state_rank_R.safetensors` (torch's CPU and CUDA generator states as uint8
tensors): reading either runs no code and restores every generator bitwise. Checkpoints of
earlier versions hold a pickled `extra_state_rank_R.pt`; it is read only with
`torch.load(weights_only=True)` and an allowlist of numpy's array types, and refused otherwise
with the command of `sft.convert_checkpoint`. A `.pt` next to a `.json` is never opened.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from sft.checkpoint.safe_dcp import UnsafeFileError, why

logger = logging.getLogger("sft")

FORMAT = 1
MT_WORDS = 624  # Mersenne-Twister state words (numpy's key; Python adds the position as a 625th)


def json_name(rank: int) -> str:
    return f"extra_state_rank_{rank}.json"


def rng_name(rank: int) -> str:
    return f"rng_state_rank_{rank}.safetensors"


def legacy_name(rank: int) -> str:
    return f"extra_state_rank_{rank}.pt"


def rng_state() -> dict[str, Any]:
    """The live RNG states of this process (Python, numpy, torch CPU, and CUDA's current device)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _encode_rng(state: dict[str, Any]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(JSON part, tensor part); integers and float reprs round-trip exactly through JSON."""
    version, words, gauss = state["python"]
    kind, key, pos, has_gauss, cached = state["numpy"]
    plain = {
        "python": {"version": version, "state": list(words), "gauss_next": gauss},
        "numpy": {
            "bit_generator": kind,
            "key": [int(x) for x in key],
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
    }
    tensors = {k: state[k].contiguous() for k in ("torch", "cuda") if k in state}
    return plain, tensors


def _decode_rng(plain: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    py, npy = plain["python"], plain["numpy"]
    if len(py["state"]) != MT_WORDS + 1 or len(npy["key"]) != MT_WORDS:
        raise ValueError("RNG state has the wrong length")
    state: dict[str, Any] = {
        "python": (int(py["version"]), tuple(int(x) for x in py["state"]), py["gauss_next"]),
        "numpy": (
            str(npy["bit_generator"]),
            np.array(npy["key"], dtype=np.uint32),
            int(npy["pos"]),
            int(npy["has_gauss"]),
            float(npy["cached_gaussian"]),
        ),
    }
    for k in ("torch", "cuda"):
        if k in tensors:
            if tensors[k].dtype != torch.uint8:
                raise ValueError(f"RNG state {k!r} has dtype {tensors[k].dtype}, not uint8")
            state[k] = tensors[k]
    if "torch" not in state:
        raise ValueError("no torch RNG state")
    return state


def write(folder: Path, rank: int, extra: dict[str, Any]) -> None:
    """Write `extra` (JSON-able values) plus this process's RNG states for `rank`."""
    plain, tensors = _encode_rng(rng_state())
    save_file(tensors, folder / rng_name(rank), metadata={"format": "pt"})
    # allow_nan=False: a value JSON cannot hold exactly is a bug to surface at save, not at resume.
    text = json.dumps({"format": FORMAT, **extra, "rng": plain}, allow_nan=False)
    (folder / json_name(rank)).write_text(text)


def write_atomic(folder: Path, rank: int, extra: dict[str, Any]) -> None:
    """`write` of a given state (its "rng" in live form) through temporary names: for the converter."""
    plain, tensors = _encode_rng(extra["rng"])
    body = {k: v for k, v in extra.items() if k != "rng"}
    text = json.dumps({"format": FORMAT, **body, "rng": plain}, allow_nan=False)
    for name, put in (
        (rng_name(rank), lambda p: save_file(tensors, p, metadata={"format": "pt"})),
        (json_name(rank), lambda p: p.write_text(text)),
    ):
        tmp = folder / f".{name}.tmp"
        put(tmp)
        os.replace(tmp, folder / name)


def read_new(folder: Path, rank: int) -> dict[str, Any]:
    """The extra state from the JSON + safetensors pair of `rank`; ValueError when damaged."""
    try:
        body = json.loads((folder / json_name(rank)).read_text())
        tensors = load_file(str(folder / rng_name(rank)))
        body["rng"] = _decode_rng(body["rng"], tensors)
    except (KeyError, TypeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{folder / json_name(rank)}: damaged extra state ({type(exc).__name__}: {exc})") from exc
    body.pop("format", None)
    return body


def _numpy_globals() -> list[Any]:
    """What a pickled numpy RNG state references (an array of uint32 and its dtype); nothing runs code."""
    out: list[Any] = [np.ndarray, np.dtype, type(np.dtype(np.uint32))]
    for mod in ("numpy._core.multiarray", "numpy.core.multiarray"):
        try:
            out.append((__import__(mod, fromlist=["_reconstruct"])._reconstruct, f"{mod}._reconstruct"))
        except (ImportError, AttributeError):
            continue
    return out


def convert_command(folder: Path, trust: bool = False) -> str:
    return f"python -m sft.convert_checkpoint {folder}" + (" --trust-pickle" if trust else "")


def read_legacy(file: Path) -> dict[str, Any]:
    """An old pickled extra-state file, read with weights_only=True and the numpy allowlist only.

    Raises UnsafeFileError (naming the file and the converter) when the pickle needs anything else."""
    try:
        with torch.serialization.safe_globals(_numpy_globals()):
            extra = torch.load(file, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as exc:
        raise UnsafeFileError(
            f"{file}: old-format extra state that cannot be read without running its code ({why(exc)}); "
            f"it was not unpickled. If you wrote this checkpoint yourself, convert it knowingly: "
            f"{convert_command(file.parent, trust=True)}"
        ) from None
    rng = extra.get("rng") if isinstance(extra, dict) else None
    key = rng.get("numpy", (None, None))[1] if isinstance(rng, dict) else None
    if not isinstance(key, np.ndarray) or key.dtype != np.uint32 or key.shape != (MT_WORDS,):
        raise ValueError(f"{file}: not an extra-state file of sft (no numpy RNG state of {MT_WORDS} uint32 words)")
    return extra


def read(folder: Path, rank: int) -> dict[str, Any]:
    """This rank's extra state (rank 0's after a change of world size), new format first.

    A `.pt` beside the `.json` is never opened; a folder with only `.pt` files is read by `read_legacy`."""
    for r in (rank, 0):
        if (folder / json_name(r)).exists():
            old = folder / legacy_name(r)
            if old.exists():
                logger.warning("ignoring %s: %s is the extra state; .pt files are never unpickled", old, json_name(r))
            return read_new(folder, r)
    for r in (rank, 0):
        if (folder / legacy_name(r)).exists():
            logger.warning("%s: old-format extra state, read with weights_only=True", folder / legacy_name(r))
            return read_legacy(folder / legacy_name(r))
    raise FileNotFoundError(f"{folder}: no {json_name(rank)} (nor {json_name(0)})")
