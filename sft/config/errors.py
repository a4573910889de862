"""The exception for configuration problems, and the check that raises it.

Its own module so that every validation module (sft/config/checks.py, sft/config/model_checks.py) raises
the same type, which the CLI turns into one line and exit status 2.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A user-facing configuration problem; the message is one line."""


def need(ok: bool, msg: str) -> None:
    if not ok:
        raise ConfigError(msg)
