"""sft: supervised fine-tuning of Hugging Face causal language models with PyTorch FSDP2, under torchrun.

A drop-in for verl's `fsdp_sft_trainer` (same command line, config keys and checkpoint folders). Entry points:
`python -m sft.fsdp_sft_trainer` (and `sft.sft_trainer`, verl's newer layout) train; `sft.demo`, `sft.merge`,
`sft.convert_checkpoint`, `sft.inspect_data`, `sft.plot` and `sft.bench` are the tools. The subpackages are
grouped by role; docs/ARCHITECTURE.md maps them and the direction their imports go.
"""
