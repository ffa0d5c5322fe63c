"""/proc facts that only tests and benchmarks read (Linux): process groups, liveness, CPU time,
resident memory. The supervisor's own helpers are in `minisgl_backend.procinfo`."""

from __future__ import annotations

import os

from minisgl_backend.procinfo import live_processes_with, stat_fields


def group_members(pgid: int) -> list[int]:
    """Live processes of process group `pgid`."""
    return live_processes_with(2, pgid)


def alive(pid: int) -> bool:
    fields = stat_fields(pid)
    return fields is not None and fields[0] != "Z"


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of `pid` so far (0 when it is gone)."""
    fields = stat_fields(pid)
    if fields is None:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_bytes(pid: int) -> int:
    """Resident memory of `pid` (0 when it is gone)."""
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, IndexError, ValueError):
        return 0


def is_alive(pid: int, start: str) -> bool:
    """Alive and not a zombie, and still the same process (pid reuse: same start time)."""
    fields = stat_fields(pid)
    return fields is not None and fields[0] != "Z" and fields[19] == start


def descendants(root: int) -> list[tuple[int, str, str]]:
    """(pid, start time, command line) of every live process below `root`."""
    children: dict[int, list[int]] = {}
    starts: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (fields := stat_fields(int(entry))) is not None and fields[0] != "Z":
            children.setdefault(int(fields[1]), []).append(int(entry))
            starts[int(entry)] = fields[19]
    found, todo = [], list(children.get(root, []))
    while todo:
        pid = todo.pop()
        todo.extend(children.get(pid, []))
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")[:300]
        except OSError:
            continue
        found.append((pid, starts[pid], cmd))
    return found

