"""Deterministic request mixes for scheduler tests and benchmarks."""

from __future__ import annotations

import random
from dataclasses import dataclass

from minisgl_backend import SamplingParams


@dataclass
class Workload:
    prompts: list[list[int]]
    params: list[SamplingParams]


def shared_prefix_workload(n: int, vocab: int, max_prompt: int = 300, max_output: int = 64,
                           num_prefixes: int = 8, seed: int = 0, sampled_share: float = 0.3) -> Workload:
    """`n` prompts of 1..max_prompt tokens, many starting with one of a few shared prefixes;
    outputs of 1..max_output tokens, some greedy, some seeded sampling."""
    rng = random.Random(seed)
    token = lambda: rng.randrange(3, vocab)  # noqa: E731  (ids 0..2 are special tokens)
    prefixes = [[token() for _ in range(rng.randrange(8, max_prompt // 2))] for _ in range(num_prefixes)]
    prompts, params = [], []
    for _ in range(n):
        length = rng.randint(1, max_prompt)
        base = rng.choice(prefixes)[:length] if rng.random() < 0.7 else []
        prompts.append(base + [token() for _ in range(length - len(base))])
        max_tokens = rng.randint(1, max_output)
        if rng.random() < sampled_share:
            params.append(SamplingParams(max_tokens=max_tokens, temperature=0.8, top_k=50, seed=rng.randrange(2**31)))
        else:
            params.append(SamplingParams(max_tokens=max_tokens, temperature=0.0))
    return Workload(prompts, params)
