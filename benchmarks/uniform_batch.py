"""A uniform batch on the CPU: 48 prompts of 16..128 tokens submitted at once, 48 output tokens
each, a tiny 4-layer Llama in float32. `transformers.generate` runs the same 48 as one batch
(every row makes the same number of tokens, so it wastes nothing on finished rows), so the
ratio measures the engine's per-step host cost: scheduler, batch metadata, sampling,
detokenization. Prints JSON; the ratio is output tok/s of `LLM.generate` over transformers'.

    python benchmarks/uniform_batch.py [--repeats 5] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from minisgl_backend import LLM, SamplingParams  # noqa: E402

NUM_PROMPTS, PROMPT_LEN, OUTPUT_LEN = 48, (16, 128), 48


def build_tiny_llama() -> str:
    from minisgl_backend.tools.make_tiny_model import make_tiny_model

    return make_tiny_model(tempfile.mkdtemp(prefix="minisgl-uniform-"), arch="llama", hidden_size=128,
                           num_heads=4, num_kv_heads=2, num_layers=4, intermediate_size=256)


def workload(vocab: int, seed: int = 0, lengths_seed: int = 0) -> list[list[int]]:
    """Prompt lengths come from `lengths_seed`, their tokens from `seed`: every repeat gets fresh
    tokens at the same lengths, so no repeat is served from the radix cache of an earlier one."""
    lengths = random.Random(lengths_seed)
    lens = [lengths.randint(*PROMPT_LEN) for _ in range(NUM_PROMPTS)]
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(n)] for n in lens]


def time_engine(llm: LLM, prompts: list[list[int]]) -> float:
    params = SamplingParams(max_tokens=OUTPUT_LEN, temperature=0.0, ignore_eos=True)
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - start
    assert all(len(o["token_ids"]) == OUTPUT_LEN for o in outs)
    return elapsed


def time_transformers(model, prompts: list[list[int]], pad: int) -> float:
    width = max(map(len, prompts))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=OUTPUT_LEN,
                             min_new_tokens=OUTPUT_LEN, pad_token_id=pad)
    elapsed = time.perf_counter() - start
    assert out.shape[1] == width + OUTPUT_LEN
    return elapsed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5, help="best of N interleaved runs of each side")
    p.add_argument("--profile", action="store_true", help="also print the engine's top functions (cProfile)")
    p.add_argument("--attention-backend", default="auto", choices=["auto", "torch", "cpu"],
                   help="torch: gather + SDPA for every row instead of the compiled paged kernel")
    p.add_argument("--layer-ops", default="auto", choices=["auto", "torch"],
                   help="torch: the HF-exact torch ops instead of the compiled RMSNorm / rope / SiLU ops")
    args = p.parse_args()
    from transformers import AutoModelForCausalLM

    path = build_tiny_llama()
    llm = LLM(path, device="cpu", dtype="float32", max_running_requests=NUM_PROMPTS, page_size=16,
              attention_backend=args.attention_backend, layer_ops=args.layer_ops)
    vocab = llm.scheduler.vocab_size
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    pad = hf.generation_config.pad_token_id or 0
    warm = workload(vocab, seed=10_000)[:4]
    time_engine(llm, warm)  # warm-up both sides
    time_transformers(hf, warm, pad)
    # interleaved, best of N each: a noisy neighbour slows both sides alike. Each repeat has fresh
    # prompt tokens (same lengths): a repeated prompt would be a prefix-cache hit for the engine only
    runs = []
    for r in range(args.repeats):
        prompts = workload(vocab, seed=r + 1)
        runs.append((time_engine(llm, prompts), time_transformers(hf, prompts, pad)))
    engine_s, hf_s = min(r[0] for r in runs), min(r[1] for r in runs)
    steps = OUTPUT_LEN  # one prefill (that samples the first token) + 47 decode steps
    tokens = NUM_PROMPTS * OUTPUT_LEN
    report = {"workload": {"prompts": NUM_PROMPTS, "prompt_len": list(PROMPT_LEN), "output_len": OUTPUT_LEN,
                           "model": "random llama, 4 layers, hidden 128", "dtype": "float32"},
              "torch_threads": torch.get_num_threads(),
              "attention": "compiled paged kernel" if llm.scheduler.engine.attn.kernel else "gather + SDPA",
              "layer_ops": llm.scheduler.engine.model.ops.name,
              "engine": {"seconds": engine_s, "output_tok_per_s": tokens / engine_s,
                         "ms_per_step": 1000 * engine_s / steps},
              "transformers": {"seconds": hf_s, "output_tok_per_s": tokens / hf_s,
                               "ms_per_step": 1000 * hf_s / steps},
              "ratio_vs_transformers": hf_s / engine_s}
    if args.profile:
        prof = cProfile.Profile()
        prof.runcall(time_engine, llm, workload(vocab, seed=args.repeats + 1))
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(30)
        report["profile_top"] = buf.getvalue().splitlines()[:60]
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
