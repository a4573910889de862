"""Run a function on N gloo processes (real torch.distributed, real fully_shard) from a test.

`run_ranks(fn, world_size, *args)` starts the ranks with torchrun-like environment variables
and re-raises a child's exception with its traceback in the parent, so a failure on rank 1
reads like a failure in the test itself.

The ranks are forked from a server process that imported torch, transformers and the trainer once (multiprocessing's
forkserver), not spawned: a spawned rank spent about 7 s importing them before its first line, for every launch of
the suite. Each rank still starts from that clean, never-used import state, with the test's current environment.
"""

from __future__ import annotations

import faulthandler
import multiprocessing
import os
import socket

import torch
import torch.multiprocessing as mp

PORT_ATTEMPTS = 3
multiprocessing.set_forkserver_preload(["torch", "torch.distributed", "transformers", "sft.trainer"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, fn, world_size: int, port: int, env: dict, args: tuple) -> None:
    faulthandler.enable()  # a rank that dies of a signal prints its Python stack into the test's captured output
    # The fork server's environment is the one it started with: take the test's, as a spawned rank would.
    os.environ.clear()
    os.environ.update(env)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        OMP_NUM_THREADS="1",
    )
    # torch is already imported here (unpickling fn imported it), so the variable alone is too
    # late: match torchrun's one thread per rank, or matmul reductions differ from a torchrun run.
    torch.set_num_threads(1)
    fn(*args)


def run_ranks(fn, world_size: int, *args) -> None:
    """Call fn(*args) on `world_size` forked processes; raises if any rank fails.

    The free port is released before rank 0's store binds it, and in that gap another test process (the other
    pytest worker's gloo connections) can take it: a launch that fails with EADDRINUSE, before any rank did any
    work, is launched again on a new port."""
    for attempt in range(PORT_ATTEMPTS):
        try:
            mp.start_processes(
                _entry,
                args=(fn, world_size, _free_port(), dict(os.environ), args),
                nprocs=world_size,
                start_method="forkserver",
            )
            return
        except mp.ProcessRaisedException as exc:
            if "EADDRINUSE" not in str(exc) or attempt == PORT_ATTEMPTS - 1:
                raise
