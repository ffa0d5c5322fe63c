"""Multi-node TP on one machine: TP=2 with both ranks on one node vs one rank on each of two
loopback "nodes" (node 0 in this process's `LLM` on 127.0.0.1, node 1 `python -m
minisgl_backend.node` on 127.0.0.2), and what carrying a step's messages to another rank costs.

Engine rounds alternate the two layouts (the machine is noisy) and report, per layout, medians of
  tokens_per_s  a batch of `--batch` greedy requests, `--output-len` tokens each
  step_ms       one request alone: its decode time per token (one step at batch 1)

The step-sync rounds time, in two processes that step in lock-step (a small all_reduce per
step, as a forward's collectives do), one step with nothing sent and one step where rank 0 also
hands that step's message batch (`--payload` bytes) to the other rank:
  zmq_ipc / zmq_tcp   rank 0's relay (what the engine does: ipc:// on one node, tcp:// across)
  gloo_broadcast      a broadcast over the TP group's gloo group (SGLang's broadcast_pyobj: the
                      size, then the bytes), the alternative the relay was measured against
  gloo_broadcast_fixed  the same in one broadcast of a 4 KiB buffer (length + bytes)
and report each one's extra microseconds per step over the bare step, from the medians and from
the best of the interleaved rounds (the machine's noise only ever adds).

    python benchmarks/multinode.py [--rounds 3] [--batch 16] [--output-len 64] [--steps 1000]

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout, when run as a script

from minisgl_backend.checkout import ROOT  # noqa: E402

BENCH_MODEL = dict(arch="llama", hidden_size=256, num_heads=8, num_kv_heads=2, num_layers=4,
                   intermediate_size=768, max_position_embeddings=4096, vocab_size=512)
SETTINGS = dict(device="cpu", dtype="float32", page_size=16, max_total_tokens=16384, max_running_requests=64,
                cpu_threads=1)
ADDRS = ("127.0.0.1", "127.0.0.2")


def default_model() -> str:
    from minisgl_backend.tools.make_tiny_model import make_tiny_model

    folder = ROOT / "build" / "bench" / ("multinode-model-" + "-".join(str(v) for v in BENCH_MODEL.values()))
    if not (folder / "config.json").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        make_tiny_model(str(folder), **BENCH_MODEL)
    return str(folder)


# ---------------------------------------------------------------------------- engine rounds


def run_layout(model: str, layout: str, batch: int, output_len: int, work: Path) -> dict[str, float]:
    from minisgl_backend import LLM, SamplingParams
    from minisgl_backend.ports import free_port
    from minisgl_backend.testing.nodes import NodeProcess

    node = None
    settings = dict(SETTINGS, tp_size=2)
    if layout == "two_nodes":
        port = free_port()
        settings.update(nnodes=2, dist_init_addr=f"{ADDRS[0]}:{port}", node_addr=ADDRS[0])
        node = NodeProcess(model, 1, 2, f"{ADDRS[0]}:{port}", ADDRS[1], dict(SETTINGS, tp_size=2),
                           work / f"node1-{time.monotonic_ns()}.log")
    try:
        with LLM(model, **settings) as llm:
            params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
            llm.generate([[7] * 16], SamplingParams(max_tokens=4, temperature=0.0))  # warm-up
            start = time.perf_counter()
            llm.generate([[11] * 16], params)
            single = time.perf_counter() - start
            prompts = [[(13 + i) % 500 + 1] * 32 for i in range(batch)]
            start = time.perf_counter()
            llm.generate(prompts, params)
            batched = time.perf_counter() - start
        if node is not None and node.wait(60) != 0:
            raise RuntimeError(f"node 1 did not exit cleanly:\n{node.log()[-2000:]}")
    finally:
        if node is not None:
            node.stop()
    return {"tokens_per_s": batch * output_len / batched, "step_ms": 1000 * single / output_len}


# ---------------------------------------------------------------------------- step-sync rounds


def _sync_worker(rank: int, port: int, relay_ports: tuple[int, int], steps: int, payload: int,
                 results: "mp.Queue") -> None:
    import datetime

    import torch
    import torch.distributed as dist
    import zmq

    torch.set_num_threads(1)
    store = dist.TCPStore(ADDRS[0], port, None, rank == 0, datetime.timedelta(seconds=60))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=2)
    ctx = zmq.Context()
    folder = tempfile.mkdtemp(prefix="minisgl-bench-")
    endpoints = {"zmq_ipc": f"ipc://{folder}/relay", "zmq_tcp": f"tcp://{ADDRS[0]}:{relay_ports[0]}"}
    if rank == 0:
        store.set("ipc", endpoints["zmq_ipc"])
    endpoints["zmq_ipc"] = store.get("ipc").decode()
    socks = {}
    for name, endpoint in endpoints.items():
        sock = ctx.socket(zmq.PUSH if rank == 0 else zmq.PULL)
        sock.setsockopt(zmq.LINGER, 0)
        sock.bind(endpoint) if rank == 0 else sock.connect(endpoint)
        socks[name] = sock
    packet = bytes(payload)
    x = torch.ones(64)

    def step() -> None:
        dist.all_reduce(x)

    def zmq_step(name: str):
        def run() -> None:
            if rank == 0:
                socks[name].send(packet)
            else:
                socks[name].recv()
            step()
        return run

    def gloo_step() -> None:
        size = torch.tensor([payload if rank == 0 else 0], dtype=torch.int64)
        dist.broadcast(size, 0)
        buf = torch.frombuffer(bytearray(packet), dtype=torch.uint8) if rank == 0 else \
            torch.empty(int(size.item()), dtype=torch.uint8)
        dist.broadcast(buf, 0)
        step()

    fixed = torch.zeros(4096, dtype=torch.uint8)  # one broadcast: the length, then the bytes, padded

    def gloo_fixed_step() -> None:
        if rank == 0:
            fixed[:8] = torch.frombuffer(bytearray(payload.to_bytes(8, "little")), dtype=torch.uint8)
            fixed[8:8 + payload] = torch.frombuffer(bytearray(packet), dtype=torch.uint8)
        dist.broadcast(fixed, 0)
        step()

    variants = {"bare": step, "zmq_ipc": zmq_step("zmq_ipc"), "zmq_tcp": zmq_step("zmq_tcp"),
                "gloo_broadcast": gloo_step, "gloo_broadcast_fixed": gloo_fixed_step}
    timings: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(5):  # interleaved rounds
        for name, fn in variants.items():
            for _ in range(50):
                fn()
            dist.barrier()
            start = time.perf_counter()
            for _ in range(steps):
                fn()
            timings[name].append((time.perf_counter() - start) / steps * 1e6)
    if rank == 0:
        results.put(timings)
    dist.destroy_process_group()
    ctx.destroy(linger=0)


def step_sync_costs(steps: int, payload: int) -> dict[str, dict[str, float]]:
    from minisgl_backend.ports import free_ports

    port, relay = free_ports(1)[0], tuple(free_ports(2))
    spawn = mp.get_context("spawn")
    results = spawn.Queue()
    procs = [spawn.Process(target=_sync_worker, args=(r, port, relay, steps, payload, results)) for r in (0, 1)]
    for p in procs:
        p.start()
    timings = results.get(timeout=600)
    for p in procs:
        p.join(60)
    out: dict[str, dict[str, float]] = {}
    for stat, fn in (("median", statistics.median), ("best", min)):
        bare = fn(timings["bare"])
        out[stat] = {"bare_step_us": round(bare, 1),
                     **{f"{name}_extra_us": round(fn(v) - bare, 1) for name, v in timings.items() if name != "bare"}}
    return out


# ---------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="HF model folder (default: a random 4-layer 256-wide Llama in build/bench)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--steps", type=int, default=1000, help="steps per step-sync measurement")
    p.add_argument("--payload", type=int, default=256, help="bytes of a step's message batch (step-sync, "
                                                             "at most 4088)")
    args = p.parse_args(argv)
    model = args.model or default_model()
    work = Path(tempfile.mkdtemp(prefix="minisgl-multinode-bench-"))
    runs: dict[str, list[dict[str, float]]] = {"one_node": [], "two_nodes": []}
    for _ in range(args.rounds):
        for layout in runs:
            runs[layout].append(run_layout(model, layout, args.batch, args.output_len, work))
    report: dict[str, object] = {"model": model, "batch": args.batch, "output_len": args.output_len,
                                 "rounds": args.rounds, "tp_size": 2}
    for layout, rounds in runs.items():
        report[layout] = {key: round(statistics.median(r[key] for r in rounds), 3) for key in rounds[0]}
        report[layout]["per_round"] = rounds
    report["two_nodes_vs_one"] = {
        "tokens_per_s": round(report["two_nodes"]["tokens_per_s"] / report["one_node"]["tokens_per_s"], 3),
        "step_ms": round(report["two_nodes"]["step_ms"] / report["one_node"]["step_ms"], 3)}
    report["step_sync"] = {"payload_bytes": args.payload, **step_sync_costs(args.steps, args.payload)}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
