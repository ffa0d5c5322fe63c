"""Time to first token and inter-token latency through a real tritonserver, at several
concurrencies, against the offline engine on the same workload in the same process.

Starts tritonserver on free ports (as the tests do), runs `concurrency` gRPC streaming clients
at once, each sending `--requests-per-client` greedy requests one after another, and prints JSON:
TTFT / ITL / end-to-end percentiles, output tokens/s, and the ratio of the server's tokens/s to
`LLM.generate` on the same prompts (the serving layer's cost).

    python benchmarks/triton_latency.py                                    # default model, CPU
    python benchmarks/triton_latency.py --model DIR --concurrency 1 16 64 --settings device=cuda
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout, when run as a script

from minisgl_backend.checkout import DEFAULT_MODEL_SUBDIR, ROOT  # noqa: E402

PROMPTS = ["Write a short poem about the sea.", "What is the capital of France?",
           "Explain what a KV cache is in one paragraph.", "List three prime numbers.",
           "Tell me a story about a robot who learns to paint.", "How do airplanes fly?"]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(ROOT / DEFAULT_MODEL_SUBDIR))
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("--requests-per-client", type=int, default=2)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--settings", nargs="*", default=[], help="config.pbtxt parameters as key=value")
    return p.parse_args()


def one_client(url: str, prompts: list[str], output_len: int, records: list[dict]) -> None:
    import numpy as np
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    events: list[tuple[float, Any, Any]] = []
    done = threading.Event()

    def callback(result, error):
        events.append((time.perf_counter(), result, error))
        if error is not None or result.get_response().parameters["triton_final_response"].bool_param:
            done.set()

    client.start_stream(callback=callback)
    params = {"max_tokens": output_len, "temperature": 0.0, "ignore_eos": True}
    for prompt in prompts:
        events.clear()
        done.clear()
        text = grpcclient.InferInput("text_input", [1], "BYTES")
        text.set_data_from_numpy(np.array([prompt.encode()], dtype=object))
        stream = grpcclient.InferInput("stream", [1], "BOOL")
        stream.set_data_from_numpy(np.array([True]))
        start = time.perf_counter()
        client.async_stream_infer("minisgl", [text, stream], parameters=params, enable_empty_final_response=True)
        done.wait(600)
        token_times = [t for t, r, e in events if e is None and r.as_numpy("text_output") is not None
                       and r.as_numpy("text_output").size and r.as_numpy("text_output")[0]]
        errors = [str(e) for _, _, e in events if e is not None]
        records.append({"start": start, "token_times": token_times, "errors": errors})
    client.stop_stream()
    client.close()


def run_concurrency(url: str, concurrency: int, per_client: int, output_len: int) -> dict[str, Any]:
    records: list[dict] = []
    threads = [threading.Thread(target=one_client, args=(url, [PROMPTS[(c + i) % len(PROMPTS)] for i in
                                                               range(per_client)], output_len, records))
               for c in range(concurrency)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    ttft = [r["token_times"][0] - r["start"] for r in records if r["token_times"]]
    itl = [b - a for r in records for a, b in zip(r["token_times"], r["token_times"][1:])]
    e2e = [r["token_times"][-1] - r["start"] for r in records if r["token_times"]]
    pct = lambda xs, q: 1000 * statistics.quantiles(xs, n=100)[q - 1] if len(xs) > 1 else 1000 * xs[0]  # noqa: E731
    return {"concurrency": concurrency, "requests": len(records),
            "errors": sum(len(r["errors"]) for r in records),
            "ttft_ms": {"p50": pct(ttft, 50), "p90": pct(ttft, 90), "p99": pct(ttft, 99)},
            "itl_ms": {"p50": pct(itl, 50), "p90": pct(itl, 90), "p99": pct(itl, 99),
                       "mean": 1000 * statistics.mean(itl)},
            "e2e_ms": {"p50": pct(e2e, 50), "p90": pct(e2e, 90)},
            "output_tok_per_s": concurrency * per_client * output_len / elapsed, "seconds": elapsed}


def offline_tok_per_s(llm, n: int, output_len: int) -> float:
    from minisgl_backend import SamplingParams

    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(n)]
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    llm.generate(prompts[:1], params)
    start = time.perf_counter()
    llm.generate(prompts, params)
    return n * output_len / (time.perf_counter() - start)


def main() -> None:
    from minisgl_backend.testing.triton import TritonServer, triton_available
    from minisgl_backend.triton.repository import make_model_repository

    args = parse_args()
    if triton_available():
        raise SystemExit(triton_available())
    settings = dict(kv.split("=", 1) for kv in args.settings)
    work = Path(tempfile.mkdtemp(prefix="minisgl-latency-"))
    repo = make_model_repository(work / "repo", {"model_path": args.model, **settings})
    server = TritonServer(repo, work / "server.log").start()
    report: dict[str, Any] = {"model": os.path.basename(args.model.rstrip("/")), "settings": settings,
                              "output_len": args.output_len, "results": []}
    try:
        run_concurrency(server.grpc_url, 1, 1, 4)  # warm-up
        for c in args.concurrency:
            report["results"].append(run_concurrency(server.grpc_url, c, args.requests_per_client, args.output_len))
    finally:
        server.stop()
    from minisgl_backend import LLM

    llm = LLM(args.model, **settings)  # after the server stopped: on a GPU both size their KV pool from free memory
    try:
        for row in report["results"]:
            n = row["concurrency"] * args.requests_per_client
            offline = offline_tok_per_s(llm, n, args.output_len)
            row["offline_output_tok_per_s"] = offline
            row["ratio_server_vs_offline"] = row["output_tok_per_s"] / offline
    finally:
        llm.shutdown()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
