"""Pinning the engine's ranks to CPU cores (the `cpu_cores` setting; Linux).

`cpu_cores` lists the cores the ranks may use; each rank takes an even share of them, in order
(`rank_cores`), and pins every thread of its process to that share (`pin_process`).

A core list is Linux's notation: "0-3,8" is cores 0, 1, 2, 3 and 8.
"""

from __future__ import annotations

import os


def parse_cpu_list(text: str) -> tuple[int, ...]:
    """"0-3,8" -> (0, 1, 2, 3, 8): sorted, no repeats; ValueError naming the bad part."""
    cores: set[int] = set()
    for part in text.replace(" ", "").split(","):
        first, dash, last = part.partition("-")
        if not first.isdigit() or (dash and not last.isdigit()):
            raise ValueError(f"'{part}' in '{text}' is not a core number or a range such as 0-3")
        lo, hi = int(first), int(last) if dash else int(first)
        if hi < lo:
            raise ValueError(f"the range '{part}' in '{text}' runs backwards")
        cores.update(range(lo, hi + 1))
    return tuple(sorted(cores))


def rank_cores(cores: tuple[int, ...], rank: int, tp_size: int) -> tuple[int, ...]:
    """Rank `rank`'s even share of `cores` (in order; the first ranks take one more when they do
    not divide)."""
    share, extra = divmod(len(cores), tp_size)
    start = rank * share + min(rank, extra)
    return cores[start:start + share + (1 if rank < extra else 0)]


def pin_process(pid: int, cores: tuple[int, ...]) -> int:
    """Every thread of process `pid` onto `cores` (a thread's children inherit its cores, so the
    threads it starts later follow). Returns how many threads were pinned; threads that end
    meanwhile are skipped, and a process that is gone has none."""
    try:
        thread_ids = [int(tid) for tid in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return 0
    pinned = 0
    for tid in thread_ids:
        try:
            os.sched_setaffinity(tid, cores)
            pinned += 1
        except ProcessLookupError:
            continue
    return pinned
