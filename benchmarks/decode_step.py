"""Decode step time against the memory-bandwidth floor.

A decode step must read every weight once and the K/V of every request in the batch. The floor
is (weight bytes + KV bytes read) / measured copy bandwidth of the device; the report gives each
batch size's step time and the floor as a fraction of it (1.0 = at the bandwidth limit).

    python benchmarks/decode_step.py                                  # CPU, small random model
    python benchmarks/decode_step.py --device cuda --dtype bfloat16 --shape qwen3-0.6b
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from benchmarks.offline_throughput import build_model
from minisgl_backend import LLM, SamplingParams
from minisgl_backend.kvcache import KVCache


def copy_bandwidth(device: str, nbytes: int = 1 << 28, repeats: int = 10) -> float:
    """Bytes per second moved by a device-to-device copy (read + write counted)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        dst.copy_(src)
    _sync(device)
    return 2 * nbytes * repeats / (time.perf_counter() - start)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(llm: LLM, batch_size: int, context: int, steps: int) -> dict:
    engine = llm.scheduler.engine
    decode_times: list[float] = []
    real_forward = engine.forward

    def timed(batch, eos):
        start = time.perf_counter()
        result = real_forward(batch, eos)
        result.wait()
        if batch.is_decode and batch.size == batch_size:
            decode_times.append(time.perf_counter() - start)
        return result

    engine.forward = timed
    prompts = [[3 + (i * 7 + j) % 200 for j in range(context)] for i in range(batch_size)]
    llm.generate(prompts, SamplingParams(max_tokens=steps, temperature=0, ignore_eos=True))
    engine.forward = real_forward
    decode_times = sorted(decode_times[2:])  # the first steps warm up allocator and caches
    step = decode_times[len(decode_times) // 2]
    weight_bytes = sum(p.numel() * p.element_size() for p in engine.model.parameters())
    kv_per_token = KVCache.bytes_per_token(engine.model.num_layers, engine.model.num_kv_heads_per_rank,
                                           engine.model.head_dim, engine.dtype)
    kv_bytes = batch_size * (context + steps // 2) * kv_per_token
    return {"batch_size": batch_size, "context": context, "step_ms": 1000 * step,
            "weight_bytes": weight_bytes, "kv_bytes": kv_bytes}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="")
    p.add_argument("--shape", default="small", choices=["small", "qwen3-0.6b"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 64, 256])
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--steps", type=int, default=24)
    args = p.parse_args()
    model = args.model or build_model(args.shape)
    max_bs = max(args.batch_sizes)
    llm = LLM(model, device=args.device, dtype=args.dtype, max_running_requests=max_bs,
              max_total_tokens=max_bs * (args.context + args.steps + 16), enable_prefix_cache=False)
    bandwidth = copy_bandwidth(args.device)
    rows = []
    for bs in args.batch_sizes:
        row = measure(llm, bs, args.context, args.steps)
        floor_s = (row["weight_bytes"] + row["kv_bytes"]) / bandwidth
        row.update(floor_ms=1000 * floor_s, fraction_of_floor=floor_s / (row["step_ms"] / 1000),
                   tokens_per_s=bs / (row["step_ms"] / 1000))
        rows.append(row)
    print(json.dumps({"model": args.model or f"random:{args.shape}", "device": args.device, "dtype": args.dtype,
                      "copy_bandwidth_gb_s": bandwidth / 1e9, "results": rows}, indent=2))


if __name__ == "__main__":
    main()
