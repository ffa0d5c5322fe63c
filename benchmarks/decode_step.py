"""Decode step time against the memory-bandwidth floor, host time per step, kernels per layer.

A decode step must read every weight once and the K/V of every request in the batch. The floor
is (weight bytes + KV bytes read) / measured copy bandwidth of the device; the report gives each
batch size's step time and the floor as a fraction of it (1.0 = at the bandwidth limit).

`step_ms` is one step alone: launched, then waited for (host and device time in series).
`loop_step_ms` is a step as the scheduler's loop runs them back to back, with nothing waiting
but the loop itself: from one decode launch to the next, in a second run of the same batch (with
the overlap loop, the host prepares a step while the device runs the one before; on the CPU the
two are the same). `fraction_of_floor` uses `step_ms`, `loop_fraction_of_floor` `loop_step_ms`.

Next to it: `host_ms`, the CPU time of `Engine.forward` until it returns (metadata, planning,
graph launch, sampling launches; on CUDA the GPU is still running then), and `kernels_per_layer`
/ `kernels_per_step` from a torch profile of one decode step. On CUDA these count CUDA kernels
(per layer from an eager step, whose launches are those a graph captures; per step from a
graph replay), and `graph_census` gives the replayed graph's nodes and edges by type and whether
it is a straight line (CUDA 12.6+ launches a straight line of kernel nodes in constant time); on
the CPU they count the aten ops that do work (leaf ops, views and allocations left out), the
proxy for kernels. On CUDA each row also lists `kernels_by_name` (the replayed
step's kernels grouped by name, by device time); `--host-profile` adds `host_profile` (a pass
under cProfile: each function's host microseconds per step).

    python benchmarks/decode_step.py                                  # CPU, small random model
    python benchmarks/decode_step.py --device cuda --dtype bfloat16 --shape qwen3-0.6b
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import json
import pstats
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.autograd.profiler import record_function
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.offline_throughput import build_model  # noqa: E402
from minisgl_backend import LLM, SamplingParams  # noqa: E402
from minisgl_backend.engine.graph import pick_graph_bs  # noqa: E402
from minisgl_backend.kvcache import KVCache  # noqa: E402

# aten ops that launch no kernel even when they are leaves of the profile
_NO_KERNEL = {"aten::empty", "aten::empty_like", "aten::empty_strided", "aten::_unsafe_view", "aten::resize_",
              "aten::detach", "aten::lift_fresh", "aten::alias", "aten::result_type", "aten::zeros_like",
              "aten::resolve_conj", "aten::resolve_neg"}
COMPILED = "cpu_kernel::"  # profiler ranges around the calls into the compiled CPU kernels


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


def _does_work(name: str) -> bool:
    if not name.startswith("aten::") or name in _NO_KERNEL:
        return False
    packet = getattr(torch.ops.aten, name[len("aten::"):], None)
    if packet is None:
        return True
    return not any(getattr(packet, o).is_view for o in packet.overloads())


def _cpu_kernels(evt) -> int:
    """The CPU stand-in for kernels under `evt`: calls into the compiled kernels (`COMPILED`
    ranges), and aten ops that do work with no such op below them (linear -> matmul -> mm: one)."""
    if evt.name.startswith(COMPILED):
        return 1
    below = sum(_cpu_kernels(c) for c in evt.cpu_children)
    return 1 if below == 0 and _does_work(evt.name) else below


@contextlib.contextmanager
def _compiled_kernel_ranges(engine):
    """Each call into the compiled CPU kernels (layer ops, decode attention, K/V store) inside a
    profiler range named after it: they are ctypes calls, which the profiler does not see."""
    targets = [(engine.model.ops, name) for name in dir(engine.model.ops) if name.endswith("_f32")]
    kernel = getattr(engine.attn, "kernel", None)
    if kernel is not None:
        targets += [(kernel, "fn"), (kernel, "store_fn")]
    saved = [(obj, name, getattr(obj, name)) for obj, name in targets]

    def labelled(fn, label):
        def call(*args):
            with record_function(COMPILED + label):
                return fn(*args)
        return call

    try:
        for obj, name, fn in saved:
            object.__setattr__(obj, name, labelled(fn, getattr(fn, "__name__", name)))
        yield
    finally:
        for obj, name, fn in saved:
            object.__setattr__(obj, name, fn)


def _cuda_kernels(evt) -> int:
    """CUDA kernels launched from `evt` or anything under it (memcpy / memset left out)."""
    own = sum(1 for k in evt.kernels if not k.name.lower().startswith(("memcpy", "memset")))
    return own + sum(_cuda_kernels(c) for c in evt.cpu_children)


_CPU, _CUDA = torch.autograd.DeviceType.CPU, torch.autograd.DeviceType.CUDA


def _is_kernel(evt) -> bool:
    return (evt.device_type == _CUDA and not evt.name.startswith("decoder_layer_")
            and not evt.name.lower().startswith(("memcpy", "memset")))


def _kernels_in_gpu_ranges(events) -> list[int]:
    """Per decoder layer, the CUDA kernels that started inside its GPU-side annotation range."""
    ranges = [e.time_range for e in events if e.device_type == _CUDA and e.name.startswith("decoder_layer_")]
    starts = sorted(e.time_range.start for e in events if _is_kernel(e))
    return [sum(1 for t in starts if r.start <= t < r.end) for r in ranges]


def _layer_ranges(model) -> list:
    """Profiler ranges around every decoder layer (forward hooks); returns the hook handles."""
    handles = []
    for i, layer in enumerate(model.model.layers):
        def enter(mod, args, name=f"decoder_layer_{i}"):
            mod._range = record_function(name)
            mod._range.__enter__()

        def leave(mod, args, out):
            mod._range.__exit__(None, None, None)

        handles += [layer.register_forward_pre_hook(enter), layer.register_forward_hook(leave)]
    return handles


class DecodeProbe:
    """Wraps `engine.forward`: times decode steps of one batch size and profiles one of them."""

    def __init__(self, engine, batch_size: int, cuda: bool) -> None:
        self.engine, self.batch_size, self.cuda = engine, batch_size, cuda
        self.real_forward = engine.forward
        self.step_s: list[float] = []
        self.host_s: list[float] = []
        self.model_s: list[float] = []
        self.seen = 0
        self.layer_profile = None
        self.step_profile = None

    def __call__(self, batch):
        if not (batch.is_decode and batch.size == self.batch_size):
            return self.real_forward(batch)
        self.seen += 1
        if self.seen == 4:
            return self._profiled(batch)
        start = time.perf_counter()
        result = self.real_forward(batch)
        launched = time.perf_counter()
        result.wait()
        self.host_s.append(launched - start)
        self.step_s.append(time.perf_counter() - start)
        return result

    def _profiled(self, batch):
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
        runner = self.engine.graph_runner
        self.engine.graph_runner = None  # eager: the per-layer launches, as a graph captures them
        handles = _layer_ranges(self.engine.model)
        try:
            with _compiled_kernel_ranges(self.engine), profile(activities=acts) as prof:
                result = self.real_forward(batch)
                result.wait()
        finally:
            for h in handles:
                h.remove()
            self.engine.graph_runner = runner
        self.layer_profile = prof
        if runner is not None:  # and the whole step as it really runs (graph replay)
            with profile(activities=acts) as prof:
                result.wait()
                result = self.real_forward(batch)
                result.wait()
            self.step_profile = prof
        else:
            self.step_profile = self.layer_profile
        return result

    def kernels_by_name(self, top: int = 25) -> list[dict]:
        """The step as run (graph replay on CUDA): its kernels grouped by name, most device time
        first, with how many ran and their total microseconds."""
        if not self.cuda:
            return []
        groups: dict[str, list[float]] = {}
        for e in self.step_profile.events():
            if _is_kernel(e):
                groups.setdefault(e.name, []).append(e.time_range.end - e.time_range.start)
        rows = sorted(groups.items(), key=lambda kv: -sum(kv[1]))
        return [{"name": name[:120], "count": len(us), "total_us": round(sum(us), 1)} for name, us in rows[:top]]

    def kernels(self) -> dict:
        count = _cuda_kernels if self.cuda else _cpu_kernels
        events = self.layer_profile.events()
        roots = [e for e in events if e.cpu_parent is None]
        layers = [e for e in events if e.name.startswith("decoder_layer_") and e.device_type == _CPU]
        per_layer = [count(e) for e in layers]
        if self.cuda:
            # kernels launched through a non-aten binding (flashinfer's) hang under no CPU op the
            # profiler links them to; the GPU-side copy of each layer range holds them all
            per_layer = _kernels_in_gpu_ranges(events) or per_layer
            step = sum(1 for e in self.step_profile.events() if _is_kernel(e))
        else:
            step = sum(count(e) for e in roots)
        return {"kernels_per_layer": statistics.median(per_layer) if per_layer else 0,
                "kernels_per_layer_max": max(per_layer, default=0), "kernels_per_step": step,
                "kernel_unit": "cuda kernels" if self.cuda else "aten ops doing work (CPU proxy)"}


class LoopProbe:
    """Wraps `engine.forward` without waiting on anything: the time from one decode step's launch
    to the next is a step as the scheduler's loop runs them (with overlap, the host prepares step
    N+1 while the device runs step N)."""

    def __init__(self, engine, batch_size: int) -> None:
        self.engine, self.batch_size = engine, batch_size
        self.real_forward = engine.forward
        self.launches: list[float] = []

    def __call__(self, batch):
        if batch.is_decode and batch.size == self.batch_size:
            self.launches.append(time.perf_counter())
        return self.real_forward(batch)

    def step_s(self) -> float:
        gaps = [b - a for a, b in zip(self.launches, self.launches[1:])]
        return statistics.median(gaps[2:] or gaps) if gaps else float("nan")


class HostProfileProbe:
    """Wraps `engine.forward` under cProfile for decode steps of one batch size (a pass of its
    own: the profiler slows the host, so no step time is taken from it). Where the host time of
    a step goes, by function, own time first."""

    def __init__(self, engine, batch_size: int) -> None:
        self.engine, self.batch_size = engine, batch_size
        self.real_forward = engine.forward
        self.profiler = cProfile.Profile()
        self.steps = 0

    def __call__(self, batch):
        if not (batch.is_decode and batch.size == self.batch_size):
            return self.real_forward(batch)
        self.steps += 1
        if self.steps <= 2:  # warm-up
            return self.real_forward(batch)
        self.profiler.enable()
        try:
            return self.real_forward(batch)
        finally:
            self.profiler.disable()

    def top(self, n: int = 20) -> list[dict]:
        stats = pstats.Stats(self.profiler)
        measured = max(1, self.steps - 2)
        rows = sorted(stats.stats.items(), key=lambda kv: -kv[1][2])[:n]  # by own time
        return [{"function": f"{Path(file).name}:{line}:{name}", "calls_per_step": round(nc / measured, 2),
                 "own_us_per_step": round(1e6 * tt / measured, 1), "total_us_per_step": round(1e6 * ct / measured, 1)}
                for (file, line, name), (_cc, nc, tt, ct, _callers) in rows]


def _generate_with(llm: LLM, probe, batch_size: int, context: int, steps: int) -> None:
    engine = llm.scheduler.engine
    engine.forward = probe
    try:
        prompts = [[3 + (i * 7 + j) % 200 for j in range(context)] for i in range(batch_size)]
        llm.generate(prompts, SamplingParams(max_tokens=steps, temperature=0, ignore_eos=True))
    finally:
        engine.forward = probe.real_forward


def measure(llm: LLM, batch_size: int, context: int, steps: int, cuda: bool, trace_dir: str = "",
            host_profile: bool = False) -> dict:
    engine = llm.scheduler.engine
    probe = DecodeProbe(engine, batch_size, cuda)
    _generate_with(llm, probe, batch_size, context, steps)
    loop = LoopProbe(engine, batch_size)
    _generate_with(llm, loop, batch_size, context, steps)
    # the first steps warm up allocator and caches
    step = statistics.median(probe.step_s[2:] or probe.step_s)
    host = statistics.median(probe.host_s[2:] or probe.host_s)
    weight_bytes = sum(p.numel() * p.element_size() for p in engine.model.parameters())
    kv_per_token = KVCache.bytes_per_token(engine.model.num_layers, engine.model.num_kv_heads_per_rank,
                                           engine.model.head_dim, engine.kv_dtype)
    kv_bytes = batch_size * (context + steps // 2) * kv_per_token
    row = {"batch_size": batch_size, "context": context, "step_ms": 1000 * step,
           "loop_step_ms": 1000 * loop.step_s(), "host_ms": 1000 * host,
           "weight_bytes": weight_bytes, "kv_bytes": kv_bytes}
    row.update(probe.kernels())
    if cuda:
        row["kernels_by_name"] = probe.kernels_by_name()
    runner = engine.graph_runner
    if runner is not None and runner.can_run(batch_size):
        row["graph_census"] = runner.census(pick_graph_bs(batch_size, runner.sizes))
    if host_profile:
        host = HostProfileProbe(engine, batch_size)
        _generate_with(llm, host, batch_size, context, steps)
        row["host_profile"] = host.top()
    _print_profile_tables(probe, batch_size, cuda)
    if trace_dir:
        Path(trace_dir).mkdir(parents=True, exist_ok=True)
        probe.layer_profile.export_chrome_trace(str(Path(trace_dir) / f"decode_bs{batch_size}_eager.json"))
        if probe.step_profile is not probe.layer_profile:
            probe.step_profile.export_chrome_trace(str(Path(trace_dir) / f"decode_bs{batch_size}_as_run.json"))
    return row


def _print_profile_tables(probe: DecodeProbe, batch_size: int, cuda: bool) -> None:
    """Where one step's time goes, to stderr: the eager step's ops by device time, and the
    graph-replayed step's host ops by CPU time (what `host_ms` is made of)."""
    device_key = "self_device_time_total" if cuda else "self_cpu_time_total"
    tables = [("eager step, by device time", probe.layer_profile, device_key)]
    if probe.step_profile is not probe.layer_profile:  # on the CPU (no graph) they are one profile
        tables.append(("step as run, by host time", probe.step_profile, "self_cpu_time_total"))
    for title, prof, key in tables:
        print(f"=== batch {batch_size}: {title}", file=sys.stderr)
        print(prof.key_averages().table(sort_by=key, row_limit=30, max_name_column_width=70), file=sys.stderr)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="")
    p.add_argument("--shape", default="small", choices=["small", "qwen3-0.6b"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 64, 256])
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--trace-dir", default="", help="write each batch size's profiled step as a chrome trace here")
    p.add_argument("--host-profile", action="store_true", help="one more pass per batch size under cProfile: "
                   "where a step's host time goes, by function (`host_profile` in each row)")
    p.add_argument("--settings", nargs="*", default=[], help="engine settings as key=value, e.g. "
                   "decode_attention=triton enable_overlap=false")
    args = p.parse_args()
    model = args.model or build_model(args.shape)
    max_bs = max(args.batch_sizes)
    cuda = args.device.startswith("cuda")
    llm = LLM(model, device=args.device, dtype=args.dtype, max_running_requests=max_bs,
              max_total_tokens=max_bs * (args.context + args.steps + 16), enable_prefix_cache=False,
              # every prompt prefilled before the first decode step: each measured step decodes
              # the whole batch (mixed steps would finish early requests before the last joins)
              enable_mixed_batches=False, max_prefill_steps_in_a_row=1 << 20,
              **dict(kv.split("=", 1) for kv in args.settings))
    bandwidth = copy_bandwidth(args.device)
    rows = []
    for bs in args.batch_sizes:
        row = measure(llm, bs, args.context, args.steps, cuda, args.trace_dir, args.host_profile)
        floor_s = (row["weight_bytes"] + row["kv_bytes"]) / bandwidth
        row.update(floor_ms=1000 * floor_s, fraction_of_floor=floor_s / (row["step_ms"] / 1000),
                   loop_fraction_of_floor=floor_s / (row["loop_step_ms"] / 1000),
                   tokens_per_s=bs / (row["step_ms"] / 1000), loop_tokens_per_s=bs / (row["loop_step_ms"] / 1000))
        rows.append(row)
    engine = llm.scheduler.engine
    print(json.dumps({"model": args.model or f"random:{args.shape}", "device": args.device, "dtype": args.dtype,
                      "layer_ops": engine.model.ops.name, "fused_prologue": engine.model.ops.fused_prologue,
                      "attention": type(engine.attn).__name__, "settings": args.settings,
                      "cuda_graph": engine.graph_runner is not None, "num_layers": engine.model.num_layers,
                      "copy_bandwidth_gb_s": bandwidth / 1e9, "results": rows}, indent=2))


if __name__ == "__main__":
    main()
