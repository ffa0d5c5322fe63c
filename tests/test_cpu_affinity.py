"""Core lists, their split between the engine and the serving layer, and pinning (Linux)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest

from minisgl_backend.config import ConfigError, EngineConfig
from minisgl_backend.cpu_affinity import (CoreSplit, allowed_cores, format_cpu_list, parse_cpu_list, pin_process,
                                          rank_cores, serving_processes, split_cores)
from minisgl_backend.procinfo import thread_cores
from minisgl_backend.triton.adapter import TritonAdapter


@pytest.mark.parametrize("text,cores", [("0-3,8", (0, 1, 2, 3, 8)), ("3,1,1", (1, 3)), (" 2 - 4 ", (2, 3, 4)),
                                        ("7", (7,))])
def test_parse_cpu_list(text, cores):
    assert parse_cpu_list(text) == cores
    assert parse_cpu_list(format_cpu_list(cores)) == cores


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


def test_split_cores_keeps_a_core_for_the_serving_layer():
    assert split_cores((0, 1), "", 1) == CoreSplit(engine=(1,), serving=(0,))
    assert split_cores(tuple(range(16)), "", 14) == CoreSplit(engine=tuple(range(2, 16)), serving=(0, 1))
    assert split_cores((0,), "", 1) is None  # nothing left for the serving layer: no pinning
    assert split_cores((0, 1), "", 2) is None and split_cores((0, 1), "", 0) is None
    assert split_cores((0, 1, 2), "0", 1) == CoreSplit(engine=(0,), serving=(1, 2))  # cpu_cores wins
    assert split_cores((0, 1), "0-1", 1) is None


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
        assert set(thread_cores(child.pid).values()) == {(target,)}
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
        config = EngineConfig.from_flat(model_path="{tiny_llama}", cpu_cores="{format_cpu_list(cores)}",
                                        tp_size={min(2, len(cores))})
        print(_pin_rank(config, 0), sorted(os.sched_getaffinity(0)))
        print(_pin_rank(EngineConfig.from_flat(model_path="{tiny_llama}"), 0))
    """)], capture_output=True, text=True, check=True, timeout=120).stdout.splitlines()
    share = rank_cores(cores, 0, min(2, len(cores)))
    assert out == [f"{share} {list(share)}", "()"]


def test_no_serving_processes_outside_tritonserver():
    assert serving_processes() == []  # pytest is no Python-backend stub: nothing of it is pinned


def test_adapter_splits_only_when_asked_for_a_cpu_engine_under_triton(monkeypatch):
    from minisgl_backend.triton import adapter as adapter_module

    config = SimpleNamespace(device="cpu", parallel=SimpleNamespace(cpu_threads=1, tp_size=1, cpu_cores=""))
    with pytest.raises(ValueError, match="cpu_affinity must be auto or off"):
        TritonAdapter._core_split("on", config)
    assert TritonAdapter._core_split("auto", config) is None  # not inside tritonserver
    monkeypatch.setattr(adapter_module, "serving_processes", lambda: [123, 45])
    monkeypatch.setattr(adapter_module, "allowed_cores", lambda: (0, 1, 2, 3))
    assert TritonAdapter._core_split("auto", config) == CoreSplit(engine=(3,), serving=(0, 1, 2))
    assert TritonAdapter._core_split("off", config) is None
    config.device = "cuda"
    assert TritonAdapter._core_split("auto", config) is None
