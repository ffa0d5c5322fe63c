"""Online serving: requests arrive over time (Poisson or a trace) and stream their tokens back.

Sends each request at its arrival time, through a real tritonserver (gRPC streaming, the
default) or in-process (the offline `LLM`'s router, scheduler loop on a background thread), and
prints JSON per variant: throughput, TTFT / ITL / end-to-end latency p50 / p90 / p99, the worst
inter-token gap, goodput under an SLO and the prefix-cache hit rate, for all requests and per
group (`arrivals`, and the background `decode_streams`). Every variant replays the same
schedule; each later variant gets its ratios against the first.

A response may carry several tokens (the frontend coalesces while the client is slow), so ITL
is per token: a response holding k tokens that came `gap` after the previous one gives k ITLs of
gap / k (the extra tokens of a request's first response have no measured ITL); the worst gap is
the longest wait between two responses of one request. Goodput counts the requests per second
whose TTFT is within `--slo-ttft-ms` and whose every per-token ITL is within `--slo-itl-ms`.

    python benchmarks/online_serving.py                                  # CPU default, tritonserver
    python benchmarks/online_serving.py --mode inprocess --request-rate 2 --num-requests 40 \\
        --input-len 1000 1500 --output-len 8 16 --decode-streams 8 --decode-output-len 512 \\
        --variant mixed:enable_mixed_batches=true --variant prefill_first:enable_mixed_batches=false
    python benchmarks/online_serving.py --trace trace.jsonl --url 127.0.0.1:8001  # a running server

Trace lines: {"timestamp": seconds, "input_length": n, "output_length": m}.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout, when run as a script

from minisgl_backend.checkout import ROOT  # noqa: E402

# The CPU-sized default model: random weights, big enough that a 1,000-token prefill costs
# several decode steps (on the 2-core machine ~10x), small enough to run in seconds.
BENCH_MODEL = dict(arch="llama", hidden_size=256, num_heads=8, num_kv_heads=2, num_layers=4,
                   intermediate_size=768, max_position_embeddings=8192, vocab_size=512)


@dataclass
class PlannedRequest:
    send_at: float  # seconds after the start
    input_ids: list[int]
    output_len: int
    group: str  # "arrivals" | "decode_streams"


@dataclass
class Record:
    """What the client saw of one request."""

    req: PlannedRequest
    sent: float = 0.0
    times: list[float] = field(default_factory=list)  # response arrival times (with tokens)
    counts: list[int] = field(default_factory=list)  # tokens carried by each response
    error: str | None = None
    done: threading.Event = field(default_factory=threading.Event)
    cached_tokens: int = 0


# ---------------------------------------------------------------------------- schedule


def build_schedule(args: argparse.Namespace, vocab: int) -> list[PlannedRequest]:
    rng = random.Random(args.seed)
    token = lambda: rng.randrange(3, vocab)  # noqa: E731  (low ids are special tokens)
    prefixes = [[token() for _ in range(args.shared_prefix_len)] for _ in range(args.num_prefixes)]

    def prompt(n: int) -> list[int]:
        base = rng.choice(prefixes)[:n] if prefixes and args.shared_prefix_len else []
        return base + [token() for _ in range(n - len(base))]

    plan = [PlannedRequest(0.0, [token() for _ in range(args.decode_input_len)], args.decode_output_len,
                           "decode_streams") for _ in range(args.decode_streams)]
    for at, n_in, n_out in arrivals(args, rng):
        plan.append(PlannedRequest(args.arrival_delay + at, prompt(n_in), n_out, "arrivals"))
    return sorted(plan, key=lambda r: r.send_at)


def arrivals(args: argparse.Namespace, rng: random.Random) -> list[tuple[float, int, int]]:
    """(time, input length, output length) of each arriving request."""
    if args.trace:
        rows = [json.loads(line) for line in Path(args.trace).read_text().splitlines() if line.strip()]
        rows = rows[:args.num_requests] if args.num_requests else rows
        t0 = min((float(r["timestamp"]) for r in rows), default=0.0)
        return [(float(r["timestamp"]) - t0, int(r["input_length"]), int(r["output_length"])) for r in rows]
    out, t = [], 0.0
    for _ in range(args.num_requests):
        out.append((t, rng.randint(*args.input_len), rng.randint(*args.output_len)))
        t += rng.expovariate(args.request_rate) if math.isfinite(args.request_rate) else 0.0
    return out


# ---------------------------------------------------------------------------- targets


class InProcessTarget:
    """The offline LLM's router and scheduler in this process; the loop runs on a thread."""

    def __init__(self, model: str, settings: dict[str, str]) -> None:
        from minisgl_backend import LLM

        self.llm = LLM(model, **{"device": "cpu", **settings})
        if self.llm.scheduler is None:
            raise SystemExit("--mode inprocess needs tp_size=1 (the scheduler runs in this process)")
        self.thread = threading.Thread(target=self.llm.scheduler.run_forever, name="scheduler", daemon=True)
        self.thread.start()

    def submit(self, rec: Record) -> None:
        from minisgl_backend import SamplingParams

        params = SamplingParams(max_tokens=rec.req.output_len, temperature=0.0, ignore_eos=True)

        def consume(out) -> None:
            if out.token_ids:
                rec.times.append(time.perf_counter())
                rec.counts.append(len(out.token_ids))
                rec.cached_tokens = rec.cached_tokens or out.cached_tokens
            if out.finished:
                rec.error = out.error
                rec.done.set()

        rec.sent = time.perf_counter()
        self.llm.router.submit(rec.req.input_ids, params, consume)

    def cache_counts(self) -> tuple[int, int]:
        cache = self.llm.scheduler.cache
        return cache.hit_tokens, cache.hit_tokens + cache.miss_tokens

    def close(self) -> None:
        from minisgl_backend.messages import ShutdownMsg

        self.llm.io.put(ShutdownMsg())
        self.thread.join(60)
        self.llm.shutdown()


class TritonTarget:
    """One gRPC stream to tritonserver (started here on free ports unless `url` is given)."""

    def __init__(self, model: str, settings: dict[str, str], url: str | None, metrics_url: str | None,
                 workdir: Path) -> None:
        import tritonclient.grpc as grpcclient

        from minisgl_backend.testing.triton import TritonServer, triton_available
        from minisgl_backend.triton.repository import make_model_repository

        self.server = None
        if url is None:
            reason = triton_available()
            if reason:
                raise SystemExit(reason)
            repo = make_model_repository(workdir / "repo", {"model_path": model, **settings})
            self.server = TritonServer(repo, workdir / "server.log").start()
            url, metrics_url = self.server.grpc_url, self.server.metrics_url
        self.metrics_url = metrics_url
        self.records: dict[str, Record] = {}
        self.client = grpcclient.InferenceServerClient(url)
        self.client.start_stream(callback=self._on_response)

    def submit(self, rec: Record) -> None:
        import numpy as np

        from minisgl_backend.testing.triton import grpc_inputs

        rid = str(len(self.records))
        self.records[rid] = rec
        inputs = grpc_inputs(input_ids=np.array(rec.req.input_ids, dtype=np.int32), stream=True,
                             return_num_output_tokens=True, ignore_eos=True,
                             max_tokens=np.array([rec.req.output_len], dtype=np.int32),
                             temperature=np.array([0.0], dtype=np.float32))
        rec.sent = time.perf_counter()
        self.client.async_stream_infer("minisgl", inputs, request_id=rid, enable_empty_final_response=True)

    def _on_response(self, result, error) -> None:
        now = time.perf_counter()
        if error is not None:  # stream errors carry no request id: fail what is still running
            for rec in self.records.values():
                if not rec.done.is_set():
                    rec.error = str(error)
                    rec.done.set()
            return
        response = result.get_response()
        rec = self.records[response.id]
        counts = result.as_numpy("num_output_tokens") if any(o.name == "num_output_tokens" for o in response.outputs) else None
        new = int(counts.reshape(-1)[0]) if counts is not None and counts.size else 0  # this response's tokens
        if new > 0:
            rec.times.append(now)
            rec.counts.append(new)
        if response.parameters["triton_final_response"].bool_param:
            rec.done.set()

    def cache_counts(self) -> tuple[int, int]:
        if not self.metrics_url:
            return 0, 0
        import urllib.request

        from minisgl_backend.testing.triton import parse_metric

        with urllib.request.urlopen(self.metrics_url, timeout=10) as resp:
            text = resp.read().decode()
        return (int(parse_metric(text, "minisgl_cache_hit_tokens_total")),
                int(parse_metric(text, "minisgl_prompt_tokens_total")))

    def close(self) -> None:
        self.client.stop_stream()
        self.client.close()
        if self.server is not None:
            self.server.stop()


# ---------------------------------------------------------------------------- driving


def replay(target, plan: list[PlannedRequest], timeout: float) -> tuple[list[Record], float]:
    """Send every request at its time; wait for all to finish. Returns records and the span."""
    records = [Record(req) for req in plan]
    start = time.perf_counter()
    for rec in records:
        delay = start + rec.req.send_at - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        target.submit(rec)
    deadline = time.perf_counter() + timeout
    for rec in records:
        if not rec.done.wait(max(deadline - time.perf_counter(), 0.0)):
            rec.error = rec.error or "timed out"
    end = max([t for r in records for t in r.times] or [time.perf_counter()])
    return records, end - start


def percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p90": None, "p99": None, "max": None}
    xs = sorted(values)
    pick = lambda q: 1000 * xs[min(len(xs) - 1, max(0, math.ceil(q * len(xs)) - 1))]  # noqa: E731
    return {"p50": pick(0.50), "p90": pick(0.90), "p99": pick(0.99), "max": 1000 * xs[-1]}


def per_token_itls(rec: Record) -> list[float]:
    itls = []
    for i in range(1, len(rec.times)):
        gap = rec.times[i] - rec.times[i - 1]
        itls.extend([gap / rec.counts[i]] * rec.counts[i])
    return itls


def summarize(records: list[Record], span: float, slo_ttft_ms: float, slo_itl_ms: float) -> dict[str, Any]:
    ok = [r for r in records if r.error is None and r.times]
    ttft = [r.times[0] - r.sent for r in ok]
    itls = {id(r): per_token_itls(r) for r in ok}
    gaps = [b - a for r in ok for a, b in zip(r.times, r.times[1:])]
    good = [r for r in ok if 1000 * (r.times[0] - r.sent) <= slo_ttft_ms
            and all(1000 * x <= slo_itl_ms for x in itls[id(r)])]
    out_tokens = sum(sum(r.counts) for r in ok)
    return {
        "requests": len(records), "completed": len(ok), "errors": sorted({r.error for r in records if r.error})[:3],
        "output_tokens": out_tokens, "output_tok_per_s": out_tokens / span if span else 0.0,
        "input_tok_per_s": sum(len(r.req.input_ids) for r in ok) / span if span else 0.0,
        "requests_per_s": len(ok) / span if span else 0.0,
        "goodput_requests_per_s": len(good) / span if span else 0.0, "slo_attained": len(good) / max(len(records), 1),
        "ttft_ms": percentiles(ttft), "itl_ms": percentiles([x for v in itls.values() for x in v]),
        "worst_gap_ms": 1000 * max(gaps) if gaps else None,
        "e2e_ms": percentiles([r.times[-1] - r.sent for r in ok]),
        "tokens_per_response": out_tokens / max(sum(len(r.counts) for r in ok), 1),
    }


def run_variant(args: argparse.Namespace, model: str, settings: dict[str, str],
                plan: list[PlannedRequest], workdir: Path) -> dict[str, Any]:
    if args.mode == "inprocess":
        target = InProcessTarget(model, settings)
    else:
        target = TritonTarget(model, settings, args.url, args.metrics_url, workdir)
    try:
        replay(target, warmup_plan(plan), timeout=args.timeout)
        hits0, prompt0 = target.cache_counts()
        records, span = replay(target, plan, timeout=args.timeout)
        hits1, prompt1 = target.cache_counts()
    finally:
        target.close()
    report = {"seconds": span, "cache_hit_rate": (hits1 - hits0) / (prompt1 - prompt0) if prompt1 > prompt0 else None,
              "all": summarize(records, span, args.slo_ttft_ms, args.slo_itl_ms)}
    for group in sorted({r.req.group for r in records}):
        report[group] = summarize([r for r in records if r.req.group == group], span, args.slo_ttft_ms, args.slo_itl_ms)
    return report


def warmup_plan(plan: list[PlannedRequest]) -> list[PlannedRequest]:
    """Two short requests of unrelated tokens (the first batches pay one-off costs)."""
    return [PlannedRequest(0.0, [5 + i] * 16, 4, "warmup") for i in range(2)]


# ---------------------------------------------------------------------------- main


def default_model(workdir: Path) -> str:
    from minisgl_backend.tools.make_tiny_model import make_tiny_model

    folder = ROOT / "build" / "bench" / ("online-model-" + "-".join(str(v) for v in BENCH_MODEL.values()))
    if not (folder / "config.json").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        make_tiny_model(str(folder), **BENCH_MODEL)
    return str(folder)


def model_vocab(model: str) -> int:
    return json.loads((Path(model) / "config.json").read_text())["vocab_size"]


def parse_variants(specs: list[str], common: dict[str, str]) -> list[tuple[str, dict[str, str]]]:
    variants = []
    for spec in specs or ["default:"]:
        name, _, rest = spec.partition(":")
        settings = dict(common)
        settings.update(kv.split("=", 1) for kv in rest.split(",") if kv)
        variants.append((name, settings))
    return variants


def ratios(base: dict[str, Any], other: dict[str, Any]) -> dict[str, float | None]:
    def ratio(path: list[str]) -> float | None:
        a, b = base, other
        for key in path:
            a, b = (a or {}).get(key), (b or {}).get(key)
        return b / a if isinstance(a, (int, float)) and isinstance(b, (int, float)) and a else None

    group = "decode_streams" if "decode_streams" in base else "all"
    return {"output_tok_per_s": ratio(["all", "output_tok_per_s"]),
            "ttft_p99": ratio(["arrivals" if "arrivals" in base else "all", "ttft_ms", "p99"]),
            f"{group}_itl_p99": ratio([group, "itl_ms", "p99"]),
            f"{group}_worst_gap": ratio([group, "worst_gap_ms"]),
            "cache_hit_rate": ratio(["cache_hit_rate"])}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=("triton", "inprocess"), default="triton")
    p.add_argument("--url", help="gRPC address of a running tritonserver (default: start one)")
    p.add_argument("--metrics-url", help="its metrics endpoint, for the cache hit rate")
    p.add_argument("--model", help="HF model folder (default: a random CPU-sized model in build/bench)")
    p.add_argument("--request-rate", type=float, default=2.0, help="Poisson arrivals per second (inf: all at once)")
    p.add_argument("--num-requests", type=int, default=20)
    p.add_argument("--input-len", type=int, nargs=2, default=[1000, 1200], metavar=("MIN", "MAX"))
    p.add_argument("--output-len", type=int, nargs=2, default=[8, 16], metavar=("MIN", "MAX"))
    p.add_argument("--trace", help="JSON lines {timestamp, input_length, output_length} instead of Poisson")
    p.add_argument("--decode-streams", type=int, default=8, help="long-running requests started at t=0")
    p.add_argument("--decode-input-len", type=int, default=32)
    p.add_argument("--decode-output-len", type=int, default=400)
    p.add_argument("--arrival-delay", type=float, default=1.0, help="seconds before the first arrival")
    p.add_argument("--shared-prefix-len", type=int, default=0, help="prompts start with one of a few prefixes")
    p.add_argument("--num-prefixes", type=int, default=4)
    p.add_argument("--slo-ttft-ms", type=float, default=2000.0)
    p.add_argument("--slo-itl-ms", type=float, default=200.0)
    p.add_argument("--settings", nargs="*", default=[], help="engine settings for every variant, key=value")
    p.add_argument("--variant", action="append", default=[],
                   help="NAME:key=value,key=value (repeatable; the first is the baseline)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=900.0)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="minisgl-online-"))
    model = args.model or default_model(workdir)
    plan = build_schedule(args, model_vocab(model))
    common = dict(kv.split("=", 1) for kv in args.settings)
    report: dict[str, Any] = {"mode": args.mode, "model": model, "settings": common,
                              "workload": {k: getattr(args, k) for k in (
                                  "request_rate", "num_requests", "input_len", "output_len", "trace",
                                  "decode_streams", "decode_input_len", "decode_output_len",
                                  "shared_prefix_len", "num_prefixes", "slo_ttft_ms", "slo_itl_ms", "seed")},
                              "variants": {}}
    variants = parse_variants(args.variant, common)
    for i, (name, settings) in enumerate(variants):
        result = run_variant(args, model, settings, plan, workdir / f"v{i}")
        result["settings"] = settings
        report["variants"][name] = result
        print(f"[online_serving] {name}: done in {result['seconds']:.1f} s", file=sys.stderr)
    base = report["variants"][variants[0][0]]
    for name, _ in variants[1:]:
        report["variants"][name]["ratio_vs_" + variants[0][0]] = ratios(base, report["variants"][name])
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
