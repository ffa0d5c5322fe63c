"""Which CPU cores the engine's ranks and the serving layer run on (Linux).

On a CPU host the engine computes on the cores that tritonserver and its Python-backend stub also
use to move requests and responses. Left to the OS, their threads land on the core of a rank's
compute thread and preempt it: at 256 streams on 2 cores the scheduler ran 83-87 % of the wall
time though the machine was a quarter idle. With the rank on a core of its own and tritonserver +
the stub on the other (the adapter's `cpu_affinity=auto`), it runs 89-94 % of the time and the
served rate rises from 39-47k to 47-50k tokens/s (`benchmarks/serving_overhead.py
--skip-in-process`, perf_analyzer as the client, alternating runs; 64 streams: no change).
It is a trade, so it is off by default: the pinned serving layer must fit its cores. With the
OpenAI frontend and its clients on the same 2 cores as well, the frontend's rate fell from 0.86 to
0.61-0.75 of direct gRPC's (`benchmarks/openai_frontend.py`), and from that to 0.45-0.48 with the
frontend pinned beside tritonserver.

A core list is Linux's notation: "0-3,8" is cores 0, 1, 2, 3 and 8.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from minisgl_backend.procinfo import command_name, thread_ids


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


def format_cpu_list(cores: tuple[int, ...] | list[int]) -> str:
    return ",".join(str(c) for c in sorted(cores))


def rank_cores(cores: tuple[int, ...], rank: int, tp_size: int) -> tuple[int, ...]:
    """Rank `rank`'s even share of `cores` (in order; the first ranks take one more when they do
    not divide)."""
    share, extra = divmod(len(cores), tp_size)
    start = rank * share + min(rank, extra)
    return cores[start:start + share + (1 if rank < extra else 0)]


@dataclass(frozen=True)
class CoreSplit:
    engine: tuple[int, ...]  # the ranks' cores, shared out by `rank_cores`
    serving: tuple[int, ...]  # tritonserver's and the stub's


def split_cores(available: tuple[int, ...], cpu_cores: str, engine_cores: int) -> CoreSplit | None:
    """The engine's cores (`cpu_cores` where set, else the last `engine_cores` of `available`)
    and the serving layer's (the rest of `available`); None when that leaves the serving layer
    nothing."""
    if cpu_cores:
        engine = parse_cpu_list(cpu_cores)
        serving = tuple(c for c in available if c not in engine)
        return CoreSplit(engine, serving) if serving else None
    if engine_cores < 1 or engine_cores >= len(available):
        return None
    return CoreSplit(engine=available[-engine_cores:], serving=available[:-engine_cores])


def allowed_cores(pid: int = 0) -> tuple[int, ...]:
    return tuple(sorted(os.sched_getaffinity(pid)))


def pin_process(pid: int, cores: tuple[int, ...]) -> int:
    """Every thread of process `pid` onto `cores` (a thread's children inherit its cores, so the
    threads it starts later follow). Returns how many threads were pinned; threads that end
    meanwhile are skipped."""
    pinned = 0
    for tid in thread_ids(pid):
        try:
            os.sched_setaffinity(tid, cores)
            pinned += 1
        except ProcessLookupError:
            continue
    return pinned


def serving_processes() -> list[int]:
    """This process and its parent when they are a Triton Python-backend stub and its
    tritonserver (never a test runner or a shell that happens to host the adapter)."""
    me = os.getpid()
    if not (command_name(me) or "").startswith("triton_python"):
        return []
    parent = os.getppid()
    return [me, parent] if command_name(parent) == "tritonserver" else [me]
