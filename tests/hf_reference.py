"""Greedy reference outputs from `transformers` for the same weights and prompts."""

from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=8)
def _load(model_path: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(model_path)


def hf_greedy(model_path: str, prompt: str | list[int], max_new_tokens: int) -> list[int]:
    """Token ids `generate(do_sample=False)` produces, stopping at EOS like the engine does."""
    model, tokenizer = _load(model_path)
    ids = tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
    with torch.inference_mode():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             do_sample=False, max_new_tokens=max_new_tokens, min_new_tokens=0)
    new = out[0, len(ids):].tolist()
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    for i, t in enumerate(new):
        if t in eos:
            return new[:i + 1]
    return new
