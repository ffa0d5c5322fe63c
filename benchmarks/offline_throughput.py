"""Offline throughput: `LLM.generate` against `transformers.generate` in the same process.

The mini-sglang offline workload (N requests, input and output lengths uniform in a range,
seed 0), scaled to the machine, plus a shared-prefix workload that measures the radix cache.
The throughput passes run `generate` untouched (the overlap loop as it runs); the scheduler's
CPU time per step comes from a separate pass that waits on every step. Prints one JSON object.

    python benchmarks/offline_throughput.py                       # CPU defaults, small random model
    python benchmarks/offline_throughput.py --model DIR --device cuda --dtype bfloat16 \
        --num-requests 256 --input-len 100 1024 --output-len 100 1024
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from minisgl_backend import LLM, SamplingParams  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="", help="local HF folder; default: a random model of --shape")
    p.add_argument("--shape", default="small", choices=["small", "qwen3-0.6b"],
                   help="random-weight model built when --model is not given")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--num-requests", type=int, default=48)
    p.add_argument("--input-len", type=int, nargs=2, default=[16, 256])
    p.add_argument("--output-len", type=int, nargs=2, default=[16, 128])
    p.add_argument("--hf-batch-size", type=int, default=16)
    p.add_argument("--max-total-tokens", type=int, default=32768)
    p.add_argument("--prefix-len", type=int, default=512, help="shared-prefix workload: prefix tokens")
    p.add_argument("--prefix-requests", type=int, default=32)
    p.add_argument("--skip-hf", action="store_true")
    p.add_argument("--no-overlap-compare", action="store_true")
    return p.parse_args()


def build_model(shape: str) -> str:
    from minisgl_backend.tools.make_tiny_model import make_tiny_model

    out = tempfile.mkdtemp(prefix=f"minisgl-bench-{shape}-")
    if shape == "qwen3-0.6b":
        return make_tiny_model(out, arch="qwen3", hidden_size=1024, num_heads=16, num_kv_heads=8, num_layers=28,
                               intermediate_size=3072, vocab_size=151936, tie_word_embeddings=True,
                               max_position_embeddings=40960, initializer_range=0.02)
    return make_tiny_model(out, arch="llama", hidden_size=512, num_heads=8, num_kv_heads=4, num_layers=8,
                           intermediate_size=1536, vocab_size=8192, max_position_embeddings=4096,
                           initializer_range=0.02)


def random_workload(n: int, vocab: int, input_len: list[int], output_len: list[int], seed: int = 0):
    rng = random.Random(seed)
    prompts = [[rng.randrange(3, vocab) for _ in range(rng.randint(*input_len))] for _ in range(n)]
    outputs = [rng.randint(*output_len) for _ in range(n)]
    return prompts, outputs


def run_engine(llm: LLM, prompts: list[list[int]], outputs: list[int]) -> dict[str, Any]:
    """Throughput of `llm.generate` as it really runs: nothing wraps the engine."""
    params = [SamplingParams(max_tokens=o, temperature=0.0, ignore_eos=True) for o in outputs]
    sched = llm.scheduler
    steps_before = sched.num_steps
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - start
    steps = sched.num_steps - steps_before
    generated = sum(len(o["token_ids"]) for o in outs)
    return {"seconds": elapsed, "output_tokens": generated, "output_tok_per_s": generated / elapsed,
            "total_tok_per_s": (generated + sum(map(len, prompts))) / elapsed, "steps": steps}


def scheduler_cpu_time(llm: LLM, prompts: list[list[int]], outputs: list[int]) -> dict[str, Any]:
    """A separate pass that waits for every step, so the time outside `engine.forward` + wait is
    the scheduler's own CPU time per step (this pass serialises the overlap loop: its wall time
    is not a throughput)."""
    params = [SamplingParams(max_tokens=o, temperature=0.0, ignore_eos=True) for o in outputs]
    sched = llm.scheduler
    forward_time = [0.0]
    real_forward = sched.engine.forward

    def timed_forward(batch):
        start = time.perf_counter()
        result = real_forward(batch)
        result.wait()
        forward_time[0] += time.perf_counter() - start
        return result

    sched.engine.forward = timed_forward
    steps_before = sched.num_steps
    start = time.perf_counter()
    try:
        llm.generate(prompts, params)
    finally:
        sched.engine.forward = real_forward
    elapsed = time.perf_counter() - start
    steps = max(sched.num_steps - steps_before, 1)
    return {"steps": steps, "scheduler_cpu_ms_per_step": 1000 * (elapsed - forward_time[0]) / steps,
            "forward_ms_per_step": 1000 * forward_time[0] / steps}


def run_transformers(model_path: str, prompts: list[list[int]], outputs: list[int], device: str,
                     dtype: str, batch_size: int) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, dtype)).to(device).eval()
    pad = model.generation_config.pad_token_id or 0
    useful, start = 0, time.perf_counter()
    for i in range(0, len(prompts), batch_size):
        chunk, outs = prompts[i:i + batch_size], outputs[i:i + batch_size]
        width = max(map(len, chunk))
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device)
        with torch.inference_mode():
            model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=max(outs),
                           min_new_tokens=max(outs), pad_token_id=pad)
        useful += sum(outs)  # padding rows past a request's own length are not counted
    elapsed = time.perf_counter() - start
    return {"seconds": elapsed, "output_tokens": useful, "output_tok_per_s": useful / elapsed,
            "total_tok_per_s": (useful + sum(map(len, prompts))) / elapsed}


def shared_prefix(llm_factory, vocab: int, prefix_len: int, n: int) -> dict[str, Any]:
    rng = random.Random(1)
    prefix = [rng.randrange(3, vocab) for _ in range(prefix_len)]
    prompts = [prefix + [rng.randrange(3, vocab) for _ in range(rng.randint(8, 32))] for _ in range(n)]
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    result = {}
    for name, cache_on in (("cache_on", True), ("cache_off", False)):
        llm = llm_factory(enable_prefix_cache=cache_on)
        llm.generate([prompts[0]], params)  # warm-up; with the cache on it also seeds the prefix
        start = time.perf_counter()
        llm.generate(prompts, params)
        result[name] = {"seconds": time.perf_counter() - start,
                        "prefill_tokens_saved": llm.scheduler.cache.hit_tokens}
    result["speedup"] = result["cache_off"]["seconds"] / result["cache_on"]["seconds"]
    return result


def main() -> None:
    args = parse_args()
    model_path = args.model or build_model(args.shape)
    settings = dict(device=args.device, dtype=args.dtype, max_total_tokens=args.max_total_tokens,
                    page_size=16, max_running_requests=max(args.num_requests, 32))
    llm = LLM(model_path, **settings)
    vocab = llm.scheduler.vocab_size
    prompts, outputs = random_workload(args.num_requests, vocab, args.input_len, args.output_len)
    llm.generate([prompts[0][:16]], SamplingParams(max_tokens=4))  # warm-up
    report: dict[str, Any] = {"model": model_path if args.model else f"random:{args.shape}",
                              "device": args.device, "dtype": args.dtype, "num_requests": args.num_requests,
                              "input_len": args.input_len, "output_len": args.output_len,
                              "torch_threads": torch.get_num_threads()}
    report["engine_overlap"] = run_engine(llm, prompts, outputs)
    report["scheduler_cpu"] = scheduler_cpu_time(llm, prompts, outputs)
    if not args.no_overlap_compare:
        serial = LLM(model_path, **settings, enable_overlap=False)
        report["engine_normal"] = run_engine(serial, prompts, outputs)
    if not args.skip_hf:
        report["transformers"] = run_transformers(model_path, prompts, outputs, args.device, args.dtype,
                                                  args.hf_batch_size)
        report["ratio_vs_transformers"] = (report["engine_overlap"]["output_tok_per_s"]
                                           / report["transformers"]["output_tok_per_s"])
    report["shared_prefix"] = shared_prefix(lambda **kw: LLM(model_path, **settings, **kw), vocab,
                                            args.prefix_len, args.prefix_requests)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
