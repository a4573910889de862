"""The parts of the training loop the trainer calls: optimizer and schedule, token budget, step plan,
metrics, loggers and step callbacks, FLOPs and throughput, preemption and host-sync checks.

Each module is a small piece with its own tests; `sft/trainer.py` wires them together.
"""
