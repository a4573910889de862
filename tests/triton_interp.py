"""sft's Triton kernels under Triton's interpreter, on CPU, in a subprocess of the test.

Triton comes from the main environment where it has one (CUDA hosts). On CPU machines scripts/test.sh puts
it in a side folder (`pip install --target .cache/triton-interpreter`), which goes on the subprocess's
PYTHONPATH only: the main environment stays as users install it, without triton, so the CPU code paths the
other tests check are the ones users run. The interpreter is chosen when a kernel is defined, hence the
subprocess with TRITON_INTERPRET=1.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

SIDE = Path(__file__).resolve().parents[1] / ".cache" / "triton-interpreter"


def available() -> bool:
    return importlib.util.find_spec("triton") is not None or (SIDE / "triton").is_dir()


def env() -> dict[str, str]:
    """The subprocess's environment: the interpreter on, and the side folder first on its path when used."""
    out = dict(os.environ, TRITON_INTERPRET="1")
    if importlib.util.find_spec("triton") is None:
        out["PYTHONPATH"] = os.pathsep.join(p for p in (str(SIDE), out.get("PYTHONPATH", "")) if p)
    return out


needs_triton = pytest.mark.skipif(
    not available(),
    reason="triton is neither installed nor in .cache/triton-interpreter (scripts/test.sh puts it there)",
)
