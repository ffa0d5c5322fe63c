"""Replicas behind sglang-router: what each routing policy does to the prefix cache and latency.

Starts `scripts/serve_cluster.sh` (REPLICAS x tritonserver + OpenAI frontend, a random 4-layer
256-wide Llama made once in build/bench, a small KV pool per replica) and, for each policy in
turn, a fresh sglang-router with serve-cluster's flags in front of the same replicas. Each
policy serves the same shape of workload on its own prompts (so no policy finds another's
prefixes cached): `--conversations` clients at once, each a conversation with its own system
prompt of 512+ tokens and `--turns` user turns sent one after another, every turn carrying the
conversation so far; the first turns arrive together, later ones after a random pause.

Per policy: cache-hit rate (the replicas' `minisgl_cache_hit_tokens_total` over
`minisgl_prompt_tokens_total`), TTFT p50 / p99 (client side, first streamed content), end-to-end
p50, output tokens/s over the run's wall time, requests per replica, failures. Prints JSON.

    .venv/bin/python benchmarks/cluster_routing.py
    .venv/bin/python benchmarks/cluster_routing.py --policies cache_aware round_robin --conversations 6 --turns 8
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout, when run as a script

import httpx  # noqa: E402

WORDS = ("alpha river stone cloud quiet maple orbit lantern copper meadow signal harbor velvet summit ember "
         "willow canyon prism thistle marble").split()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="HF folder (default: a random 4-layer 256-wide Llama in build/bench)")
    p.add_argument("--replicas", type=int, default=3)
    p.add_argument("--policies", nargs="+", default=["cache_aware", "round_robin", "power_of_two", "random"])
    p.add_argument("--conversations", type=int, default=12, help="clients at once, one conversation each")
    p.add_argument("--turns", type=int, default=8)
    p.add_argument("--system-words", type=int, default=140, help="words per system prompt (~4 tokens each)")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--settings", default="max_total_tokens=4096 page_size=16 max_running_requests=32",
                   help="the replicas' SETTINGS (by default a pool of about four conversations per replica)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


@dataclass
class Record:
    ttft: float | None = None
    e2e: float = 0.0
    completion_tokens: int = 0
    error: str | None = None


@dataclass
class Workload:
    base_url: str
    seed: int
    args: argparse.Namespace
    records: list[Record] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def system_prompt(self, c: int) -> str:
        rng = random.Random(self.seed * 1000 + c)
        return f"You are assistant {self.seed}-{c}. " + " ".join(rng.choice(WORDS) for _ in range(self.args.system_words))

    def run(self) -> float:
        """All conversations at once; the wall time."""
        together = threading.Barrier(self.args.conversations)
        threads = [threading.Thread(target=self.client, args=(c, together)) for c in range(self.args.conversations)]
        begun = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return time.perf_counter() - begun

    def client(self, c: int, together: threading.Barrier) -> None:
        rng = random.Random(self.seed * 1000 + 500 + c)
        history = [{"role": "system", "content": self.system_prompt(c)}]
        with httpx.Client(timeout=600) as http:
            together.wait()
            for turn in range(self.args.turns):
                history.append({"role": "user", "content": f"Question {turn}: tell me about {rng.choice(WORDS)}."})
                record, text = self.request(http, history)
                history.append({"role": "assistant", "content": text})
                with self.lock:
                    self.records.append(record)
                time.sleep(rng.uniform(0, 0.05))

    def request(self, http: httpx.Client, messages: list[dict]) -> tuple[Record, str]:
        body = {"model": "minisgl", "messages": messages, "max_tokens": self.args.max_tokens, "temperature": 0,
                "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
        record, parts = Record(), []
        begun = time.perf_counter()
        try:
            with http.stream("POST", f"{self.base_url}/v1/chat/completions", json=body) as resp:
                if resp.status_code != 200:
                    record.error = f"HTTP {resp.status_code}: {resp.read().decode()[:200]}"
                    return record, ""
                for line in resp.iter_lines():
                    if not line.startswith("data: {"):
                        continue
                    event = json.loads(line[6:])
                    if "error" in event:
                        record.error = event["error"]["message"]
                    for choice in event.get("choices") or []:
                        content = (choice.get("delta") or {}).get("content")
                        if content:
                            parts.append(content)
                            if record.ttft is None:
                                record.ttft = time.perf_counter() - begun
                    if event.get("usage"):
                        record.completion_tokens = event["usage"]["completion_tokens"]
        except httpx.HTTPError as exc:
            record.error = repr(exc)
        record.e2e = time.perf_counter() - begun
        return record, "".join(parts)


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(int(round(q * (len(ordered) - 1))), len(ordered) - 1)]


def counters(cluster) -> dict[str, list[float]]:
    return {name: [r.metric(name) for r in cluster.replicas]
            for name in ("minisgl_cache_hit_tokens_total", "minisgl_prompt_tokens_total", "minisgl_requests_total")}


def settled(cluster, before: dict[str, list[float]], sent: int, timeout: float = 30.0) -> dict[str, list[float]]:
    """The counters once every request sent is counted (they reach Triton with the next flush)."""
    deadline = time.monotonic() + timeout
    while True:
        now = counters(cluster)
        if sum(now["minisgl_requests_total"]) - sum(before["minisgl_requests_total"]) >= sent or \
                time.monotonic() > deadline:
            return now
        time.sleep(0.2)


def run_policy(cluster, policy: str, seed: int, args: argparse.Namespace, work: Path) -> dict:
    from minisgl_backend.testing.cluster import ExtraRouter

    with ExtraRouter([r.openai_url for r in cluster.replicas], policy, work / f"router-{policy}.log") as router:
        before = counters(cluster)
        workload = Workload(router.url, seed, args)
        wall = workload.run()
        after = settled(cluster, before, len(workload.records))
    delta = {k: [a - b for a, b in zip(after[k], before[k])] for k in after}
    ok = [r for r in workload.records if r.error is None]
    ttfts = [r.ttft for r in ok if r.ttft is not None]
    hits, prompt = sum(delta["minisgl_cache_hit_tokens_total"]), sum(delta["minisgl_prompt_tokens_total"])
    output = sum(r.completion_tokens for r in ok)
    return {"requests": len(workload.records), "failures": len(workload.records) - len(ok),
            "cache_hit_rate": round(hits / prompt, 4) if prompt else None, "cache_hit_tokens": int(hits),
            "prompt_tokens": int(prompt),
            "ttft_p50_ms": _ms(percentile(ttfts, 0.5)), "ttft_p99_ms": _ms(percentile(ttfts, 0.99)),
            "e2e_p50_ms": _ms(percentile([r.e2e for r in ok], 0.5)),
            "output_tok_per_s": round(output / wall, 1), "wall_s": round(wall, 2),
            "requests_per_replica": [int(n) for n in delta["minisgl_requests_total"]]}


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from benchmarks.online_serving import BENCH_MODEL, default_model
    from minisgl_backend.testing.cluster import ServeCluster

    with tempfile.TemporaryDirectory(prefix="cluster-routing-") as tmp:
        work = Path(tmp)
        model = args.model or default_model(work)
        cluster = ServeCluster(model, work / "cluster", replicas=args.replicas, policy="round_robin",
                               settings=args.settings)
        try:
            cluster.start(timeout=900)
            warm = Workload(cluster.replicas[0].openai_url, 10**6, argparse.Namespace(**{**vars(args), "turns": 1}))
            for replica in cluster.replicas:  # each engine's first steps, outside the measurements
                warm.base_url = replica.openai_url
                warm.run()
            results = {policy: run_policy(cluster, policy, args.seed * 100 + i, args, work)
                       for i, policy in enumerate(args.policies)}
        finally:
            cluster.stop()
            try:
                cluster.wait_exit(120)
            finally:
                cluster.cleanup()
    report = {"benchmark": "cluster_routing", "model": args.model or f"random llama {BENCH_MODEL}",
              "replicas": args.replicas, "conversations": args.conversations, "turns": args.turns,
              "system_words": args.system_words, "max_tokens": args.max_tokens, "settings": args.settings,
              "results": results}
    if "cache_aware" in results and "round_robin" in results and results["round_robin"]["cache_hit_tokens"]:
        report["cache_aware_over_round_robin_hit_tokens"] = round(
            results["cache_aware"]["cache_hit_tokens"] / results["round_robin"]["cache_hit_tokens"], 2)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
