"""TP=2 on CPU (gloo) equals TP=1; a dead rank ends requests with an error, never a hang."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from minisgl_backend import LLM, EngineConfig, SamplingParams
from minisgl_backend.frontend import Frontend
from tests.workloads import shared_prefix_workload

CPU = dict(device="cpu", dtype="float32", page_size=4, max_total_tokens=4096, max_running_requests=16)


@pytest.mark.parametrize("arch,kv_heads", [("llama", 1), ("llama", 2), ("qwen3", 1), ("qwen3", 2)])
def test_tp2_equals_tp1(tiny_model_factory, arch, kv_heads):
    path = tiny_model_factory(arch, num_kv_heads=kv_heads)
    work = shared_prefix_workload(12, vocab=500, max_prompt=80, max_output=24, seed=3)
    tp1 = LLM(path, **CPU).generate(work.prompts, work.params)
    with LLM(path, **CPU, tp_size=2) as llm:
        tp2 = llm.generate(work.prompts, work.params)
    assert [o["token_ids"] for o in tp2] == [o["token_ids"] for o in tp1]
    assert [o["text"] for o in tp2] == [o["text"] for o in tp1]


def test_dead_rank_ends_requests_with_error(tiny_llama):
    fe = Frontend(EngineConfig.from_flat(model_path=tiny_llama, tp_size=2, **CPU))
    try:
        finals: dict[int, object] = {}
        first_token = threading.Event()
        done = threading.Event()

        def collect(out):
            if out.token_ids:
                first_token.set()
            if out.finished:
                finals[out.rid] = out
                if len(finals) == 4:
                    done.set()

        params = SamplingParams(max_tokens=2000, temperature=0, ignore_eos=True)
        for i in range(4):
            fe.submit([5 + i] * 20, params, collect)
        assert first_token.wait(30)
        rank1 = fe._procs.procs[1]
        os.kill(rank1.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        assert done.wait(15), "requests must end soon after a rank dies"
        assert time.monotonic() - killed_at < 15
        assert all(out.finish_reason == "error" and "engine failure" in out.error for out in finals.values())
        assert not fe.is_healthy()
        with pytest.raises(RuntimeError, match="not running"):
            fe.submit("hello", params, collect)
    finally:
        fe.shutdown()
    assert all(p.poll() is not None for p in fe._procs.procs), "no scheduler process may outlive shutdown"


def test_shutdown_frees_the_engine_and_every_rank_exits_cleanly(tiny_llama):
    fe = Frontend(EngineConfig.from_flat(model_path=tiny_llama, tp_size=2, **CPU))
    done = threading.Event()
    fe.submit([5] * 10, SamplingParams(max_tokens=4, temperature=0), lambda out: out.finished and done.set())
    assert done.wait(30)
    fe.shutdown()
    # exit code 0: run_forever returned on the ShutdownMsg and Engine.shutdown (graphs, KV pool,
    # process group) ran without error; a killed or failed rank exits otherwise
    assert fe._procs.exit_codes() == [0, 0]


def test_offline_shutdown_frees_the_kv_pool(tiny_llama):
    llm = LLM(tiny_llama, **CPU)
    engine = llm.scheduler.engine
    assert engine.kv_cache.k
    llm.shutdown()
    assert engine.kv_cache.k == [] and engine.kv_cache.v == [] and llm.scheduler is None
