"""Command-line plumbing shared by the trainer and the tools: compose, validate, run, tear down.

Configuration problems become one line on stderr (`sft: config error: ...`, exit code 2)
before any model or data is loaded; errors in the user's data become `sft: data error: ...`
(exit code 3). Everything else is a real bug and keeps its traceback.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable

from hydra.errors import HydraException
from omegaconf.errors import (
    ConfigAttributeError,
    ConfigKeyError,
    MissingMandatoryValue,
    OmegaConfBaseException,
    ValidationError,
)

from sft.config.checks import validate_config
from sft.config.errors import ConfigError, one_line
from sft.config.schema import SFTConfig, load_config, to_dict
from sft.loop.preemption import EXIT_CODE as PREEMPTED_EXIT_CODE
from sft.loop.preemption import Preempted
from sft.parallel.distributed import WorldInfo, init_distributed, resolve_device_type, setup_logging, teardown

logger = logging.getLogger("sft")

USAGE = """usage: torchrun --nproc_per_node=N -m sft.fsdp_sft_trainer key=value [key=value ...]
       python -m sft.fsdp_sft_trainer --cfg [job] key=value ...   (print the composed config and exit)
       torchrun ... -m sft.sft_trainer key=value ...   (verl >= 0.7.1 key layout: model.path, engine.*, ...)
Keys and defaults: sft/config/sft_trainer.yaml; README.md "Configuration reference"."""


class TrainingError(RuntimeError):
    """Training cannot go on for a reason the user can act on (e.g. a non-finite loss)."""


def _root_cause(exc: BaseException) -> BaseException:
    while exc.__cause__ is not None:
        exc = exc.__cause__
    return exc


def explain_compose_error(exc: BaseException, overrides: list[str]) -> str:
    """One line from Hydra/OmegaConf's nested exceptions, naming the key and the fix."""
    cause = _root_cause(exc)
    key = getattr(cause, "full_key", None) or ""
    if isinstance(cause, MissingMandatoryValue):
        return f"{key} is required: pass {key}=..."
    if isinstance(cause, (ConfigKeyError, ConfigAttributeError)):
        bad = [o for o in overrides if o.lstrip("+~").split("=", 1)[0].endswith(key.split(".")[-1])] if key else []
        where = f" (from {bad[0]})" if bad else ""
        return f"unknown config key '{key}'{where}: it is not in sft/config/sft_trainer.yaml; check the spelling"
    if isinstance(cause, ValidationError):
        first = str(cause).splitlines()[0]
        return f"{key}: {first}; give a value of the type shown in sft/config/sft_trainer.yaml"
    return one_line(exc)


def compose(overrides: list[str]) -> SFTConfig:
    try:
        return load_config(overrides)
    except (HydraException, OmegaConfBaseException) as exc:
        raise ConfigError(explain_compose_error(exc, overrides)) from exc
    except ValueError as exc:  # keys appended with `+` beyond the schema
        raise ConfigError(str(exc)) from exc


Translate = Callable[[list[str]], tuple[list[str], list[str]]]


def run_cli(argv: list[str], fn: Callable[[SFTConfig, object], None], translate: Translate | None = None) -> int:
    """`translate` maps another command-line layout onto ours first (sft.sft_trainer: verl >= 0.7.1)."""
    if argv and argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    show_cfg = bool(argv) and argv[0] == "--cfg"
    overrides = argv[1:] if show_cfg else argv
    if show_cfg and overrides[:1] in (["job"], ["all"]):  # Hydra's spelling (`--cfg job`), as verl users type it
        overrides = overrides[1:]
    world = WorldInfo.from_env()
    notes: list[str] = []
    try:
        if translate is not None:
            overrides, notes = translate(overrides)
        cfg = compose(overrides)
        if show_cfg:
            from omegaconf import OmegaConf

            print(OmegaConf.to_yaml(to_dict(cfg)))
            return 0
        validate_config(cfg, world)
        device_type = resolve_device_type(cfg.trainer.device)
    except ValueError as exc:
        if world.rank == 0:
            print(f"sft: config error: {exc}", file=sys.stderr)
        return _after_rank0_printed(2, world.rank)
    setup_logging(world.rank)
    for note in notes:
        logger.info("%s", note)
    _quiet_libraries()
    ctx = init_distributed(device_type, cfg.ulysses_sequence_parallel_size, cfg.trainer.dist_timeout_s)
    try:
        fn(cfg, ctx)
    except Preempted as exc:
        logger.warning("%s", exc)
        return PREEMPTED_EXIT_CODE
    except (ValueError, TrainingError) as exc:  # found while loading data/model or training: one line
        if world.rank == 0 or isinstance(exc, TrainingError):
            print(f"sft: error: {exc}", file=sys.stderr)
        logger.debug("traceback", exc_info=True)
        return 3 if isinstance(exc, TrainingError) else _after_rank0_printed(3, world.rank)
    finally:
        teardown()
    return 0


# torchrun stops every worker as soon as the first one exits: the ranks that do not print the
# one-line error wait this long, so that rank 0 has written it before it can be stopped.
ERROR_EXIT_DELAY_S = 2.0


def _after_rank0_printed(code: int, rank: int) -> int:
    if rank != 0:
        time.sleep(ERROR_EXIT_DELAY_S)
    return code


def _quiet_libraries() -> None:
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
