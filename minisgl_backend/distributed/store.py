"""The TCP key-value store a group meets at: served by node 0's frontend at `dist_init_addr`
(or 127.0.0.1 and a free port on one node), reached by every rank and every other node.

It carries the torch.distributed rendezvous (under `minisgl/tp/`), the node handshake and
heartbeats (`cluster.py`) and the rank-0 relay endpoints (`scheduler/io.py`).
"""

from __future__ import annotations

import socket
import time
from datetime import timedelta

import torch.distributed as dist

PREFIX = "minisgl/"
_PROBE_INTERVAL_S = 0.5


def key(*parts: object) -> str:
    return PREFIX + "/".join(str(p) for p in parts)


def serve_store(host: str, port: int, timeout_s: float) -> dist.TCPStore:
    """The store's server (node 0's frontend); `port` 0 picks a free one (then see `.port`)."""
    try:
        return dist.TCPStore(host, port, None, True, timedelta(seconds=timeout_s), wait_for_workers=False)
    except Exception as exc:
        raise RuntimeError(f"cannot serve the group's store on port {port} (dist_init_addr {host}:{port}): "
                           f"{_first_line(exc)}") from None


def connect_store(host: str, port: int, timeout_s: float) -> dist.TCPStore:
    """A client of the store at host:port, waiting up to `timeout_s` for it to come up (a node may
    start before node 0). The wait probes with plain TCP connects, so that torch's own retries do
    not log a stack trace each time."""
    deadline = time.monotonic() + timeout_s
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"node 0's store at {host}:{port} did not answer within {timeout_s:g} s "
                               "(is node 0 started, and dist_init_addr its address?)")
        try:
            socket.create_connection((host, port), timeout=min(remaining, 2.0)).close()
            break
        except OSError:
            time.sleep(min(_PROBE_INTERVAL_S, max(deadline - time.monotonic(), 0)))
    return dist.TCPStore(host, port, None, False, timedelta(seconds=timeout_s), wait_for_workers=False)


def read(store: dist.Store, name: str) -> str | None:
    """The value at `name` now, or None when it is not set (never waits)."""
    if not store.check([name]):
        return None
    return store.get(name).decode()


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
