"""Speculative decoding (n-gram drafts): tokens/s and steps per output token with and without it,
at 1, 4, 16 and 64 streams, in-process and through tritonserver. Prints one JSON object.

Workloads (greedy; every output is checked to be the same with speculation as without):
  repeat  the default model (build/models/smollm2) asked to repeat or edit a passage: its output
          repeats its input, so prompt lookup drafts it
  free    the default model on open questions: outputs that do not repeat their prompt
  loop    a random 8-layer 512-wide Llama whose small weights make greedy outputs loop, on
          looping prompts

In-process, one engine runs every configuration of a workload: per stream count a warm-up,
then rounds of a closed loop of `streams` streams (each sends `--per-stream` requests, the next
as soon as the last ended), each round without and with speculation (who goes first alternates;
the prefix cache is flushed before each run), so both see the same machine load. `steps_per_token`: engine steps per output token of one stream (1.0 without
speculation). Through tritonserver: one server per setting, `--triton-streams` gRPC streams.

    python benchmarks/speculative.py                                     # every workload, CPU
    python benchmarks/speculative.py --workloads repeat free --streams 1 --triton-streams 1
    python benchmarks/speculative.py --settings device=cuda dtype=bfloat16 --streams 1 4 16 64
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout, when run as a script

from minisgl_backend.checkout import DEFAULT_MODEL_SUBDIR, ROOT  # noqa: E402

PASSAGES = [
    "The lighthouse stood at the edge of the cliff for more than a hundred years. Every night its keeper "
    "climbed the spiral stairs, trimmed the wick and polished the great lens until it shone. Ships far out "
    "at sea saw the light sweep across the water and knew that the rocks were near. In winter the storms "
    "were so strong that the whole tower seemed to shake, but the light never went out.",
    "def area(width, height):\n    \"\"\"Return the area of a rectangle.\"\"\"\n    if width < 0 or height < 0:\n"
    "        raise ValueError(\"negative size\")\n    return width * height\n\n\ndef perimeter(width, height):\n"
    "    \"\"\"Return the perimeter of a rectangle.\"\"\"\n    return 2 * (width + height)\n\n\n"
    "print(area(3, 4), perimeter(3, 4))\n",
    "Photosynthesis is the process by which green plants use sunlight to make food. The leaves take in "
    "carbon dioxide from the air and water from the soil. Using the energy of light, they turn these into "
    "sugar and release oxygen. The sugar feeds the plant, and the oxygen is what animals breathe.",
    "To make a cup of tea, boil fresh water in a kettle. Warm the teapot with a little hot water, then "
    "pour it away. Put one spoon of tea leaves in the pot for each cup. Pour the boiling water over the "
    "leaves and let them steep for three to five minutes. Pour the tea through a strainer into the cup.",
]
REPEAT_ASKS = ["Repeat the following text exactly, word for word:\n\n{}",
               "Copy this text without changing anything:\n\n{}",
               "Rewrite the following text, replacing every 'the' with 'THE' and changing nothing else:\n\n{}"]
FREE_ASKS = ["Write a short story about a dragon who is afraid of the dark.", "Explain how vaccines work.",
             "What are the main causes of climate change?", "Give me five tips for a job interview.",
             "Describe a day in the life of a medieval farmer.", "How does a computer processor work?",
             "Why is the sky blue? Explain it to a child.", "Write a poem about autumn leaves."]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(ROOT / DEFAULT_MODEL_SUBDIR), help="the repeat / free workloads' model")
    p.add_argument("--workloads", nargs="+", default=["repeat", "free", "loop"], choices=["repeat", "free", "loop"])
    p.add_argument("--streams", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--rounds", type=int, default=2, help="runs of each setting per stream count")
    p.add_argument("--per-stream", type=int, default=2, help="requests each stream sends per run, one after another")
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--triton-streams", type=int, nargs="*", default=[1, 4], help="none: skip tritonserver")
    p.add_argument("--settings", nargs="*", default=[], help="engine settings key=value (both runs)")
    p.add_argument("--spec", nargs="*", default=["speculative_algorithm=ngram"],
                   help="the speculative run's extra settings")
    p.add_argument("--compare-overlap", action="store_true",
                   help="also: speculation in the overlap loop against the normal loop (per workload)")
    return p.parse_args()


# ---------------------------------------------------------------- workloads


def chat_prompts(model: str, kind: str, n: int) -> list[list[int]]:
    from minisgl_backend.tokenizer import load_tokenizer

    tok = load_tokenizer(model)
    if kind == "repeat":
        texts = [REPEAT_ASKS[i % len(REPEAT_ASKS)].format(PASSAGES[(i // len(REPEAT_ASKS)) % len(PASSAGES)])
                 for i in range(n)]
    else:
        texts = [FREE_ASKS[i % len(FREE_ASKS)] for i in range(n)]
    chats = [tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True, tokenize=False)
             for t in texts]
    return [tok.encode(c, add_special_tokens=False) for c in chats]


def loop_model() -> str:
    from minisgl_backend.tools.make_tiny_model import make_tiny_model

    out = tempfile.mkdtemp(prefix="minisgl-bench-loop-")
    return make_tiny_model(out, arch="llama", hidden_size=512, num_heads=8, num_kv_heads=4, num_layers=8,
                           intermediate_size=1536, vocab_size=8192, max_position_embeddings=4096,
                           initializer_range=0.02)


def loop_prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    prompts = []
    for _ in range(n):
        loop = [rng.randrange(3, 8192) for _ in range(rng.randint(3, 8))]
        prompts.append((loop * 64)[:rng.randint(64, 200)])
    return prompts


# ---------------------------------------------------------------- in-process


def run_round(llm, prompts: list[list[int]], streams: int, output_len: int, spec: bool) -> dict:
    """`prompts` in a closed loop of `streams` (a finished request's stream sends the next one at
    once), speculation on or off; the prefix cache flushed first."""
    from minisgl_backend import SamplingParams

    sched = llm.scheduler
    sched.spec.enabled = spec and sched.config.speculative.enabled
    sched.cache.flush()
    params = SamplingParams(max_tokens=output_len, temperature=0.0)
    outputs: list[list[int]] = [[] for _ in prompts]
    waiting = list(range(len(prompts)))[::-1]

    def send() -> None:
        i = waiting.pop()
        llm.router.submit(prompts[i], params, lambda out: collect(i, out), stream=False)

    def collect(i: int, out) -> None:
        outputs[i] += out.token_ids
        if out.finished and waiting:
            send()

    counts, steps = _spec_counts(sched), sched.num_steps
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(min(streams, len(prompts))):
        send()
    sched.run_until_idle()
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    assert sched.leaks() == [] and not waiting, sched.leaks()
    after = _spec_counts(sched)
    return {"seconds": seconds, "cpu_s": cpu, "steps": sched.num_steps - steps, "outputs": outputs,
            "spec": [b - a for a, b in zip(counts, after)]}


def _requests(prompts: list[list[int]], r: int, streams: int, per_stream: int) -> list[list[int]]:
    n = streams * per_stream
    return [prompts[(r * n + i) % len(prompts)] for i in range(n)]


def _spec_counts(sched) -> tuple[int, int, int]:
    s = sched.spec.stats
    return s.verify_rows, s.draft_tokens, s.accepted_tokens


def _summary(runs: list[dict], streams: int) -> dict:
    seconds, cpu = sum(r["seconds"] for r in runs), sum(r["cpu_s"] for r in runs)
    tokens = sum(len(o) for r in runs for o in r["outputs"])
    rows, drafted, accepted = (sum(r["spec"][i] for r in runs) for i in range(3))
    return {"output_tokens": tokens, "seconds": round(seconds, 3), "tok_per_s": round(tokens / seconds, 2),
            "tok_per_cpu_s": round(tokens / cpu, 2),
            "steps_per_token": round(sum(r["steps"] for r in runs) * streams / tokens, 3),
            "acceptance": round(accepted / drafted, 3) if drafted else None,
            "tokens_per_verify_step": round(1 + accepted / rows, 3) if rows else None}


def in_process(model: str, prompts: list[list[int]], args, settings: dict, spec: dict) -> list[dict]:
    """Per stream count: rounds of the closed loop, each without and with speculation."""
    from minisgl_backend import LLM

    llm = LLM(model, **settings, **spec, max_running_requests=max(args.streams))
    rows = []
    try:
        for streams in args.streams:
            runs: dict[bool, list[dict]] = {False: [], True: []}
            for on in (False, True):  # warm-up at this batch size (first runs of its shapes are slow)
                run_round(llm, prompts[:streams], streams, 32, on)
            for r in range(args.rounds):
                batch = _requests(prompts, r, streams, args.per_stream)
                for on in ((False, True) if r % 2 == 0 else (True, False)):  # alternate who goes first
                    runs[on].append(run_round(llm, batch, streams, args.output_len, on))
            same = sum(a == b for p, s in zip(runs[False], runs[True]) for a, b in zip(p["outputs"], s["outputs"]))
            plain, fast = _summary(runs[False], streams), _summary(runs[True], streams)
            rows.append({"streams": streams, "plain": plain, "speculative": fast,
                         "speedup": round(fast["tok_per_s"] / plain["tok_per_s"], 3),
                         "speedup_cpu_time": round(fast["tok_per_cpu_s"] / plain["tok_per_cpu_s"], 3),
                         "same_outputs": f"{same}/{sum(len(p['outputs']) for p in runs[False])}"})
        cost = llm.scheduler.spec.cost
        rows.append({"measured_step_ms": {"one_request": round(1e3 * cost.one, 2),
                                          "drafts_add": [round(1e3 * t, 2) for t in cost.extra[1:]]}})
    finally:
        llm.shutdown()
    return rows


def overlap_compare(model: str, prompts: list[list[int]], args, settings: dict, spec: dict) -> list[dict]:
    """Speculation in the overlap loop (a step that drafts waits for the previous step's ids) and
    in the normal loop, two engines alternating rounds, plus how often the overlap loop waited."""
    from minisgl_backend import LLM

    engines = {on: LLM(model, **{**settings, **spec, "enable_overlap": on}, max_running_requests=max(args.streams))
               for on in (True, False)}
    rows = []
    try:
        for streams in args.streams:
            runs: dict[bool, list[dict]] = {True: [], False: []}
            for on, llm in engines.items():
                run_round(llm, prompts[:streams], streams, 32, True)
            sched = engines[True].scheduler
            syncs, steps = sched.spec.num_overlap_syncs, sched.num_steps
            for r in range(args.rounds):
                batch = _requests(prompts, r, streams, args.per_stream)
                for on in ((True, False) if r % 2 == 0 else (False, True)):
                    runs[on].append(run_round(engines[on], batch, streams, args.output_len, True))
            overlap, normal = _summary(runs[True], streams), _summary(runs[False], streams)
            rows.append({"streams": streams, "overlap_tok_per_s": overlap["tok_per_s"],
                         "normal_tok_per_s": normal["tok_per_s"],
                         "ratio": round(overlap["tok_per_s"] / normal["tok_per_s"], 3),
                         "overlap_steps_that_waited_for_drafts": round(
                             (sched.spec.num_overlap_syncs - syncs) / max(sched.num_steps - steps, 1), 3)})
    finally:
        for llm in engines.values():
            llm.shutdown()
    return rows


# ---------------------------------------------------------------- tritonserver


def served(model: str, prompts: list[list[int]], args, settings: dict, spec: dict) -> list[dict]:
    from minisgl_backend.testing.triton import TritonServer, triton_available
    from minisgl_backend.triton.repository import make_model_repository

    if triton_available() is not None:
        return [{"skipped": triton_available()}]
    rows = {c: {"streams": c} for c in args.triton_streams}
    for name, extra in (("plain", {}), ("speculative", spec)):
        work = Path(tempfile.mkdtemp(prefix="minisgl-spec-bench-"))
        repo = make_model_repository(work / "repo", {"model_path": model, **settings, **extra,
                                                     "max_running_requests": max(args.triton_streams)})
        server = TritonServer(repo, work / "server.log").start()
        try:
            served_run(server, prompts[:1], 1, 1, 8)  # warm-up
            for c in args.triton_streams:
                rows[c][name] = served_run(server, prompts, c, args.rounds, args.output_len)
        finally:
            server.stop()
    for row in rows.values():
        row["speedup"] = round(row["speculative"]["tok_per_s"] / row["plain"]["tok_per_s"], 3)
    return list(rows.values())


def served_run(server, prompts: list[list[int]], streams: int, rounds: int, output_len: int) -> dict:
    import numpy as np

    from minisgl_backend.testing.triton import GrpcStream, grpc_inputs

    names = ("minisgl_spec_verify_steps_total", "minisgl_spec_draft_tokens_total", "minisgl_spec_accepted_tokens_total")
    before = [server.metric(n) for n in names]
    params = {"max_tokens": output_len, "temperature": 0.0}
    stream, tokens = GrpcStream(server.grpc_url), 0
    start = time.perf_counter()
    try:
        for r in range(rounds):
            ids = [f"r{r}-{i}" for i in range(streams)]
            for i, rid in enumerate(ids):
                prompt = np.asarray(prompts[(r * streams + i) % len(prompts)], dtype=np.int32)
                stream.send(rid, grpc_inputs(input_ids=prompt, stream=True, return_num_output_tokens=True), params)
            for entry in stream.collect(ids, timeout=600).values():
                assert entry["error"] is None, entry["error"]
                tokens += sum(int(o["num_output_tokens"].sum()) for o in entry["outputs"] if "num_output_tokens" in o)
    finally:
        stream.close()
    seconds = time.perf_counter() - start
    server.wait_idle()
    rows, drafted, accepted = (b - a for a, b in zip(before, (server.metric(n) for n in names)))
    return {"output_tokens": tokens, "seconds": round(seconds, 3), "tok_per_s": round(tokens / seconds, 2),
            "acceptance": round(accepted / drafted, 3) if drafted else None,
            "tokens_per_verify_step": round(1 + accepted / rows, 3) if rows else None}


# ---------------------------------------------------------------- main


def main() -> None:
    args = parse_args()
    settings = dict(kv.split("=", 1) for kv in args.settings)
    settings.setdefault("device", "cpu")
    spec = dict(kv.split("=", 1) for kv in args.spec)
    report: dict[str, Any] = {"settings": settings, "speculative": spec, "output_len": args.output_len,
                              "workloads": {}}
    loop_path = loop_model() if "loop" in args.workloads else None
    for kind in args.workloads:
        n = max(args.streams) * args.per_stream * args.rounds
        model = loop_path if kind == "loop" else args.model
        prompts = loop_prompts(n) if kind == "loop" else chat_prompts(model, kind, n)
        entry = {"model": Path(model).name if kind != "loop" else "random 8-layer 512-wide llama (looping)",
                 "in_process": in_process(model, prompts, args, settings, spec)}
        if args.compare_overlap:
            entry["overlap_vs_normal_loop"] = overlap_compare(model, prompts, args, settings, spec)
        if args.triton_streams and kind == "repeat":
            entry["tritonserver"] = served(model, prompts, args, settings, spec)
        report["workloads"][kind] = entry
        print(json.dumps({kind: entry}), file=sys.stderr, flush=True)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
