"""Host cost of launching a CUDA graph, by node count and node kind.

A decode step's `cudaGraphLaunch` is the largest single item of its host time (`decode_step.py`).
This captures graphs of N nodes of one kind (a torch elementwise op, a small cuBLAS GEMM, a Triton
kernel, flashinfer's RMSNorm) and times `replay()` on the host: the slope per node says whether
the cost is per node, and which kinds cost most. CUDA 12.6+ launches a straight line of kernel
nodes in constant time: the kinds `elementwise_and_one_memcpy` (one same-dtype `copy_`, a memcpy
node, among the kernels) and `elementwise_forked` (every 8th kernel on a side stream) show whether
one non-kernel node or a fork puts a graph back on the per-node path, and `flashinfer_rmsnorm`
whether the programmatic (PDL) edges that flashinfer's kernels add by default on sm_90 do; each
kind's `census` (engine/graph_census.py) says what its largest graph holds. The device runs the
graphs too, so the host waits for it every `--sync-every` replays (outside the timed calls) and
never runs far ahead.

    python benchmarks/graph_launch.py --nodes 32 128 320
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from minisgl_backend.engine.graph_census import census_of, instantiate_kept, new_graph  # noqa: E402


def _elementwise(x: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> None:
    x.add_(1.0)


def _gemm(x: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> None:
    torch.mm(x, w, out=y)


def _triton_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def add_one(ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        tl.store(ptr + offs, tl.load(ptr + offs, mask=mask) + 1.0, mask=mask)

    def launch(x: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> None:
        add_one[(triton.cdiv(x.numel(), 1024),)](x, x.numel(), BLOCK=1024)

    return launch


def _flashinfer_rmsnorm():
    """flashinfer's RMSNorm with its own launch defaults, as the decoder layers call it."""
    import flashinfer.norm

    def launch(x: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> None:
        flashinfer.norm.rmsnorm(x, w[0], out=y)

    return launch


def _repeat(op):
    def issue(x: torch.Tensor, w: torch.Tensor, y: torch.Tensor, nodes: int) -> None:
        for _ in range(nodes):
            op(x, w, y)

    return issue


def _with_one_memcpy(x: torch.Tensor, w: torch.Tensor, y: torch.Tensor, nodes: int) -> None:
    for i in range(nodes - 1):
        _elementwise(x, w, y)
        if i == nodes // 2:
            y.copy_(x)  # same dtype, contiguous, one device: cudaMemcpyAsync, a memcpy node


def _forked(side: torch.cuda.Stream):
    def issue(x: torch.Tensor, w: torch.Tensor, y: torch.Tensor, nodes: int) -> None:
        for i in range(nodes):
            if i % 8 == 7:  # a branch that joins back right away: the graph is no longer a line
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    y.add_(1.0)
                torch.cuda.current_stream().wait_stream(side)
            else:
                _elementwise(x, w, y)

    return issue


def launch_cost_us(issue, nodes: int, replays: int, sync_every: int) -> tuple[float, dict]:
    """Median host microseconds of one `replay()` of the graph `issue(x, w, y, nodes)` captures,
    and that graph's census."""
    x = torch.zeros(1, 1024, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(1024, 1024, device="cuda", dtype=torch.bfloat16) / 32
    y = torch.zeros(1, 1024, device="cuda", dtype=torch.bfloat16)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        issue(x, w, y, 3)
    torch.cuda.synchronize()
    graph = new_graph()
    with torch.cuda.graph(graph, stream=stream):
        issue(x, w, y, nodes)
    instantiate_kept(graph)
    times = []
    for i in range(replays):
        if i % sync_every == 0:
            torch.cuda.synchronize()
        start = time.perf_counter()
        graph.replay()
        times.append(time.perf_counter() - start)
    torch.cuda.synchronize()
    return 1e6 * statistics.median(times[sync_every:] or times), census_of(graph)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", type=int, nargs="+", default=[16, 64, 160, 320])
    p.add_argument("--replays", type=int, default=200)
    p.add_argument("--sync-every", type=int, default=4)
    args = p.parse_args()
    kinds = {"elementwise": _repeat(_elementwise), "elementwise_and_one_memcpy": _with_one_memcpy,
             "elementwise_forked": _forked(torch.cuda.Stream()), "cublas_gemm_1x1024x1024": _repeat(_gemm)}
    try:
        kinds["triton"] = _repeat(_triton_kernel())
    except Exception as exc:  # no triton on this host: the other kinds still run
        print(json.dumps({"triton": f"skipped: {exc}"}), file=sys.stderr)
    try:
        kinds["flashinfer_rmsnorm"] = _repeat(_flashinfer_rmsnorm())
    except Exception as exc:  # no flashinfer here
        print(json.dumps({"flashinfer": f"skipped: {exc}"}), file=sys.stderr)
    rows = []
    for name, issue in kinds.items():
        try:
            runs = {n: launch_cost_us(issue, n, args.replays, args.sync_every) for n in args.nodes}
        except Exception as exc:  # one kind that cannot run (a JIT build, a capture) leaves the others
            rows.append({"kind": name, "error": f"{type(exc).__name__}: {exc}"})
            continue
        costs = {n: cost for n, (cost, _) in runs.items()}
        lo, hi = min(args.nodes), max(args.nodes)
        slope = (costs[hi] - costs[lo]) / (hi - lo) if hi > lo else float("nan")
        rows.append({"kind": name, "replay_us_by_nodes": {str(n): round(c, 1) for n, c in costs.items()},
                     "us_per_node": round(slope, 3), "census": runs[hi][1]})
    print(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                      "cuda": torch.version.cuda, "results": rows}, indent=2))


if __name__ == "__main__":
    main()
