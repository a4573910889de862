"""Parallelism: process groups and device meshes, FSDP2 sharding and activation checkpointing, Ulysses.

`distributed.py` starts and tears down torch.distributed (NCCL on CUDA, gloo on CPU) and holds the
`DistContext` passed to everything else; `fsdp.py` applies `fully_shard`, mixed precision and
(selective) recompute; `ulysses.py` splits sequences over sequence-parallel ranks with all-to-alls.
"""
