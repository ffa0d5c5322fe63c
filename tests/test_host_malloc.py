"""A CPU engine keeps freed memory in the process (glibc mallopt), so a step's temporaries are
not page-faulted in again every step; without it glibc gives a freed 24 MB block straight back."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

PROBE = textwrap.dedent("""
    import json, os, sys, tempfile
    import torch
    sys.path.insert(0, {root!r})
    if {with_engine}:
        from minisgl_backend import LLM
        from minisgl_backend.tools.make_tiny_model import make_tiny_model
        LLM(make_tiny_model(tempfile.mkdtemp(), arch="llama", hidden_size=32, num_layers=1, num_heads=2,
                            num_kv_heads=1, intermediate_size=64), device="cpu", max_total_tokens=256)
    def rss_mib():
        return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    before = rss_mib()
    block = torch.ones(24 << 20, dtype=torch.uint8)
    del block
    print(json.dumps({{"kept_mib": rss_mib() - before}}))
""")


def kept_after_free(with_engine: bool) -> float:
    code = PROBE.format(root=str(ROOT), with_engine=with_engine)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])["kept_mib"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc and /proc: Linux only")
def test_cpu_engine_keeps_freed_memory():
    assert kept_after_free(with_engine=False) < 8  # glibc's default: the block goes back to the OS
    assert kept_after_free(with_engine=True) > 20  # a CPU engine was built: the block stays
