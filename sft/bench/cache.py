"""Start-up cost of the tokenised cache: `python -m sft.bench.cache gen|run|replicate ...`.

`gen OUT --rows N --copies C`: synthetic chats whose rendered token lengths are log-normal
(median 800) -> OUT/small.parquet (N distinct rows), OUT/big.parquet (those rows C times) and
the demo tokenizer in OUT/tok. `run FILE CACHE_DIR` (under torchrun): seconds from launch
(SFT_LAUNCH_T, set before torchrun) to the dataset ready and to the first micro-batch, and each
rank's RSS/PSS; rank 0 writes one JSON line. `replicate OUT`: the cache of big.parquet written
from small.parquet's cache repeated C times (what tokenizing big.parquet would give, since its
rows are small.parquet's repeated), for warm start-up at sizes too slow to tokenize here.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from sft.config.schema import DataConfig

MEDIAN_TOKENS = 900  # of the generated text; rendered lengths come out with a median near 800
SIGMA = 0.7  # log-normal shape: p90 ~ 2x the median
MAX_LENGTH = 8192


def data_config(files: str) -> DataConfig:
    cfg = DataConfig(train_files=files, max_length=MAX_LENGTH, truncation="right")
    cfg.multiturn.enable = True
    return cfg


def generate(out: Path, rows: int, copies: int, seed: int = 0) -> None:
    from sft.bench.assets import single_token_words
    from sft.demo.assets import build_tokenizer

    tok = build_tokenizer()
    tok.save_pretrained(out / "tok")
    words = np.asarray(single_token_words(tok))
    rng = np.random.default_rng(seed)
    # One long text of random one-token words; each message is a slice of it (fast at 1M rows).
    pool_words = rng.choice(words, 4_000_000)
    ends = np.cumsum([len(w) + 1 for w in pool_words])
    pool = " ".join(pool_words.tolist())
    totals = np.clip(rng.lognormal(np.log(MEDIAN_TOKENS), SIGMA, rows), 40, 20_000).astype(np.int64)
    chats = []
    for total in totals:
        turns = 1 if total < 300 else 2
        per = max(4, int(total) // (2 * turns) - 6)  # ~6 template tokens per message
        msgs = []
        for t in range(turns):
            for role in ("user", "assistant"):
                n = per if role == "assistant" else max(4, per // 2 if t else per)
                s = int(rng.integers(1, len(ends) - n - 1))
                msgs.append({"role": role, "content": pool[ends[s - 1] : ends[s + n - 1] - 1]})
        chats.append(msgs)
    table = pa.table({"messages": chats})
    pq.write_table(table, out / "small.parquet")
    pq.write_table(pa.concat_tables([table] * copies), out / "big.parquet", row_group_size=65536)


def _memory_mb() -> dict[str, float]:
    """This process's resident set and proportional set (shared pages divided among their users)."""
    out = {}
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in ("Rss", "Pss"):
            out[name.lower() + "_mb"] = round(int(rest.split()[0]) / 1024, 1)
    return out


def run(file: str, cache_dir: str | None, tok_dir: str, out_json: str) -> None:
    import torch.distributed as dist
    from transformers import AutoTokenizer

    from sft.data.batch import padded_micro_batch
    from sft.data.build import build_dataset
    from sft.data.storage import TokenizeShard

    t_launch = float(os.environ.get("SFT_LAUNCH_T", time.time()))
    t_start = time.time()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    tok = AutoTokenizer.from_pretrained(tok_dir)
    t0 = time.time()
    shard = TokenizeShard(rank, world, dist.group.WORLD) if world > 1 else None
    ds = build_dataset(file, tok, data_config(file), -1, True, shard=shard, cache_dir=cache_dir or None)
    t_ready = time.time()
    batch = padded_micro_batch([ds[i] for i in range(rank, rank + 4)])
    t_first = time.time()
    report = {
        "rank": rank,
        "python_start_s": round(t_start - t_launch, 2),
        "dataset_s": round(t_ready - t0, 2),
        "launch_to_first_batch_s": round(t_first - t_launch, 2),
        **_memory_mb(),
    }
    reports: list = [None] * world
    dist.all_gather_object(reports, report)
    if rank == 0:
        summary = {
            "file": file,
            "cache": bool(cache_dir),
            "world": world,
            "samples": len(ds),
            "tokens": int(ds.offsets[-1]),
            "median_len": float(np.median(ds.lengths)),
            "first_batch_tokens": int(batch["attention_mask"].sum()),
            "ranks": reports,
        }
        with open(out_json, "a") as f:
            f.write(json.dumps(summary) + "\n")
    dist.destroy_process_group()


def replicate(out: Path, copies: int, cache_dir: str) -> None:
    from transformers import AutoTokenizer

    from sft.data.cache import cache_folder, check_cache, fingerprint, open_cache
    from sft.data.cache_write import Batch, assemble, commit, make_staging, new_nonce
    from sft.data.multiturn import MultiTurnSFTDataset

    tok = AutoTokenizer.from_pretrained(out / "tok")
    kind = f"{MultiTurnSFTDataset.__module__}.{MultiTurnSFTDataset.__qualname__}"
    root = Path(cache_dir)
    small, big = str(out / "small.parquet"), str(out / "big.parquet")
    key, _ = fingerprint(kind, [small], -1, tok, data_config(small))
    manifest, why = check_cache(cache_folder(root, key), key)
    assert manifest is not None, f"build small.parquet's cache first: {why}"
    data = open_cache(cache_folder(root, key), manifest)
    n_rows = data.source.num_rows
    big_key, inputs = fingerprint(kind, [big], -1, tok, data_config(big))
    batches = [
        Batch(
            k,
            np.asarray(data.rows) + k * n_rows,
            np.asarray(data.lengths),
            data.num_trained,
            data.input_ids,
            data.loss_mask,
        )
        for k in range(copies)
    ]
    record = {
        "key": big_key,
        "inputs": inputs,
        "source": {"paths": [big], "starts": [0, n_rows * copies], "json": [False]},
        "lines": np.zeros(0, np.int64),
        "counters": {k: v * copies for k, v in data.counters.items()},
        "bad_rows": {"count": data.bad_count * copies, "samples": {}},
        "num_trained": data.num_trained * copies,
    }
    staging, why = make_staging(root, big_key, new_nonce())
    assert staging is not None, why
    assemble(staging, batches, record)
    commit(staging, cache_folder(root, big_key))


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sft.bench.cache", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("gen")
    g.add_argument("out", type=Path)
    g.add_argument("--rows", type=int, default=20_000)
    g.add_argument("--copies", type=int, default=50)
    r = sub.add_parser("run")
    r.add_argument("file")
    r.add_argument("cache_dir")
    r.add_argument("--tok", required=True)
    r.add_argument("--out", required=True)
    c = sub.add_parser("replicate")
    c.add_argument("out", type=Path)
    c.add_argument("cache_dir")
    c.add_argument("--copies", type=int, default=50)
    args = p.parse_args(argv)
    if args.cmd == "gen":
        args.out.mkdir(parents=True, exist_ok=True)
        generate(args.out, args.rows, args.copies)
    elif args.cmd == "run":
        run(args.file, args.cache_dir, args.tok, args.out)
    else:
        replicate(args.out, args.copies, args.cache_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
