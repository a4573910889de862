"""Entry point: `torchrun -m sft.fsdp_sft_trainer key=value ...` (verl's `fsdp_sft_trainer` command line).

`main()` composes and validates the config before anything expensive, starts the process group and the
meshes, trains with `FSDPSFTTrainer` (sft/trainer.py) and tears down, whatever happens (sft/cli.py).
"""

from __future__ import annotations

import sys

from sft.cli import run_cli
from sft.trainer import FSDPSFTTrainer, train

__all__ = ["FSDPSFTTrainer", "main", "train"]


def main(argv: list[str] | None = None) -> None:
    sys.exit(run_cli(sys.argv[1:] if argv is None else argv, train))


if __name__ == "__main__":
    main()
