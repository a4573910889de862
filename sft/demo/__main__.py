"""`python -m sft.demo DIR` writes the demo assets; `python -m sft.demo train [...]` runs the training demo;
`python -m sft.demo vision [...]` runs the vision-language training demo."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["train"]:  # the before/after accuracy demo
        from sft.demo.train import main_train

        return main_train(argv[1:])
    if argv[:1] == ["vision"]:  # the before/after accuracy demo on images
        from sft.demo.vision_train import main_vision

        return main_vision(argv[1:])
    from sft.demo.assets import main as write_assets

    return write_assets(argv)


if __name__ == "__main__":
    sys.exit(main())
