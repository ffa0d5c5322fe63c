"""Facts about live processes read from /proc (Linux) that the server itself needs: the `make
serve` supervisor finds its children and their command lines here. Tests and benchmarks read
more (`minisgl_backend.testing.procinfo`)."""

from __future__ import annotations

import os


def stat_fields(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (state first), or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2:].split()


def pids() -> list[int]:
    return [int(e) for e in os.listdir("/proc") if e.isdigit()]


def live_processes_with(field: int, value: int) -> list[int]:
    """Live (not zombie) processes whose stat field `field` (1: parent, 2: process group) is `value`."""
    out = []
    for pid in pids():
        fields = stat_fields(pid)
        if fields and fields[0] != "Z" and int(fields[field]) == value:
            out.append(pid)
    return out


def children(pid: int) -> list[int]:
    """Live children of `pid`."""
    return live_processes_with(1, pid)


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""
