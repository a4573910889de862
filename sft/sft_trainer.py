"""Entry point for verl's current SFT command line: `torchrun -m sft.sft_trainer key=value ...`.

verl >= 0.7.1 launches `verl.trainer.sft_trainer` with another key layout (`model.path`,
`engine.*`, top-level `checkpoint.*`, messages data only). `sft.config.verl_layout` maps those keys
onto our config; from there the run is exactly `sft.fsdp_sft_trainer`'s, on the same code path.
"""

from __future__ import annotations

import sys

from sft.cli import run_cli
from sft.config.verl_layout import translate
from sft.trainer import train


def main(argv: list[str] | None = None) -> None:
    sys.exit(run_cli(sys.argv[1:] if argv is None else argv, train, translate))


if __name__ == "__main__":
    main()
