"""Soak test: mixed traffic through a real tritonserver for a while, then check that nothing broke.

    python benchmarks/soak.py [--seconds 600] [--concurrency 256] [--model DIR]    (make soak)

Serves a tiny random model (built on the fly unless --model) with a tiny KV pool, and runs
`--concurrency` client threads, each sending one request after another, of these kinds:
greedy gRPC streams, greedy HTTP /generate, greedy HTTP /generate_stream (their text must equal
the request's solo run), sampled gRPC non-streaming requests, gRPC streams cancelled after a
random delay, HTTP streams whose client disconnects, hostile inputs and over-long prompts.

At the end it checks: every request got exactly one final response (cancelled and disconnected
ones excepted: their client stopped listening), greedy outputs equal their solo runs, the
engine is idle with no page held (minisgl_kv_pages gauges) and no leak logged by the scheduler
(table rows included), and the resident memory of tritonserver, the stub and the scheduler
processes did not grow more than --max-rss-growth-mib after the warm-up; then that SIGTERM stops
the server cleanly (TritonServer.shutdown_problems). Prints one JSON object; exit code 1 if a
check failed.
"""

from __future__ import annotations

import argparse
import http.client
import json
import random
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from minisgl_backend.procinfo import children, cmdline
from minisgl_backend.testing.procinfo import rss_bytes
from minisgl_backend.testing.triton import GrpcStream, TritonServer, grpc_inputs
from minisgl_backend.triton.repository import MODEL_NAME, make_model_repository

GREEDY_PROMPTS = ["Hello, my name is", "The capital of France is", "a b c d e f g", "Once upon a time",
                  "1 2 3 4 5", "The quick brown fox", "In the beginning", "Dear diary, today"]
GREEDY_TOKENS = 12
KINDS = {"greedy_grpc_stream": 3, "greedy_http": 2, "greedy_http_stream": 2, "sampled_grpc": 2,
         "cancel_grpc": 2, "disconnect_http": 1, "hostile": 1, "overlong": 1}


@dataclass
class Tally:
    lock: threading.Lock = field(default_factory=threading.Lock)
    kinds: Counter = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    greedy_checked: int = 0

    def record(self, kind: str, failure: str | None, greedy: bool = False) -> None:
        with self.lock:
            self.kinds[kind] += 1
            self.greedy_checked += greedy and failure is None
            if failure is not None:
                self.failures.append(f"{kind}: {failure}"[:300])


class Soak:
    def __init__(self, server: TritonServer, context_len: int, references: dict[str, str], seed: int) -> None:
        self.server = server
        self.context_len = context_len
        self.refs = references
        self.tally = Tally()
        self.seed = seed

    # ------------------------------------------------------------ driver

    def run(self, seconds: float, concurrency: int) -> None:
        deadline = time.monotonic() + seconds
        threads = [threading.Thread(target=self._worker, args=(i, deadline), daemon=True) for i in range(concurrency)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(seconds + 300)

    def _worker(self, index: int, deadline: float) -> None:
        rng = random.Random(self.seed * 100_003 + index)
        names, weights = list(KINDS), list(KINDS.values())
        while time.monotonic() < deadline:
            kind = rng.choices(names, weights)[0]
            try:
                failure = getattr(self, kind)(rng)
            except Exception as exc:  # a client-side surprise is a failure too, not a crash of the soak
                failure = f"{type(exc).__name__}: {exc}"
            self.tally.record(kind, failure, greedy=kind.startswith("greedy"))

    # ------------------------------------------------------------ request kinds (None: as expected)

    def greedy_grpc_stream(self, rng: random.Random) -> str | None:
        prompt = rng.choice(GREEDY_PROMPTS)
        got = self._grpc(prompt, stream=True, params=_greedy_params())
        if got["error"] is not None or not got["final"]:
            return f"error {got['error']}"
        return _compare("".join(got["texts"]), self.refs[prompt]) or _one_final(got)

    def greedy_http(self, rng: random.Random) -> str | None:
        prompt = rng.choice(GREEDY_PROMPTS)
        status, body = self.server.generate({"text_input": prompt, "exclude_input_in_output": True,
                                             "parameters": _greedy_params()})
        if status != 200:
            return f"HTTP {status}: {body}"
        return _compare(body["text_output"], self.refs[prompt])

    def greedy_http_stream(self, rng: random.Random) -> str | None:
        prompt = rng.choice(GREEDY_PROMPTS)
        status, events = self.server.generate({"text_input": prompt, "stream": True, "return_finish_reason": True,
                                               "parameters": _greedy_params()}, stream=True)
        if status != 200:
            return f"HTTP {status}: {events}"
        finals = [e for e in events if e.get("finish_reason") or "error" in e]
        if len(finals) != 1 or finals[0] is not events[-1]:
            return f"{len(finals)} final events in {len(events)}"
        return _compare("".join(e.get("text_output", "") for e in events), self.refs[prompt])

    def sampled_grpc(self, rng: random.Random) -> str | None:
        params = {"max_tokens": rng.randint(1, 64), "temperature": 1.0, "top_p": 0.9}
        got = self._grpc(rng.choice(GREEDY_PROMPTS) * rng.randint(1, 20), stream=False, params=params)
        if got["error"] is not None or not got["final"]:
            return f"error {got['error']}"
        return None if got["responses"] == 1 else f"{got['responses']} responses for a non-streaming request"

    def cancel_grpc(self, rng: random.Random) -> str | None:
        client = GrpcStream(self.server.grpc_url)
        try:
            client.send("c", grpc_inputs(rng.choice(GREEDY_PROMPTS), stream=True),
                        parameters={"max_tokens": 400, "ignore_eos": True})
            time.sleep(rng.uniform(0.05, 1.5))
        finally:
            client.close(cancel=True)
        return None

    def disconnect_http(self, rng: random.Random) -> str | None:
        conn = http.client.HTTPConnection(self.server.http_url, timeout=60)
        try:
            conn.request("POST", "/v2/models/minisgl/generate_stream", headers={"Content-Type": "application/json"},
                         body=json.dumps({"text_input": rng.choice(GREEDY_PROMPTS), "stream": True,
                                          "parameters": {"max_tokens": 400, "ignore_eos": True}}))
            resp = conn.getresponse()
            for _ in range(rng.randint(0, 4)):
                resp.readline()
        finally:
            if conn.sock is not None:
                conn.sock.close()  # the client goes away mid-stream
            conn.close()
        return None

    def hostile(self, rng: random.Random) -> str | None:
        payload = rng.choice(HOSTILE)()
        status, body = self.server.generate(payload)
        if status == 200:
            return None  # some hostile inputs are legal (10k stop strings): one answer is all we ask
        return None if isinstance(body, dict) and body.get("error") else f"HTTP {status} without an error: {body}"

    def overlong(self, rng: random.Random) -> str | None:
        ids = [rng.randrange(1, 200) for _ in range(self.context_len + rng.randint(0, 64))]
        status, body = self.server.generate({"input_ids": ids, "parameters": {"max_tokens": 4}})
        return None if status == 400 and "context" in body.get("error", "") else f"HTTP {status}: {body}"

    def _grpc(self, prompt: str, stream: bool, params: dict) -> dict:
        client = GrpcStream(self.server.grpc_url)
        try:
            client.send("r", grpc_inputs(prompt, stream=stream, exclude_input_in_output=True), parameters=params)
            got = client.collect(["r"], timeout=600)["r"]
            time.sleep(0.05)  # anything after the final response would arrive now
            got["late"] = client.queue.qsize()
            return got
        finally:
            client.close()


HOSTILE = [
    lambda: {"text_input": "hi", "sampling_parameters": "[" * 100_000 + "]" * 100_000},
    lambda: {"text_input": "hi", "sampling_parameters": '{"stop": "\\ud800"}'},
    lambda: {"text_input": "hi", "input_ids": [1, 2]},
    lambda: {"text_input": "hi", "sampling_parameters": '{"n": 2}'},
    lambda: {"input_ids": [-5, 3]},
    lambda: {"text_input": "hi", "sampling_parameters": json.dumps({"stop": [f"s{i}" for i in range(10_000)],
                                                                    "max_tokens": 2})},
    lambda: {"text_input": "hi", "sampling_parameters": json.dumps({"stop": "x" * 1_000_000})},
    lambda: {"text_input": "hi", "max_tokens": "many"},
    lambda: {"text_input": "hi", "sampling_parameters": '{"temperature": NaN}'},
    lambda: {"text_input": ""},
]


def _greedy_params() -> dict:
    return {"max_tokens": GREEDY_TOKENS, "temperature": 0.0, "ignore_eos": True}


def _compare(got: str, want: str) -> str | None:
    return None if got == want else f"greedy output {got!r} != solo run {want!r}"


def _one_final(got: dict) -> str | None:
    return None if got["late"] == 0 else f"{got['late']} responses after the final one"


# ------------------------------------------------------------ server-side checks


def serving_processes(server: TritonServer) -> dict[str, int]:
    """{name: pid} of tritonserver, its Python-backend stub and the scheduler processes."""
    procs = {"tritonserver": server.proc.pid}
    for pid in children(server.proc.pid):
        if "triton_python_backend_stub" in cmdline(pid):
            procs["stub"] = pid
            for i, child in enumerate(p for p in children(pid) if "minisgl_backend.launch" in cmdline(p)):
                procs[f"scheduler{i}"] = child
    return procs


def rss_mib(pid: int) -> float:
    return rss_bytes(pid) / 2**20


def solo_references(server: TritonServer) -> dict[str, str]:
    refs = {}
    for prompt in GREEDY_PROMPTS:
        status, body = server.generate({"text_input": prompt, "exclude_input_in_output": True,
                                        "parameters": _greedy_params()})
        assert status == 200, body
        refs[prompt] = body["text_output"]
    return refs


# ------------------------------------------------------------ entry


def run_soak(model: str | None, seconds: float, concurrency: int, max_total_tokens: int = 2048,
             page_size: int = 16, seed: int = 0, warmup_fraction: float = 0.2,
             max_rss_growth_mib: float = 100.0, work_dir: str | None = None) -> dict:
    work = Path(work_dir or tempfile.mkdtemp(prefix="minisgl-soak-"))
    if model is None:
        from minisgl_backend.tools.make_tiny_model import make_tiny_model

        model = make_tiny_model(str(work / "model"), arch="llama", num_kv_heads=2)
    settings = {"model_path": model, "max_total_tokens": max_total_tokens, "page_size": page_size,
                "max_running_requests": 128}
    server = TritonServer(make_model_repository(work / "repo", settings), work / "server.log")
    server.start()
    try:
        result = _soak(server, seconds, concurrency, max_total_tokens, seed, warmup_fraction, max_rss_growth_mib)
    finally:
        server.stop()
    problems = server.shutdown_problems(unloaded=[MODEL_NAME])
    result["leak_log_lines"] = server.leak_lines()[:10]
    result["shutdown_problems"] = problems
    result["clean_shutdown"] = not problems  # a leak logged is a problem too
    result["ok"] = result["ok"] and result["clean_shutdown"]
    return result


def _soak(server: TritonServer, seconds: float, concurrency: int, context_len: int, seed: int,
          warmup_fraction: float, max_rss_growth_mib: float) -> dict:
    soak = Soak(server, context_len, solo_references(server), seed)
    procs = serving_processes(server)
    baseline: dict[str, float] = {}
    peaks: dict[str, float] = {name: 0.0 for name in procs}
    stop = threading.Event()

    def sample() -> None:
        start = time.monotonic()
        while not stop.wait(1.0):
            for name, pid in procs.items():
                peaks[name] = max(peaks[name], rss_mib(pid))
            if not baseline and time.monotonic() - start >= seconds * warmup_fraction:
                baseline.update({name: rss_mib(pid) for name, pid in procs.items()})

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.monotonic()
    soak.run(seconds, concurrency)
    elapsed = time.monotonic() - started
    stop.set()
    sampler.join()
    gauges = server.wait_idle(120.0)
    end = {name: rss_mib(pid) for name, pid in procs.items()}
    base = baseline or end
    rss = {name: {"baseline_mib": round(base[name], 1), "end_mib": round(end[name], 1),
                  "peak_mib": round(peaks[name], 1), "growth_mib": round(end[name] - base[name], 1)}
           for name in procs}
    grown = {n: r["growth_mib"] for n, r in rss.items() if r["growth_mib"] > max_rss_growth_mib}
    t = soak.tally
    return {"seconds": round(elapsed, 1), "concurrency": concurrency, "requests": sum(t.kinds.values()),
            "requests_per_s": round(sum(t.kinds.values()) / max(elapsed, 1e-9), 2), "by_kind": dict(t.kinds),
            "greedy_checked": t.greedy_checked, "failures": len(t.failures), "first_failures": t.failures[:20],
            "idle_gauges": gauges, "rss": rss, "rss_over_limit": grown,
            "aborted_total": server.metric("minisgl_requests_total", {"finish_reason": "abort"}),
            "ok": not t.failures and not grown}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="HF model folder (default: a tiny random Llama)")
    parser.add_argument("--seconds", type=float, default=600)
    parser.add_argument("--concurrency", type=int, default=256)
    parser.add_argument("--max-total-tokens", type=int, default=2048, help="the KV pool (tiny on purpose)")
    parser.add_argument("--min-requests", type=int, default=0, help="fail if fewer requests were sent")
    parser.add_argument("--max-rss-growth-mib", type=float, default=100.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    result = run_soak(args.model, args.seconds, args.concurrency, args.max_total_tokens, seed=args.seed,
                      max_rss_growth_mib=args.max_rss_growth_mib)
    if result["requests"] < args.min_requests:
        result["ok"] = False
        result["first_failures"].append(f"only {result['requests']} requests (--min-requests {args.min_requests})")
    print(json.dumps(result, indent=1))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
