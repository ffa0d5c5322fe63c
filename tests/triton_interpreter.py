"""Run a script under Triton's interpreter (TRITON_INTERPRET=1 must be set before triton is
imported, hence a fresh process): the CUDA kernels' code on CPU tensors, on machines without a GPU."""

from __future__ import annotations

import os
import subprocess
import sys

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)


def run_interpreted(script: str, timeout: float = 600) -> str:
    """Run `script` with the repository root as working directory; its stdout, or a failure
    that shows the end of its stderr."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout
