"""The preemption watchdog: after SIGTERM, a process that cannot finish within
trainer.preempt_grace_s exits with the documented code anyway."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time


def test_watchdog_exits_with_143_after_the_grace_time():
    code = textwrap.dedent(
        """
        import os, signal, time, torch
        from sft.parallel.distributed import init_distributed
        from sft.loop.preemption import PreemptionWatcher
        ctx = init_distributed("cpu", 1)
        w = PreemptionWatcher(ctx.world_group, ctx.device, grace_s=0.5)
        assert not w.requested()
        os.kill(os.getpid(), signal.SIGTERM)
        assert w.requested()  # the flag is seen at the next step boundary...
        time.sleep(30)        # ...but this "step" never ends: the watchdog must end the process
        """
    )
    start = time.time()
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 143, r.stderr[-2000:]
    assert time.time() - start < 25
    assert "preempt_grace_s=0.5 passed" in r.stderr
