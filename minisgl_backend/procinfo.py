"""Facts about live processes read from /proc (Linux): children, command lines, CPU time,
resident memory. Used by the supervisor, the tritonserver launcher, tests and benchmarks."""

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


def children(pid: int) -> list[int]:
    """Live (not zombie) children of `pid`."""
    out = []
    for child in pids():
        fields = stat_fields(child)
        if fields and fields[0] != "Z" and int(fields[1]) == pid:
            out.append(child)
    return out


def group_members(pgid: int) -> list[int]:
    """Live processes of process group `pgid`."""
    out = []
    for pid in pids():
        fields = stat_fields(pid)
        if fields and fields[0] != "Z" and int(fields[2]) == pgid:
            out.append(pid)
    return out


def alive(pid: int) -> bool:
    fields = stat_fields(pid)
    return fields is not None and fields[0] != "Z"


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def command_name(pid: int) -> str | None:
    """The kernel's name of `pid`'s program (/proc/PID/comm: at most 15 characters), or None."""
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return None


def thread_ids(pid: int) -> list[int]:
    """The ids of `pid`'s threads ([] when the process is gone)."""
    try:
        return [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return []


def thread_cores(pid: int) -> dict[int, tuple[int, ...]]:
    """The cores each live thread of `pid` may run on ({} when the process is gone)."""
    out = {}
    for tid in thread_ids(pid):
        try:
            out[tid] = tuple(sorted(os.sched_getaffinity(tid)))
        except OSError:
            continue
    return out


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
