"""The OpenAI frontend's cost: TTFT, inter-token latency and output tokens/s through
`python -m minisgl_backend.openai` (HTTP + SSE) against direct gRPC streaming to the same
tritonserver, at several concurrencies, on the same prompts (the chat template rendered once
here and sent as text_input on the direct path; messages on the frontend path).

Starts tritonserver and the frontend (its own process, as `make serve` runs it) on free ports,
serving a micro random Llama (hidden 64, 2 layers) so that the engine is cheap and the serving
layers dominate. Both load generators are lean asyncio clients in this process, so that neither
path is charged for a heavy client: direct is Triton's gRPC stub on one grpc.aio channel,
responses decoded from raw_output_contents (the frontend's own gRPC client code); the frontend
path is plain asyncio HTTP/1.1 with one keep-alive connection per stream (as the openai SDK keeps
them). Each concurrency runs direct and frontend alternately for `--rounds` rounds.
Prints JSON; `ratio_tok_per_s` = frontend / direct (1.0: the frontend costs nothing), and CPU
time per output token (utime + stime from /proc) of the frontend process, of Triton's process
group and of the load generator, which other load on the machine disturbs far less than
wall-clock rates: `cpu_bound_ratio_estimate` = triton / (triton + frontend) is the tokens/s ratio
to expect when the serving processes saturate the CPUs, `cpu_ratio_all_processes` the same with
every process of each path counted (clients included).

    python benchmarks/openai_frontend.py                          # 1, 16, 64 streams, 64 tokens each
    python benchmarks/openai_frontend.py --concurrency 64 --output-len 128 --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout, when run as a script

QUESTIONS = ["Write a short poem about the sea.", "What is the capital of France?",
             "Explain what a KV cache is in one paragraph.", "List three prime numbers.",
             "Tell me a story about a robot who learns to paint.", "How do airplanes fly?"]
SETTINGS = {"max_total_tokens": 65536, "page_size": 16, "max_running_requests": 256}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="HF folder (default: a micro random Llama made here)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("--requests-per-stream", type=int, default=2)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2)
    return p.parse_args()


@dataclass
class Record:
    start: float
    event_times: list[float] = field(default_factory=list)  # responses / SSE chunks that carried text
    tokens: int = 0
    error: str | None = None


# ---------------------------------------------------------------- direct gRPC


async def direct_request(client: Any, prompt: str, output_len: int) -> Record:
    """One streamed request on Triton's gRPC stub, decoded without tritonclient's per-response
    wrappers (the frontend's own gRPC client, so both paths pay the same for reading Triton): the
    same contract and switches as the frontend sends, the same work for Triton on both paths."""
    from minisgl_backend.openai.triton_client import GenerateRequest

    request = GenerateRequest(prompt, {"max_tokens": output_len, "temperature": 0.0, "ignore_eos": True}, stream=True)
    record = Record(time.perf_counter())
    try:
        async for piece in client.generate(request):
            if piece.text:
                record.event_times.append(time.perf_counter())
            record.tokens += piece.num_output_tokens
    except Exception as exc:  # noqa: BLE001 - reported, not raised: one failure does not end the run
        record.error = str(exc)
    return record


# ---------------------------------------------------------------- through the frontend


class HttpConnection:
    """One keep-alive HTTP/1.1 connection to the frontend, as an SDK client (httpx) keeps one per
    stream: plain asyncio, because an HTTP client library costs more CPU per request (~6 ms for
    httpx) than the frontend itself, and the load generator shares the machine with what it measures."""

    def __init__(self, base_url: str) -> None:
        self.host, self.port = base_url.removeprefix("http://").split(":")
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post_stream(self, path: str, payload: dict, record: Record) -> None:
        body = json.dumps(payload).encode()
        head = (f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, int(self.port))
        self.writer.write(head + body)
        status = await self.reader.readline()
        if b" 200 " not in status:
            record.error = status.decode(errors="replace")
            await self.close()
            return
        # chunked transfer encoding of SSE events: every line is a chunk size, an event, or
        # blank; the body ends with the zero-size chunk. String tests, not JSON, except usage:
        # the load generator stays cheap.
        async for line in self.reader:
            if line.startswith(b'data: {"id"') and b'"usage": {' in line:
                record.tokens = json.loads(line[6:])["usage"]["completion_tokens"]
            elif b'"content": "' in line and b'"content": ""' not in line:
                record.event_times.append(time.perf_counter())
            elif line == b"0\r\n":
                await self.reader.readline()  # the blank line that ends the chunked body
                return
        record.error = "the frontend closed the connection mid-response"
        await self.close()

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.reader = self.writer = None


async def frontend_request(connection: HttpConnection, messages: list[dict], output_len: int) -> Record:
    """One streamed chat completion on the stream's keep-alive connection."""
    record = Record(time.perf_counter())
    await connection.post_stream("/v1/chat/completions", {
        "model": "minisgl", "messages": messages, "max_tokens": output_len, "temperature": 0.0, "ignore_eos": True,
        "stream": True, "stream_options": {"include_usage": True}}, record)
    return record


# ---------------------------------------------------------------- driver


async def run_streams(make_request, concurrency: int, per_stream: int) -> tuple[list[Record], float]:
    """`concurrency` streams of `per_stream` requests in a row; `make_request(connection, i)`
    with one connection per stream (None for gRPC, whose streams share one channel)."""
    async def stream(k: int) -> list[Record]:
        connection = make_request.connect()
        try:
            return [await make_request(connection, (k + i) % len(QUESTIONS)) for i in range(per_stream)]
        finally:
            if connection is not None:
                await connection.close()

    start = time.perf_counter()
    groups = await asyncio.gather(*(stream(k) for k in range(concurrency)))
    return [r for g in groups for r in g], time.perf_counter() - start


@dataclass
class LoadPath:
    """How one path sends a request, and the connection each stream opens for it."""

    request: Any
    connect: Any

    def __call__(self, connection: Any, i: int) -> Any:
        return self.request(connection, i)


def summarise(records: list[Record], elapsed: float) -> dict[str, Any]:
    ok = [r for r in records if r.error is None and r.event_times]
    ttft = [r.event_times[0] - r.start for r in ok]
    itl = [b - a for r in ok for a, b in zip(r.event_times, r.event_times[1:])]
    tpot = [(r.event_times[-1] - r.event_times[0]) / (r.tokens - 1) for r in ok if r.tokens > 1]
    ms = lambda xs, q: round(1000 * statistics.quantiles(xs, n=100)[q - 1], 2) if len(xs) > 1 else (  # noqa: E731
        round(1000 * xs[0], 2) if xs else None)
    tokens = sum(r.tokens for r in ok)
    return {"requests": len(records), "errors": [r.error for r in records if r.error][:3],
            "ttft_ms": {"p50": ms(ttft, 50), "p90": ms(ttft, 90)},
            "itl_ms": {"p50": ms(itl, 50), "p90": ms(itl, 90)},
            "tpot_ms_mean": round(1000 * statistics.mean(tpot), 2) if tpot else None,
            "output_tokens": tokens, "seconds": round(elapsed, 3),
            "tokens_per_event": round(tokens / max(sum(len(r.event_times) for r in ok), 1), 2),
            "output_tok_per_s": round(tokens / elapsed, 1)}


def cpu_summary(rounds: dict[str, list[dict]]) -> dict[str, float]:
    """CPU per output token: Triton (server + stub + engine) on each path, the frontend, and the
    load generators. `cpu_bound_ratio_estimate` counts the servers only (Triton's CPU on the
    direct path against the same plus the frontend); `cpu_ratio_all_processes` counts everything
    each path ran on the machine, clients included: on saturated cores, tokens/s go as its inverse."""
    med = lambda name, key: statistics.median(r[key] for r in rounds[name])  # noqa: E731
    triton, frontend = med("direct", "triton_cpu_ms_per_token"), med("frontend", "frontend_cpu_ms_per_token")
    direct_all = triton + med("direct", "client_cpu_ms_per_token")
    frontend_all = (med("frontend", "triton_cpu_ms_per_token") + frontend + med("frontend", "client_cpu_ms_per_token"))
    return {"triton_cpu_ms_per_token_median": triton, "frontend_cpu_ms_per_token_median": frontend,
            "cpu_bound_ratio_estimate": round(triton / (triton + frontend), 3),
            "cpu_ratio_all_processes": round(direct_all / frontend_all, 3)}


def process_cpu_s(pid: int) -> float:
    """utime + stime of a process, in seconds (Linux /proc)."""
    import os

    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def group_cpu_s(pgid: int) -> float:
    """CPU seconds of the live processes of a process group (tritonserver, its stub, the engine)."""
    import os

    total = 0.0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


async def measure(grpc_url: str, base_url: str, frontend_pid: int, triton_pgid: int, prompts: list[str],
                  args: argparse.Namespace) -> list[dict]:
    from minisgl_backend.openai.triton_client import TritonGenerateClient

    grpc_client = TritonGenerateClient(grpc_url, "minisgl")
    conversations = [[{"role": "user", "content": q}] for q in QUESTIONS]
    paths = {"direct": LoadPath(lambda _, i: direct_request(grpc_client, prompts[i], args.output_len), lambda: None),
             "frontend": LoadPath(lambda conn, i: frontend_request(conn, conversations[i], args.output_len),
                               lambda: HttpConnection(base_url))}
    try:
        for path in paths.values():  # warm-up: connections, first prefill
            await run_streams(path, 2, 1)
        rows = []
        for concurrency in args.concurrency:
            rounds: dict[str, list[dict]] = {"direct": [], "frontend": []}
            for _ in range(args.rounds):
                for name, path in paths.items():
                    frontend_cpu, client_cpu = process_cpu_s(frontend_pid), time.process_time()
                    triton_cpu = group_cpu_s(triton_pgid)
                    records, elapsed = await run_streams(path, concurrency, args.requests_per_stream)
                    row = summarise(records, elapsed)
                    tokens = max(row["output_tokens"], 1)
                    row["client_cpu_ms_per_token"] = round(1000 * (time.process_time() - client_cpu) / tokens, 3)
                    row["triton_cpu_ms_per_token"] = round(1000 * (group_cpu_s(triton_pgid) - triton_cpu) / tokens, 3)
                    if name == "frontend":
                        row["frontend_cpu_ms_per_token"] = round(
                            1000 * (process_cpu_s(frontend_pid) - frontend_cpu) / tokens, 3)
                    rounds[name].append(row)
            direct = statistics.median(r["output_tok_per_s"] for r in rounds["direct"])
            frontend = statistics.median(r["output_tok_per_s"] for r in rounds["frontend"])
            rows.append({"concurrency": concurrency, "direct": rounds["direct"], "frontend": rounds["frontend"],
                         "direct_tok_per_s_median": direct, "frontend_tok_per_s_median": frontend,
                         "ratio_tok_per_s": round(frontend / direct, 3),
                         **cpu_summary(rounds)})
        return rows
    finally:
        await grpc_client.close()


def _event_loop_factory():
    """The load generator's loop: uvloop where installed, as the frontend runs (uvicorn's default),
    so that the direct path's gRPC client is as lean as the frontend's own."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def main() -> None:
    from transformers import AutoTokenizer

    from minisgl_backend.testing.openai_frontend import OpenAIFrontend
    from minisgl_backend.testing.triton import TritonServer, triton_available
    from minisgl_backend.tools.make_tiny_model import make_tiny_model
    from minisgl_backend.triton.repository import make_model_repository

    args = parse_args()
    if triton_available():
        raise SystemExit(triton_available())
    work = Path(tempfile.mkdtemp(prefix="minisgl-openai-bench-"))
    model = args.model or make_tiny_model(str(work / "micro"), hidden_size=64, num_layers=2)
    tokenizer = AutoTokenizer.from_pretrained(model)
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                             add_generation_prompt=True) for q in QUESTIONS]
    repo = make_model_repository(work / "repo", {"model_path": model, **SETTINGS})
    triton = TritonServer(repo, work / "triton.log").start()
    frontend = OpenAIFrontend(triton.grpc_url, work / "frontend.log")
    try:
        frontend.start()
        # the load generator's heap (transformers, torch) out of the collector's reach, as the
        # frontend does: a full collection would pause every stream of either path
        gc.collect()
        gc.freeze()
        with asyncio.Runner(loop_factory=_event_loop_factory()) as runner:
            rows = runner.run(measure(triton.grpc_url, frontend.base_url, frontend.proc.pid, triton.proc.pid, prompts,
                                      args))
    finally:
        frontend.stop()
        triton.stop()
    print(json.dumps({"model": "micro llama (hidden 64, 2 layers)" if args.model is None else args.model,
                      "output_len": args.output_len, "requests_per_stream": args.requests_per_stream,
                      "rounds": args.rounds, "results": rows}, indent=2))


if __name__ == "__main__":
    main()
