"""The serving layer's cost: the same closed-loop streaming workload in-process and through a
real tritonserver driven by perf_analyzer (C++ client, gRPC streaming).

The model is chosen so that the engine is faster than the serving layer (a micro random Llama
on CPU by default; any model on a GPU), so what differs between the two paths is what
tritonserver, the Python-backend stub and the frontend cost per token.

For each concurrency c: c streams are kept busy, each request a fixed prompt of token ids and
`--output-len` greedy tokens with `ignore_eos`. Reported per path: output tokens/s,
responses/s, TTFT and inter-token latency (ITL: per request, (last - first response) /
(tokens - 1)) p50 / p99, and CPU seconds per 1,000 output tokens of every process involved
(in-process: this process; served: tritonserver, the stub, the scheduler, perf_analyzer, and the
whole machine's busy time; and the scheduler's busy share of a core, `scheduler_busy_fraction`);
and the ratio of the served tokens/s to the in-process one.

Timings on a small shared machine swing by tens of percent from minute to minute: `--rounds N`
keeps both paths up and runs each concurrency in-process then served, N rounds over; the report
gives every round's ratio (`ratio_per_round`) and their median (`ratio_tok_per_s`).

On a CPU the in-process engine runs a torch thread per core, while under tritonserver each rank
gets one core fewer (`serving_cpu_threads`: that core runs tritonserver, the stub and the
client). So each round also runs the in-process path on the served engine's thread count
(`in_process_served_threads`) and reports `ratio_same_threads`: what the serving layer costs the
engine when both have the same threads, apart from the cores its processes take.

With `--floor` it also runs a no-op decoupled Python model (one sender thread streaming
`--output-len` one-character responses per request) through the same tritonserver and client:
what tritonserver and the stub cost per response before any of our code runs.

    python benchmarks/serving_overhead.py                        # micro model, 1 16 64 256 streams
    python benchmarks/serving_overhead.py --concurrency 64 --floor
    python benchmarks/serving_overhead.py --concurrency 64 256 --rounds 3
    python benchmarks/serving_overhead.py --model DIR --settings device=cuda --concurrency 1 64
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import resource
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

from minisgl_backend.checkout import ROOT
from minisgl_backend.config import adapter_setting_names
from minisgl_backend.procinfo import children
from minisgl_backend.testing.procinfo import cpu_seconds

PERF_ANALYZER = ROOT / "build" / "perf_analyzer" / "perf_analyzer"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="", help="local HF folder; default: a micro random Llama")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64, 256])
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--requests-per-stream", type=int, default=2, help="requests measured per stream")
    p.add_argument("--settings", nargs="*", default=[],
                   help="settings as key=value: engine settings go to both paths, the Triton adapter's "
                        "(config.AdapterConfig) to the served one only")
    p.add_argument("--rounds", type=int, default=1,
                   help="alternate the paths round after round (each concurrency in-process, then served; "
                        "both stay up, so on a GPU they share its memory) and report the median ratio")
    p.add_argument("--no-same-threads", action="store_true",
                   help="skip the in-process runs on the served engine's thread count (CPU)")
    p.add_argument("--skip-triton", action="store_true")
    p.add_argument("--skip-in-process", action="store_true")
    p.add_argument("--floor", action="store_true",
                   help="also run a no-op decoupled Python model (tritonserver + stub cost per response)")
    return p.parse_args()


def build_micro_model() -> str:
    from minisgl_backend.tools.make_tiny_model import make_tiny_model

    out = tempfile.mkdtemp(prefix="minisgl-micro-")
    return make_tiny_model(out, arch="llama", hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                           intermediate_size=128, vocab_size=512)


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"p50": 0.0, "p99": 0.0}
    values = sorted(values)
    pick = lambda q: values[min(len(values) - 1, int(q * len(values)))]  # noqa: E731
    return {"p50": statistics.median(values), "p99": pick(0.99)}


def summarize(requests: list[tuple[float, list[float]]], output_len: int, seconds: float,
              cpu: dict[str, float], cpu_tokens: int | None = None) -> dict[str, Any]:
    """requests: (sent, [response times]) per request (seconds); cpu: process -> CPU seconds spent
    while `cpu_tokens` tokens were generated (default: the requests' tokens)."""
    ttft = [resp[0] - sent for sent, resp in requests if resp]
    itl = [(resp[-1] - resp[0]) / (output_len - 1) for _, resp in requests if len(resp) > 1 and output_len > 1]
    tokens = len(requests) * output_len
    responses = sum(len(resp) for _, resp in requests)
    return {"requests": len(requests), "output_tok_per_s": tokens / seconds, "responses_per_s": responses / seconds,
            "tokens_per_response": tokens / max(responses, 1),
            "ttft_ms": {k: v * 1e3 for k, v in percentiles(ttft).items()},
            "itl_ms": {k: v * 1e3 for k, v in percentiles(itl).items()},
            "cpu_s_per_1k_tokens": {name: 1e3 * s / max(cpu_tokens or tokens, 1) for name, s in cpu.items()}}


# ---------------------------------------------------------------- in-process


def run_in_process(llm, prompt: list[int], output_len: int, concurrency: int, total: int) -> dict[str, Any]:
    """Closed loop through the offline API's router: a finished request starts the next one."""
    from minisgl_backend.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    records: list[tuple[float, list[float]]] = []
    started = [0]

    def start_one() -> None:
        record: tuple[float, list[float]] = (time.perf_counter(), [])
        records.append(record)
        started[0] += 1

        def consume(out) -> None:
            if out.token_ids:
                record[1].append(time.perf_counter())
            if out.finished and started[0] < total:
                start_one()

        llm.router.submit(prompt, params, consume)

    cpu0, t0 = time.process_time(), time.perf_counter()
    for _ in range(min(concurrency, total)):
        start_one()
    llm.scheduler.run_until_idle()
    seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    return summarize(records, output_len, seconds, {"in_process": cpu})


# ---------------------------------------------------------------- through tritonserver


def server_processes(server_pid: int) -> dict[str, list[int]]:
    """tritonserver, its Python-backend stub(s) and the scheduler processes under them."""
    stubs = children(server_pid)
    schedulers = [c for s in stubs for c in children(s)]
    return {"tritonserver": [server_pid], "stub": stubs, "scheduler": schedulers}


def cpu_snapshot(procs: dict[str, list[int]]) -> dict[str, float]:
    """CPU seconds of each server process group, of perf_analyzer (this process's finished
    children) and of the whole machine (`machine_busy`: every core's non-idle time)."""
    snap = {name: sum(cpu_seconds(p) for p in pids) for name, pids in procs.items()}
    child = resource.getrusage(resource.RUSAGE_CHILDREN)
    snap["perf_analyzer"] = child.ru_utime + child.ru_stime
    snap["machine_busy"] = machine_busy_seconds()
    return snap


def machine_busy_seconds() -> float:
    """Non-idle CPU seconds of all cores since boot (/proc/stat; idle and iowait excluded)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def perf_analyzer_run(url: str, data_file: Path, concurrency: int, count: int, export: Path,
                      model: str = "minisgl") -> None:
    cmd = [str(PERF_ANALYZER), "-m", model, "-u", url, "-i", "grpc", "--streaming",
           "--input-data", str(data_file), "--concurrency-range", str(concurrency),
           "--measurement-mode", "count_windows", "--measurement-request-count", str(count),
           "--stability-percentage", "1000000", "--max-trials", "3", "--profile-export-file", str(export)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"perf_analyzer failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")


def read_profile(export: Path) -> tuple[list[tuple[float, list[float]]], float]:
    """The requests of the experiment's measurement windows (perf_analyzer runs 3) and their length (s)."""
    data = json.loads(export.read_text())
    exp = data["experiments"][0]
    lo, hi = exp["window_boundaries"][0], exp["window_boundaries"][-1]
    requests = [(r["timestamp"] / 1e9, [t / 1e9 for t in r["response_timestamps"]])
                for r in exp["requests"] if lo <= r["timestamp"] and r["response_timestamps"]
                and r["response_timestamps"][-1] <= hi]
    return requests, (hi - lo) / 1e9


def write_input_data(work: Path, prompt: list[int], output_len: int) -> Path:
    params = json.dumps({"max_tokens": output_len, "temperature": 0, "ignore_eos": True})
    data_file = work / "input.json"
    data_file.write_text(json.dumps({"data": [{"input_ids": {"content": prompt, "shape": [len(prompt)]},
                                               "stream": [True], "sampling_parameters": [params]}]}))
    return data_file


@contextlib.contextmanager
def started_server(repo: Path, work: Path, data_file: Path) -> Iterator[Any]:
    """tritonserver on `repo`, warmed up by a short perf_analyzer run; stopped on exit."""
    from minisgl_backend.testing.triton import TritonServer

    server = TritonServer(repo, work / "server.log").start()
    try:
        perf_analyzer_run(server.grpc_url, data_file, 4, 4, work / "warmup.json")
        yield server
    finally:
        server.stop()


def profile_streams(server: Any, work: Path, data_file: Path, concurrency: int,
                    per_stream: int) -> tuple[list[tuple[float, list[float]]], float]:
    """perf_analyzer at `concurrency` streams: its measured requests and their seconds."""
    export = work / f"profile_{concurrency}.json"
    export.unlink(missing_ok=True)  # perf_analyzer refuses to overwrite an export
    perf_analyzer_run(server.grpc_url, data_file, concurrency, max(concurrency * per_stream // 3, 8), export)
    return read_profile(export)


def measure_served(server: Any, work: Path, data_file: Path, concurrency: int, per_stream: int,
                   output_len: int) -> dict[str, Any]:
    procs = server_processes(server.proc.pid)
    cpu0, tok0 = cpu_snapshot(procs), server.metric("minisgl_generation_tokens_total")
    started = time.monotonic()
    requests, seconds = profile_streams(server, work, data_file, concurrency, per_stream)
    wall = time.monotonic() - started
    cpu_mid = cpu_snapshot(procs)
    time.sleep(0.6)  # the metrics port refreshes its counters every few hundred ms
    cpu1, tok1 = cpu_snapshot(procs), server.metric("minisgl_generation_tokens_total")
    # CPU over the whole run (perf_analyzer's ramp-up and drain too), per token generated in it
    row = {"concurrency": concurrency, **summarize(requests, output_len, seconds,
                                                   {k: cpu1[k] - cpu0[k] for k in cpu0}, int(tok1 - tok0))}
    # the scheduler's share of one core over the run (it runs one torch thread under Triton): the
    # rest it spent blocked, waiting for requests to come back through the serving layer
    row["scheduler_busy_fraction"] = (cpu_mid["scheduler"] - cpu0["scheduler"]) / wall
    return row


# ---------------------------------------------------------------- the serving layer's floor

# A decoupled Python model that does nothing but stream `output_len` one-character responses per
# request from one sender thread (as the minisgl model does): what tritonserver and the
# Python-backend stub cost per response before any engine, router or detokenizer work.
FLOOR_MODEL = """
import collections, json, threading
import numpy as np
import triton_python_backend_utils as pb_utils
class TritonPythonModel:
    def initialize(self, args):
        params = json.loads(args["model_config"])["parameters"]
        self.n = int(params["floor_responses"]["string_value"])
        self.live, self.lock, self.wake = collections.deque(), threading.Lock(), threading.Event()
        threading.Thread(target=self.loop, daemon=True).start()
    def execute(self, requests):
        with self.lock:
            self.live.extend([r.get_response_sender(), 0] for r in requests)
        self.wake.set()
    def loop(self):
        while True:
            self.wake.wait(0.5)
            self.wake.clear()
            while True:
                with self.lock:
                    if not self.live:
                        break
                    item = self.live.popleft()
                item[1] += 1
                final = item[1] >= self.n
                out = pb_utils.Tensor("text_output", np.array([b"x"], dtype=np.object_))
                item[0].send(pb_utils.InferenceResponse(output_tensors=[out]),
                             flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL if final else 0)
                if not final:
                    with self.lock:
                        self.live.append(item)
"""


def run_floor(prompt: list[int], output_len: int, concurrencies: list[int], per_stream: int) -> list[dict[str, Any]]:
    """The floor model through the same tritonserver, perf_analyzer and workload."""
    from minisgl_backend.triton.repository import SOURCE, MODEL_NAME

    work = Path(tempfile.mkdtemp(prefix="minisgl-floor-"))
    folder = work / "repo" / MODEL_NAME  # the same name: the launcher waits for that model
    (folder / "1").mkdir(parents=True)
    config = (SOURCE / MODEL_NAME / "config.pbtxt").read_text()
    (folder / "config.pbtxt").write_text(
        config + f'\nparameters: {{ key: "floor_responses" value: {{ string_value: "{output_len}" }} }}\n')
    (folder / "1" / "model.py").write_text(FLOOR_MODEL)
    rows = []
    data_file = write_input_data(work, prompt, output_len)
    with started_server(work / "repo", work, data_file) as server:
        for c in concurrencies:
            procs = {k: v for k, v in server_processes(server.proc.pid).items() if k != "scheduler"}
            cpu0, t0 = cpu_snapshot(procs), time.monotonic()
            requests, seconds = profile_streams(server, work, data_file, c, per_stream)
            cpu1, elapsed = cpu_snapshot(procs), time.monotonic() - t0
            responses = sum(len(resp) for _, resp in requests)
            # CPU per response over the whole perf_analyzer run (it sends output_len per request)
            sent = responses / seconds * elapsed
            rows.append({"concurrency": c, "responses_per_s": responses / seconds,
                         "cpu_us_per_response": {k: 1e6 * (cpu1[k] - cpu0[k]) / max(sent, 1) for k in cpu0}})
    return rows


def main() -> None:
    args = parse_args()
    model = args.model or build_micro_model()
    settings = dict(kv.split("=", 1) for kv in args.settings)
    settings.setdefault("max_running_requests", str(max(256, max(args.concurrency))))
    prompt = [random.Random(0).randrange(3, 500) for _ in range(args.prompt_len)]
    report: dict[str, Any] = {"model": args.model or "micro llama (hidden 64, 2 layers, vocab 512)",
                              "settings": settings, "output_len": args.output_len, "prompt_len": args.prompt_len,
                              "rounds": args.rounds, "in_process": [], "in_process_served_threads": [],
                              "triton": []}
    if not args.skip_triton and not PERF_ANALYZER.exists():
        raise SystemExit(f"{PERF_ANALYZER} is missing: run 'make perf-analyzer'")
    with contextlib.ExitStack() as stack:
        adapter_settings = adapter_setting_names()
        engine_settings = {k: v for k, v in settings.items() if k not in adapter_settings}
        llm = None if args.skip_in_process else stack.enter_context(in_process_llm(model, engine_settings, prompt,
                                                                                  args.output_len))
        server = work = data_file = None
        if not args.skip_triton:
            from minisgl_backend.triton.repository import make_model_repository

            work = Path(tempfile.mkdtemp(prefix="minisgl-serving-"))
            repo = make_model_repository(work / "repo", {"model_path": model, **settings})
            data_file = write_input_data(work, prompt, args.output_len)
            server = stack.enter_context(started_server(repo, work, data_file))
        same_threads = None if args.no_same_threads or llm is None else served_threads_if_fewer(llm)
        # round after round, each concurrency in-process then served: a slow minute of the
        # machine hits both paths of a pair
        for r in range(args.rounds):
            for c in args.concurrency:
                if llm is not None:
                    total = max(c * args.requests_per_stream, 16)
                    report["in_process"].append({"round": r, "concurrency": c,
                                                 **run_in_process(llm, prompt, args.output_len, c, total)})
                    if same_threads:
                        with torch_threads(same_threads):
                            row = run_in_process(llm, prompt, args.output_len, c, total)
                        report["in_process_served_threads"].append({"round": r, "concurrency": c,
                                                                    "threads": same_threads, **row})
                if server is not None:
                    report["triton"].append({"round": r, **measure_served(server, work, data_file, c,
                                                                         args.requests_per_stream, args.output_len)})
    report.update(ratios(report["in_process"], report["triton"]))
    if report["in_process_served_threads"]:
        same = ratios(report["in_process_served_threads"], report["triton"])
        report.update(ratio_same_threads=same["ratio_tok_per_s"], ratio_same_threads_per_round=same["ratio_per_round"])
    if args.floor and PERF_ANALYZER.exists():
        report["floor"] = run_floor(prompt, args.output_len, args.concurrency, args.requests_per_stream)
    print(json.dumps(report, indent=2))


@contextlib.contextmanager
def in_process_llm(model: str, settings: dict[str, str], prompt: list[int], output_len: int) -> Iterator[Any]:
    from minisgl_backend import LLM

    llm = LLM(model, **settings)
    try:
        run_in_process(llm, prompt, output_len, 4, 8)  # warm-up
        yield llm
    finally:
        llm.shutdown()


def served_threads_if_fewer(llm: Any) -> int | None:
    """The torch threads a rank gets under tritonserver on this CPU, when fewer than in-process."""
    import torch
    from minisgl_backend.triton.adapter import serving_cpu_threads

    parallel = llm.config.parallel
    if llm.config.device != "cpu" or parallel.tp_size != 1:
        return None
    served = parallel.cpu_threads or serving_cpu_threads(1)
    return served if served < torch.get_num_threads() else None


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def ratios(in_process: list[dict[str, Any]], served: list[dict[str, Any]]) -> dict[str, Any]:
    """Served / in-process tokens/s per round and concurrency, and their median per concurrency."""
    inproc = {(row["round"], row["concurrency"]): row["output_tok_per_s"] for row in in_process}
    per_round: dict[str, list[float]] = {}
    for row in served:
        base = inproc.get((row["round"], row["concurrency"]))
        if base:
            per_round.setdefault(str(row["concurrency"]), []).append(round(row["output_tok_per_s"] / base, 3))
    return {"ratio_tok_per_s": {c: statistics.median(v) for c, v in per_round.items()},
            "ratio_per_round": per_round}


if __name__ == "__main__":
    main()
