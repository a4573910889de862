"""sft/data/prefetch.py: same items in the same order, errors raised where their item is asked for,
the thread stopped when the loop is left early, never more than one item read ahead."""

import threading
import time
import traceback
from contextlib import closing

import pytest

from sft.data.prefetch import BuildWindow, prefetched


def _workers() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "sft-prefetch"]


def test_same_items_same_order():
    assert list(prefetched(iter(range(50)))) == list(range(50))
    assert not _workers()


def test_error_raised_at_its_item():
    def items():
        yield 1
        yield 2
        raise ValueError("row 7 of train.parquet: no assistant turn")

    got = []
    with pytest.raises(ValueError, match="row 7 of train.parquet"):
        for x in prefetched(items()):
            got.append(x)
    assert got == [1, 2]
    assert not _workers()


def test_reads_one_step_ahead_and_stops_on_early_exit():
    read = []

    def items():
        for i in range(100):
            read.append(i)
            yield i

    with closing(prefetched(items())) as steps:
        for x in steps:
            time.sleep(0.05)  # the consumer is slower: the producer waits with one item ready
            assert len(read) <= x + 3  # the item in hand, one queued, one being put
            if x == 4:
                break
    assert not _workers()
    assert len(read) <= 7  # nothing read far past the exit


def test_with_a_window_builds_only_when_opened_or_asked():
    """The training thread opens the window while it waits on the device; between openings the thread
    builds nothing, so it does not hold the GIL while the training thread launches work."""
    read = []

    def items():
        for i in range(5):
            read.append(i)
            yield i

    window = BuildWindow()
    steps = prefetched(items(), window=window)
    assert next(steps) == 0  # asked for and not built: built on demand
    time.sleep(0.3)
    assert read == [0]  # no read-ahead while the window is shut
    window.open()
    time.sleep(0.3)
    assert read == [0, 1]  # one item per opening
    assert next(steps) == 1 and read == [0, 1]
    assert list(steps) == [2, 3, 4]  # the rest on demand, in order, to the end
    assert not _workers()


def test_builds_that_outlast_the_window_hold_it_open():
    """A slow dataset: each build outlasts the window, so after LATE_BUILDS_TO_HOLD late ones in a row the
    thread builds ahead without openings, as it would without a window."""
    from sft.data.prefetch import LATE_BUILDS_TO_HOLD

    read = []

    def items():
        for i in range(12):
            time.sleep(0.15)  # the build
            read.append(i)
            yield i

    window = BuildWindow()
    steps = prefetched(items(), window=window)
    with closing(steps):
        for i in range(LATE_BUILDS_TO_HOLD):  # the first is asked for before any window: not late
            assert next(steps) == i
            assert not window.held_open
            window.open()  # the read-back: the next build starts, and is still running when it is asked for
        assert next(steps) == LATE_BUILDS_TO_HOLD and window.held_open
        time.sleep(0.6)  # no opening: the thread still builds the next one ahead
        assert len(read) >= LATE_BUILDS_TO_HOLD + 2
        assert list(steps) == list(range(LATE_BUILDS_TO_HOLD + 1, 12))
    assert not _workers()


def test_short_late_builds_keep_the_window(monkeypatch):
    """A build a little late costs less than building during the launches: waits under LATE_WAIT_S
    (here raised above the build time) never hold the window open."""
    import sft.data.prefetch as prefetch

    monkeypatch.setattr(prefetch, "LATE_WAIT_S", 1.0)

    def items():
        for i in range(8):
            time.sleep(0.15)
            yield i

    window = BuildWindow()
    with closing(prefetched(items(), window=window)) as steps:
        for i in range(7):
            assert next(steps) == i
            window.open()
        assert not window.held_open


def test_trainer_builds_steps_on_the_prefetch_thread(demo_dir, tmp_path, single_rank):
    """fit() asks the background thread for its steps: each is built off the training thread."""
    from conftest import base_overrides

    from sft.config.schema import load_config
    from sft.trainer import FSDPSFTTrainer

    overrides = base_overrides(demo_dir, tmp_path) + [
        "use_remove_padding=true",
        "data.train_batch_size=8",
        "trainer.total_training_steps=3",
    ]
    trainer = FSDPSFTTrainer(load_config(overrides), single_rank("cpu"))
    built_on = []
    build = trainer.loader.dataset.build
    original = build.__call__

    class Recording(type(build)):
        def __call__(self, indices):
            built_on.append(threading.current_thread().name)
            return original(indices)

    build.__class__ = Recording
    openings = []  # the function that opened the window, each time
    open_window = trainer.build_window.open

    def recording_open():
        openings.append(traceback.extract_stack()[-2].name)
        open_window()

    trainer.build_window.open = recording_open
    trainer.fit()
    assert built_on and set(built_on) == {"sft-prefetch"}
    # The first step is asked for before anything is built; each step then opens the window at its read-back.
    assert openings == ["asked", "train_step", "train_step", "train_step"]
    assert trainer.state.global_step == 3
    assert not _workers()


def test_short_gil_switches_while_a_prefetch_thread_runs():
    """The training thread takes the GIL back after each torch op it launches; a 5 ms switch interval
    beside a Python-busy builder made each take-back slow (sft/data/prefetch.py)."""
    import sys

    from sft.data.prefetch import SWITCH_INTERVAL_S

    before = sys.getswitchinterval()
    assert before > SWITCH_INTERVAL_S  # Python's default, 5 ms
    outer = prefetched(range(3))
    assert next(outer) == 0 and sys.getswitchinterval() == SWITCH_INTERVAL_S
    assert list(prefetched(range(2))) == [0, 1]  # a second one ending leaves the first one's setting
    assert sys.getswitchinterval() == SWITCH_INTERVAL_S
    outer.close()  # leaving early
    assert sys.getswitchinterval() == before
    assert list(prefetched(range(2))) == [0, 1] and sys.getswitchinterval() == before  # run to the end
