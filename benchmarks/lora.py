"""Multi-LoRA: output tokens/s of one batch of requests spread over 1, 4 and 16 adapters, against
the same requests on the base model alone (an engine without LoRA), in one process. Prints one
JSON object.

Adapters are random ones in PEFT's format (`testing/lora.py`: every q/k/v/o/gate/up/down
projection, rank `--rank`, small entries so outputs stay the model's kind of text); every request is greedy with a fixed length. Each
round runs the base engine and then each adapter count on the LoRA engine (the order alternates
between rounds); the best round of each counts. `ratio`: tokens/s over the base engine's.

    python benchmarks/lora.py                                   # the default model, CPU
    python benchmarks/lora.py --settings device=cuda dtype=bfloat16 --requests 256 --max-tokens 256
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout, when run as a script

from minisgl_backend.checkout import DEFAULT_MODEL_SUBDIR, ROOT  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_adapters(model: str, count: int, rank: int, out: Path) -> dict[str, str]:
    from minisgl_backend.testing.lora import write_random_adapter

    return {f"lora{i}": write_random_adapter(model, out / f"lora{i}", TARGETS, rank=rank, alpha=rank, seed=i,
                                             scale=0.02) for i in range(count)}


def timed(llm, prompts: list[list[int]], params) -> float:
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - start
    assert all(o["finish_reason"] == "length" for o in outs), [o["error"] for o in outs if o["error"]]
    return sum(len(o["token_ids"]) for o in outs) / elapsed


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(ROOT / DEFAULT_MODEL_SUBDIR))
    p.add_argument("--settings", nargs="*", default=[], help="engine settings key=value (both engines)")
    p.add_argument("--adapters", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args(argv)

    import torch

    from minisgl_backend import LLM, SamplingParams

    settings = dict(s.split("=", 1) for s in args.settings)
    settings.setdefault("device", "cpu")
    settings.setdefault("dtype", "float32")
    rng = random.Random(0)
    prompts = [[rng.randrange(100, 20000) for _ in range(args.prompt_len)] for _ in range(args.requests)]
    most = max(args.adapters)
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_adapters(args.model, most, args.rank, Path(tmp))
        base = LLM(args.model, **settings)
        lora = LLM(args.model, lora_modules=paths, enable_lora=True, max_loras=most, max_lora_rank=args.rank,
                   **settings)

        def params(n: int | None) -> list:
            return [SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True,
                                   lora_name=None if n is None else f"lora{i % n}") for i in range(len(prompts))]

        runs = [("base", base, None)] + [(f"lora_{n}", lora, n) for n in args.adapters]
        for _, llm, n in runs:  # warm-up: every adapter loaded into its slot
            llm.generate(prompts[:most], params(n)[:most])
        best = {name: 0.0 for name, _, _ in runs}
        for r in range(args.rounds):
            for name, llm, n in (runs if r % 2 == 0 else runs[::-1]):
                best[name] = max(best[name], timed(llm, prompts, params(n)))
        base.shutdown()
        lora.shutdown()
    result = {"benchmark": "lora", "model": args.model, "settings": settings, "requests": args.requests,
              "prompt_len": args.prompt_len, "max_tokens": args.max_tokens, "rank": args.rank,
              "threads": torch.get_num_threads(),
              "tokens_per_s": {k: round(v, 1) for k, v in best.items()},
              "ratio": {k: round(v / best["base"], 3) for k, v in best.items() if k != "base"}}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
