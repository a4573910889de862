"""The exception for configuration problems, the check that raises it, and how a message lists choices.

Its own module so that every validation module (sft/config/checks.py, sft/config/model_checks.py) raises
the same type, which the CLI turns into one line and exit status 2.
"""

from __future__ import annotations

from collections.abc import Iterable


class ConfigError(ValueError):
    """A user-facing configuration problem; the message is one line."""


def need(ok: bool, msg: str) -> None:
    if not ok:
        raise ConfigError(msg)


def one_line(exc: BaseException) -> str:
    """An exception's message on one line (Arrow's, transformers' and the probe's can span several)."""
    return " ".join(str(exc).split())


def either(choices: Iterable[object]) -> str:
    """`a, b or c`: the allowed values of a key, as a message names them."""
    names = [str(c) for c in choices]
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"
