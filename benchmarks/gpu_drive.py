"""The GPU benchmark stages that scripts/gpu_check.sh runs, one process per stage (an `LLM` sizes
its KV pool from free GPU memory, so two in one process would measure different pools).
Each prints one JSON line.

    python benchmarks/gpu_drive.py build MODEL_DIR          random Qwen3-0.6B-shaped model
    python benchmarks/gpu_drive.py engine MODEL_DIR [--no-overlap]
        the mini-sglang offline workload (256 requests, input / output uniform in 100..1024,
        seed 0, greedy, ignore_eos): output tok/s with nothing wrapping the engine
    python benchmarks/gpu_drive.py scheduler_cpu MODEL_DIR  the same work, waiting on every step:
        the scheduler's CPU time per step (not a throughput)
    python benchmarks/gpu_drive.py hf MODEL_DIR [--max-new N]
        transformers.generate on the same requests in one batch of 256; with --max-new each row
        stops after N tokens (a time-boxed baseline: its later, longer-context steps are
        slower, so it overstates transformers' tok/s)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.offline_throughput import random_workload, run_engine, run_transformers, scheduler_cpu_time  # noqa: E402

NUM_REQUESTS, INPUT_LEN, OUTPUT_LEN, VOCAB = 256, (100, 1024), (100, 1024), 151936
SETTINGS = dict(device="cuda", dtype="bfloat16", page_size=16, max_running_requests=256)


def workload():
    return random_workload(NUM_REQUESTS, VOCAB, list(INPUT_LEN), list(OUTPUT_LEN))


def build(model_dir: str) -> dict:
    from minisgl_backend.tools.make_tiny_model import make_tiny_model

    start = time.perf_counter()
    make_tiny_model(model_dir, arch="qwen3", hidden_size=1024, num_heads=16, num_kv_heads=8, num_layers=28,
                    intermediate_size=3072, vocab_size=VOCAB, tie_word_embeddings=True,
                    max_position_embeddings=40960, initializer_range=0.02)
    return {"seconds": time.perf_counter() - start}


def _llm(model_dir: str, **extra):
    from minisgl_backend import LLM, SamplingParams

    llm = LLM(model_dir, **SETTINGS, **extra)
    prompts, _ = workload()
    llm.generate([prompts[0][:16]], SamplingParams(max_tokens=4))  # warm-up
    torch.cuda.synchronize()
    return llm


def kv_tokens_read(prompts: list[list[int]], outputs: list[int]) -> int:
    """K/V positions the decode steps of the workload read: output 0 comes from the prefill, and
    the step that makes output t >= 1 of a request with a p-token prompt attends over p + t
    positions: sum over t = 1 .. n - 1."""
    return sum((n - 1) * len(p) + (n - 1) * n // 2 for p, n in zip(prompts, outputs) if n > 0)


def engine(model_dir: str, overlap: bool, settings: dict[str, str] | None = None) -> dict:
    from benchmarks.decode_step import copy_bandwidth
    from minisgl_backend.kvcache import KVCache

    llm = _llm(model_dir, enable_overlap=overlap, **(settings or {}))
    prompts, outputs = workload()
    result = run_engine(llm, prompts, outputs)
    eng = llm.scheduler.engine
    # the rate at which reading the K/V cache alone, at the device's copy bandwidth, takes all the
    # time (weights, prefill and everything else on top): no run of this workload can pass it
    kv_bytes = kv_tokens_read(prompts, outputs) * KVCache.bytes_per_token(
        eng.model.num_layers, eng.model.num_kv_heads_per_rank, eng.model.head_dim, eng.kv_dtype)
    bandwidth = copy_bandwidth("cuda")
    result.update(overlap=overlap, settings=settings or {}, layer_ops=eng.model.ops.name, attention=type(eng.attn).__name__,
                  cuda_graph=eng.graph_runner is not None, num_pages=eng.num_pages,
                  max_mem_gb=torch.cuda.max_memory_allocated() / 2**30, copy_bandwidth_gb_s=bandwidth / 1e9,
                  kv_read_bound_output_tok_per_s=sum(outputs) / (kv_bytes / bandwidth))
    return result


def scheduler_cpu(model_dir: str) -> dict:
    prompts, outputs = workload()
    return scheduler_cpu_time(_llm(model_dir), prompts, outputs)


def hf(model_dir: str, max_new: int) -> dict:
    prompts, outputs = workload()
    if max_new:
        outputs = [min(o, max_new) for o in outputs]
    result = run_transformers(model_dir, prompts, outputs, "cuda", "bfloat16", NUM_REQUESTS)
    result.update(batch_size=NUM_REQUESTS, max_new_tokens=max_new or max(outputs),
                  max_mem_gb=torch.cuda.max_memory_allocated() / 2**30)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=["build", "engine", "scheduler_cpu", "hf"])
    p.add_argument("model_dir")
    p.add_argument("--no-overlap", action="store_true")
    p.add_argument("--max-new", type=int, default=0)
    p.add_argument("--settings", nargs="*", default=[], help="engine: more engine settings as key=value, "
                   "e.g. decode_attention=triton")
    args = p.parse_args()
    if args.stage == "build":
        out = build(args.model_dir)
    elif args.stage == "engine":
        out = engine(args.model_dir, overlap=not args.no_overlap,
                     settings=dict(kv.split("=", 1) for kv in args.settings))
    elif args.stage == "scheduler_cpu":
        out = scheduler_cpu(args.model_dir)
    else:
        out = hf(args.model_dir, args.max_new)
    print(json.dumps({"stage": args.stage + ("_normal" if args.no_overlap else ""), **out}))


if __name__ == "__main__":
    main()
