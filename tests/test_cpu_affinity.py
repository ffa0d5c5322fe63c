"""Core lists, their share-out among the ranks, and pinning (Linux): the `cpu_cores` setting."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from minisgl_backend.config import ConfigError, EngineConfig
from minisgl_backend.cpu_affinity import parse_cpu_list, pin_process, rank_cores


def allowed_cores() -> tuple[int, ...]:
    return tuple(sorted(os.sched_getaffinity(0)))


def cpu_list(cores: tuple[int, ...]) -> str:
    return ",".join(str(c) for c in cores)


def thread_cores(pid: int) -> set[tuple[int, ...]]:
    """The distinct core sets of process `pid`'s threads."""
    return {tuple(sorted(os.sched_getaffinity(int(tid)))) for tid in os.listdir(f"/proc/{pid}/task")}


@pytest.mark.parametrize("text,cores", [("0-3,8", (0, 1, 2, 3, 8)), ("3,1,1", (1, 3)), (" 2 - 4 ", (2, 3, 4)),
                                        ("7", (7,))])
def test_parse_cpu_list(text, cores):
    assert parse_cpu_list(text) == cores
    assert parse_cpu_list(cpu_list(cores)) == cores


@pytest.mark.parametrize("text,words", [("a", "'a'"), ("3-1", "backwards"), ("1-", "'1-'"), ("0,,1", "''"),
                                        ("-2", "'-2'")])
def test_parse_cpu_list_names_the_bad_part(text, words):
    with pytest.raises(ValueError, match=words):
        parse_cpu_list(text)


def test_rank_cores_share_out_in_order():
    cores = (0, 1, 2, 3, 4)
    assert [rank_cores(cores, r, 2) for r in range(2)] == [(0, 1, 2), (3, 4)]
    assert [rank_cores(cores, r, 5) for r in range(5)] == [(c,) for c in cores]
    assert rank_cores((4, 6), 0, 1) == (4, 6)


def test_cpu_cores_setting_is_validated(tiny_llama):
    assert EngineConfig.from_flat(model_path=tiny_llama, cpu_cores="0-1,3").parallel.cpu_cores == "0-1,3"
    with pytest.raises(ConfigError, match="cpu_cores: 'x'"):
        EngineConfig.from_flat(model_path=tiny_llama, cpu_cores="x")
    with pytest.raises(ConfigError, match="1 cores for 2 ranks"):
        EngineConfig.from_flat(model_path=tiny_llama, cpu_cores="0", tp_size=2)


def test_pin_process_moves_every_thread_and_later_ones_follow():
    target = allowed_cores()[-1]
    child = subprocess.Popen([sys.executable, "-c", textwrap.dedent("""
        import sys, threading, time
        threading.Thread(target=time.sleep, args=(30,), daemon=True).start()
        print("up", flush=True)
        sys.stdin.readline()  # pinned: start one more thread and report its cores
        import os
        cores = []
        t = threading.Thread(target=lambda: cores.append(os.sched_getaffinity(0)))
        t.start(); t.join()
        print(sorted(cores[0]), flush=True)
    """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "up"
        assert pin_process(child.pid, (target,)) >= 2
        assert thread_cores(child.pid) == {(target,)}
        child.stdin.write("\n")
        child.stdin.flush()
        assert child.stdout.readline().strip() == f"[{target}]"
    finally:
        child.kill()
        child.wait()
    assert pin_process(child.pid, (target,)) == 0  # a process that is gone: nothing to pin


def test_rank_pins_its_own_process_to_its_share(tiny_llama):
    """build_scheduler's first step, in a process of its own (it pins the whole process)."""
    cores = allowed_cores()
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(f"""
        import os
        from minisgl_backend.config import EngineConfig
        from minisgl_backend.rank import _pin_rank
        config = EngineConfig.from_flat(model_path="{tiny_llama}", cpu_cores="{cpu_list(cores)}",
                                        tp_size={min(2, len(cores))})
        print(_pin_rank(config, 0), sorted(os.sched_getaffinity(0)))
        print(_pin_rank(EngineConfig.from_flat(model_path="{tiny_llama}"), 0))
    """)], capture_output=True, text=True, check=True, timeout=120).stdout.splitlines()
    share = rank_cores(cores, 0, min(2, len(cores)))
    assert out == [f"{share} {list(share)}", "()"]
