"""Other nodes of a multi-node group, for tests and benchmarks: `python -m minisgl_backend.node`
as a process tree of its own (a new session), reaching node 0 only through TCP."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from minisgl_backend.testing.procinfo import group_members


class NodeProcess:
    """One node (node_rank >= 1): its process and, below it, its scheduler processes."""

    def __init__(self, model: str, node_rank: int, nnodes: int, dist_init_addr: str, node_addr: str,
                 settings: dict[str, object], log_path: str | os.PathLike) -> None:
        self.node_rank = node_rank
        self.log_path = Path(log_path)
        cmd = [sys.executable, "-m", "minisgl_backend.node", "--node-rank", str(node_rank), "--nnodes", str(nnodes),
               "--dist-init-addr", dist_init_addr, "--model", model, f"node_addr={node_addr}",
               *(f"{k}={v}" for k, v in settings.items())]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        self.pgid = self.proc.pid

    def members(self) -> list[int]:
        """Live processes of this node's tree (the node process and its ranks)."""
        return group_members(self.pgid)

    def signal(self, sig: int) -> None:
        try:
            os.killpg(self.pgid, sig)
        except ProcessLookupError:
            pass

    def wait(self, timeout: float) -> int | None:
        """The node process's exit code, or None if it still runs after `timeout`."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def wait_gone(self, timeout: float) -> list[int]:
        """Wait until nothing of the tree is left; returns the pids still alive after `timeout`."""
        deadline = time.monotonic() + timeout
        self.wait(timeout)
        while (left := self.members()) and time.monotonic() < deadline:
            time.sleep(0.1)
        return left

    def stop(self) -> None:
        """SIGKILL whatever of the tree is left (a test's clean-up)."""
        self.signal(signal.SIGCONT)
        self.signal(signal.SIGKILL)
        self.wait(10)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""
