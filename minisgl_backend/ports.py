"""Free TCP ports on the loopback interface (TP rendezvous, test and benchmark servers), and the
readiness probe of the HTTP servers started on them."""

from __future__ import annotations

import socket
import urllib.request


def free_ports(n: int) -> list[int]:
    """`n` distinct ports that were free a moment ago (all bound at once, then released)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port() -> int:
    return free_ports(1)[0]


def port_is_free(port: int) -> bool:
    """Whether a server could listen on `port` on every interface now (as tritonserver does)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("0.0.0.0", port))
            return True
        except OSError:
            return False


def answers_ok(url: str, timeout: float = 2.0) -> bool:
    """Whether a GET of `url` answers 200 now (a refused or failed connection: False)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status == 200
    except OSError:  # URLError, HTTPError (non-2xx), refused, reset, timeout
        return False


if __name__ == "__main__":  # `python -m minisgl_backend.ports N` prints N free ports (shell scripts)
    import sys

    print(*free_ports(int(sys.argv[1]) if len(sys.argv) > 1 else 1))
