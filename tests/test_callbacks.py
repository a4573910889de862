"""Step callbacks (sft/loop/callbacks.py): every rank's callbacks get every step's logged metrics,
and `SFT_CALLBACKS` loads factories by name, failing with a message that says what to fix."""

from __future__ import annotations

import pytest
import torch
from conftest import base_overrides
from distributed_helper import run_ranks
from workers import RecordingCallback, train_with_callbacks

from sft.loop.callbacks import CALLBACKS_ENV, StepCallback, callback_factories, make_callbacks

NOT_A_CALLBACK = object()


def load_callbacks(trainer, spec: str | None = None) -> list:
    """What the trainer does with `SFT_CALLBACKS` (or `spec`): import the factories, then call them."""
    return make_callbacks(callback_factories(spec), trainer)


def not_a_callback(trainer) -> object:
    return NOT_A_CALLBACK


def test_a_callback_gets_every_steps_metrics_on_every_rank(demo_dir, tmp_path):
    overrides = base_overrides(demo_dir, tmp_path / "out") + [
        "data.train_batch_size=8",
        "data.micro_batch_size_per_gpu=2",
        "trainer.total_training_steps=3",
    ]
    run_ranks(train_with_callbacks, 2, overrides, str(tmp_path / "seen"))
    ranks = [torch.load(tmp_path / f"seen.rank{r}.pt", weights_only=False) for r in range(2)]
    for got in ranks:
        assert [step for step, _ in got["logged"]] == [1, 2, 3]
        # Constructor, add_callback and SFT_CALLBACKS: each saw exactly what the metrics logger was given.
        assert got["given"] == got["from_env"] == got["added"] == got["logged"]
        assert all("train/loss" in m and "train/tokens_per_s_per_gpu" in m for _, m in got["given"])
    for (_, m0), (_, m1) in zip(ranks[0]["given"], ranks[1]["given"], strict=True):  # the same global values
        for key in ("train/loss", "train/grad_norm", "train/trained_tokens", "train/lr"):
            assert m0[key] == m1[key], key


def test_load_callbacks_by_name(monkeypatch):
    monkeypatch.setenv(CALLBACKS_ENV, " workers:recording_callback,,workers:no_callback ")
    got = load_callbacks(_trainer())
    assert len(got) == 1 and type(got[0]) is RecordingCallback and isinstance(got[0], StepCallback)
    monkeypatch.delenv(CALLBACKS_ENV)
    assert load_callbacks(_trainer()) == []


def _trainer():
    from sft.trainer import FSDPSFTTrainer

    return FSDPSFTTrainer.__new__(FSDPSFTTrainer)  # the factories only check its type


@pytest.mark.parametrize(
    "entry,says",
    [
        ("workers.recording_callback", "is not of the form module:factory"),
        ("no_such_module_xyz:make", "cannot import 'no_such_module_xyz'"),
        ("workers:no_such_factory", "workers has no attribute 'no_such_factory'"),
        ("test_callbacks:NOT_A_CALLBACK", "is not callable"),
        ("test_callbacks:not_a_callback", "returned object, which has no on_step_end"),
    ],
)
def test_a_bad_entry_says_which_and_how_to_fix(entry, says):
    with pytest.raises(ValueError) as err:
        load_callbacks(_trainer(), f"workers:no_callback,{entry}")
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{CALLBACKS_ENV}: {entry!r}") and says in message
    if "returned" not in says:
        assert "module:factory" in message  # the fix: the form the variable takes


def test_a_bad_name_fails_before_the_trainer_loads_anything(demo_dir, tmp_path, monkeypatch):
    from sft import trainer as trainer_module
    from sft.config.schema import load_config

    monkeypatch.setattr(trainer_module, "load_tokenizer", lambda cfg: pytest.fail("loading began"))
    monkeypatch.setenv(CALLBACKS_ENV, "workers:no_such_factory")
    with pytest.raises(ValueError, match="SFT_CALLBACKS: 'workers:no_such_factory'"):
        trainer_module.FSDPSFTTrainer(load_config(base_overrides(demo_dir, tmp_path)), ctx=None)
