"""Structured-output throughput: a batch where half the requests carry a JSON schema against the
same batch unconstrained, on the same in-process LLM. Prints one JSON object.

Every request runs to max_tokens in both runs (the schema asks for a long array, so no grammar
completes early and ignore_eos holds the free ones), so both runs produce the same number of
tokens over the same steps; the ratio is constrained tokens/s over free tokens/s. The grammar is
compiled once before timing (its cold compile time is reported apart). Runs alternate
free / constrained `--repeats` times and the best of each is kept. `grammar_s` is the time
spent in grammar work itself (mask build, mask apply, matcher advance): on a shared machine it
says what the ratio alone cannot, how much of the run the grammar costs; `cpu_time_ratio` is
the same ratio over this process's CPU seconds, less disturbed by other load than wall time.

    python benchmarks/structured_output.py                          # default SmolLM2 model on CPU
    python benchmarks/structured_output.py --model DIR --device cuda --dtype bfloat16 --num-requests 64
"""

from __future__ import annotations

import argparse
import json
import os
import time

from minisgl_backend import LLM, SamplingParams
from minisgl_backend.checkout import DEFAULT_MODEL_SUBDIR, ROOT
SCHEMA = {"type": "object",
          "properties": {"name": {"type": "string", "maxLength": 16},
                         "scores": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 100},
                                    "minItems": 400}},
          "required": ["name", "scores"]}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(ROOT / DEFAULT_MODEL_SUBDIR))
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--num-requests", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--disable-overlap", action="store_true")
    return p.parse_args()


def prompts_for(llm: LLM, n: int) -> list[str]:
    topics = ["a student", "a football team", "a chess club", "a class of pupils"]
    return [llm.tokenizer.apply_chat_template(
        [{"role": "user", "content": f"Give the name and the test scores of {topics[i % len(topics)]} number {i} "
                                     "as JSON."}], tokenize=False, add_generation_prompt=True) for i in range(n)]


class GrammarTimer:
    """Seconds spent in grammar work (mask build, mask apply, matcher advance), by wrapping them."""

    def __init__(self, llm: LLM) -> None:
        import minisgl_backend.engine.engine as engine_module
        from minisgl_backend.grammar.matcher import GrammarState

        self.seconds = 0.0
        manager = llm.scheduler.grammar
        manager.mask_for = self._timed(manager.mask_for)
        engine_module.apply_mask = self._timed(engine_module.apply_mask)
        GrammarState.accept = self._timed(GrammarState.accept)

    def _timed(self, fn):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start
        return wrapper


def run(llm: LLM, prompts: list[str], params: list[SamplingParams]) -> tuple[float, float, int]:
    """(wall seconds, CPU seconds of this process, output tokens)."""
    start, cpu_start = time.perf_counter(), time.process_time()
    outs = llm.generate(prompts, params)
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    assert all(o["finish_reason"] == "length" for o in outs), [o["finish_reason"] for o in outs]
    return elapsed, cpu, sum(len(o["token_ids"]) for o in outs)


def main() -> None:
    args = parse_args()
    llm = LLM(args.model, device=args.device, dtype=args.dtype, max_total_tokens=16384,
              enable_overlap=not args.disable_overlap)
    base = dict(max_tokens=args.max_tokens, temperature=args.temperature, seed=0)
    free = SamplingParams(**base, ignore_eos=True)
    constrained = SamplingParams(**base, structured_outputs={"json": SCHEMA})
    prompts = prompts_for(llm, args.num_requests)
    half = [constrained if i % 2 == 0 else free for i in range(args.num_requests)]

    start = time.perf_counter()
    llm.scheduler.grammar.compiler.submit(constrained.structured_outputs).result()
    cold_compile_s = time.perf_counter() - start
    llm.generate(prompts[:2], [free, constrained])  # warm-up: allocator, matcher, kernels

    best = {"free": None, "half_constrained": None}
    runs = []
    syncs_before = llm.scheduler.grammar.num_overlap_syncs
    timer = GrammarTimer(llm)
    for _ in range(args.repeats):
        for name, params in (("free", [free] * args.num_requests), ("half_constrained", half)):
            timer.seconds = 0.0
            elapsed, cpu, tokens = run(llm, prompts, params)
            rate = tokens / elapsed
            runs.append({"run": name, "tokens_per_s": round(rate, 2), "tokens_per_cpu_s": round(tokens / cpu, 2)})
            if best[name] is None or rate > best[name]["tokens_per_s"]:
                best[name] = {"tokens_per_s": round(rate, 2), "seconds": round(elapsed, 3), "tokens": tokens,
                              "tokens_per_cpu_s": round(tokens / cpu, 2), "grammar_s": round(timer.seconds, 4)}
    syncs = llm.scheduler.grammar.num_overlap_syncs - syncs_before
    llm.shutdown()
    print(json.dumps({
        "model": os.path.basename(os.path.normpath(args.model)), "device": args.device, "dtype": args.dtype,
        "num_requests": args.num_requests, "constrained_requests": (args.num_requests + 1) // 2,
        "max_tokens": args.max_tokens, "overlap": not args.disable_overlap,
        "cold_compile_s": round(cold_compile_s, 3),
        "free": best["free"], "half_constrained": best["half_constrained"],
        "ratio": round(best["half_constrained"]["tokens_per_s"] / best["free"]["tokens_per_s"], 3),
        "cpu_time_ratio": round(best["half_constrained"]["tokens_per_cpu_s"] / best["free"]["tokens_per_cpu_s"], 3),
        "runs": runs,
        "overlap_syncs": syncs,
        "grammar_share_of_constrained_run": round(best["half_constrained"]["grammar_s"]
                                                  / best["half_constrained"]["seconds"], 4),
    }, indent=2))


if __name__ == "__main__":
    main()
