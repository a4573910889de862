"""Process group, device meshes and rank helpers.

One place decides the device (CPU with gloo, CUDA with NCCL) and builds two meshes over the
same ranks: a 1-D `fsdp` mesh over the whole world (parameters are sharded over every rank)
and a 2-D (`dp`, `sp`) mesh whose `sp` groups hold the same samples split along the sequence.
Everything that needs a group gets it from `DistContext`: there are no module-level globals.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from sft.config.errors import either
from sft.config.schema import DEVICES

logger = logging.getLogger("sft")


@dataclass(frozen=True)
class WorldInfo:
    """What torchrun tells us through the environment, readable before any group exists."""

    rank: int
    local_rank: int
    world_size: int
    local_world_size: int

    @staticmethod
    def from_env() -> WorldInfo:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        return WorldInfo(
            rank=int(os.environ.get("RANK", "0")),
            local_rank=int(os.environ.get("LOCAL_RANK", "0")),
            world_size=world,
            local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", str(world))),
        )


@dataclass
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    fsdp_mesh: DeviceMesh  # 1-D over the world: parameter sharding
    dp_sp_mesh: DeviceMesh  # 2-D (dp, sp): who gets which samples, who splits a sequence

    @property
    def dp_rank(self) -> int:
        return self.dp_sp_mesh.get_local_rank("dp")

    @property
    def dp_size(self) -> int:
        return self.dp_sp_mesh.size(0)

    @property
    def sp_rank(self) -> int:
        return self.dp_sp_mesh.get_local_rank("sp")

    @property
    def sp_size(self) -> int:
        return self.dp_sp_mesh.size(1)

    @property
    def world_group(self) -> dist.ProcessGroup:
        return self.fsdp_mesh.get_group()

    @property
    def sp_group(self) -> dist.ProcessGroup:
        return self.dp_sp_mesh.get_group("sp")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device_type(requested: str) -> str:
    """`auto` picks CUDA when a GPU is visible, else CPU."""
    if requested not in DEVICES:
        raise ValueError(f"trainer.device={requested!r}: choose {either(DEVICES)}")
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise ValueError("trainer.device=cuda but no CUDA device is visible; use trainer.device=cpu or auto")
    return requested


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(device_type: str, sp_size: int, timeout_s: int = 1800) -> DistContext:
    """Start the process group (also for a plain `python -m` run of one process) and the meshes."""
    info = WorldInfo.from_env()
    if device_type == "cuda":
        # Packed micro-batches change size every time: expandable segments keep the allocator from
        # fragmenting into an OOM at the automatic budget (a user's own setting is kept). Before the
        # first CUDA allocation, when the allocator reads it.
        os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
        torch.cuda.set_device(info.local_rank)
        device = torch.device("cuda", info.local_rank)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    # Not launched by torchrun: a world of one on a free local port (passed explicitly, not
    # through os.environ, which child processes would inherit).
    init_method = None if "MASTER_ADDR" in os.environ else f"tcp://127.0.0.1:{_free_port()}"
    if not dist.is_initialized():
        dist.init_process_group(
            backend=backend,
            init_method=init_method,
            rank=info.rank,
            world_size=info.world_size,
            timeout=timedelta(seconds=timeout_s),
            device_id=device if device_type == "cuda" else None,
        )
    assert info.world_size % sp_size == 0, "validated before: sp divides the world"
    fsdp_mesh = init_device_mesh(device_type, (info.world_size,), mesh_dim_names=("fsdp",))
    dp_sp_mesh = init_device_mesh(device_type, (info.world_size // sp_size, sp_size), mesh_dim_names=("dp", "sp"))
    return DistContext(
        rank=info.rank,
        world_size=info.world_size,
        local_rank=info.local_rank,
        device=device,
        fsdp_mesh=fsdp_mesh,
        dp_sp_mesh=dp_sp_mesh,
    )


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def setup_logging(rank: int) -> None:
    """Rank 0 logs INFO to stderr; other ranks only warnings and errors (prefixed by rank)."""
    log = logging.getLogger("sft")
    log.handlers.clear()
    handler = logging.StreamHandler()
    prefix = "" if rank == 0 else f"[rank {rank}] "
    handler.setFormatter(logging.Formatter(f"%(asctime)s {prefix}%(message)s", "%H:%M:%S"))
    log.addHandler(handler)
    log.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    log.propagate = False
