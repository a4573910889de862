"""Models: loading Hugging Face causal LMs onto FSDP2 shards, and what the trainer adds around them.

`loading.py` builds on meta, loads weights on rank 0 and broadcasts them, and wraps the model with the
loss; `families.py` is the one table of per-family behaviour; `moe.py` the router statistics and aux loss;
`lora.py` LoRA adapters; `loss.py` the chunked cross-entropy over target tokens; `attention/` packed attention.
"""
