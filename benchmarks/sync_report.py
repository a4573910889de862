"""Where the micro-batch loop still makes the host wait for the GPU: a diagnostic for one GPU.

Trains 2 steps of the demo model (the verl production keys: remove-padding, mb 2, bf16 master,
checkpointing) with `torch.cuda.set_sync_debug_mode("warn")` around the loop and prints each
distinct call site of a synchronising operation with its count. Usage: python3 benchmarks/sync_report.py DIR
"""

from __future__ import annotations

import collections
import sys
import traceback
import warnings
from pathlib import Path

from sft.config.schema import load_config
from sft.demo.assets import main as demo_main
from sft.parallel.distributed import init_distributed, teardown
from sft.trainer import FSDPSFTTrainer


def main(workdir: str) -> None:
    demo = Path(workdir) / "demo"
    if not (demo / "model").exists():
        demo_main([str(demo)])
    keys = [
        f"data.train_files={demo}/train.parquet", "data.multiturn.enable=true", "data.max_length=256",
        "data.truncation=right", f"model.partial_pretrain={demo}/model", "trainer.device=cuda",
        "use_remove_padding=true", "data.micro_batch_size_per_gpu=2", "model.fsdp_config.model_dtype=bf16",
        "data.train_batch_size=16", "data.max_token_len_per_gpu=512", "trainer.total_training_steps=2",
        "trainer.logger=[]", "trainer.checkpoint.save_contents=[]", "trainer.resume_mode=disable",
        f"trainer.default_local_dir={workdir}/ck",
    ]  # fmt: skip
    sites: collections.Counter[str] = collections.Counter()

    def record(message, category, filename, lineno, file=None, line=None) -> None:
        frames = [f for f in traceback.extract_stack()[:-1] if "warnings" not in f.filename]
        sites["\n    ".join(f"{f.filename.split('site-packages/')[-1]}:{f.lineno} {f.name}" for f in frames[-6:])] += 1

    ctx = init_distributed("cuda", 1)
    try:
        trainer = FSDPSFTTrainer(load_config(keys), ctx)
        trainer.sync_debug = "warn"
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = record
            trainer.fit()
    finally:
        teardown()
    print(f"{sum(sites.values())} synchronising calls in the micro-batch loops of 2 steps")
    for site, n in sites.most_common():
        print(f"{n:5d}x  {site}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "/tmp/sync_report")
