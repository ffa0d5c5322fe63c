"""Write a tiny random-weight Llama / Qwen2 / Qwen3 HF folder (safetensors + tiny tokenizer).

    python -m minisgl_backend.tools.make_tiny_model OUT_DIR --arch qwen3 --num-kv-heads 1 --tie

Deterministic for a given seed. Weights are drawn with a large `initializer_range` so the
logits are well separated: greedy decoding does not flip on float noise, yet is not constant.
Norm weights and biases are perturbed away from 1 / 0 so that loading them wrongly shows.
"""

from __future__ import annotations

import argparse
import glob
import os
from typing import Any

import torch

ARCHS = ("llama", "qwen2", "qwen3")
INITIALIZER_RANGE = 0.3


def _config_class(arch: str):
    import transformers

    classes = {"llama": "LlamaConfig", "qwen2": "Qwen2Config", "qwen3": "Qwen3Config"}
    if arch not in classes:
        raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
    return getattr(transformers, classes[arch])


def make_tiny_model(
    out_dir: str,
    arch: str = "llama",
    num_kv_heads: int = 2,
    num_heads: int = 4,
    hidden_size: int = 64,
    num_layers: int = 2,
    intermediate_size: int = 128,
    tie_word_embeddings: bool = False,
    vocab_size: int | None = None,
    seed: int = 0,
    max_position_embeddings: int = 2048,
    rope_scaling: dict[str, Any] | None = None,
    initializer_range: float = INITIALIZER_RANGE,
    max_shard_size: str | int | None = None,
    extra_config: dict[str, Any] | None = None,
) -> str:
    """Save the model, tokenizer and chat template to `out_dir`; return `out_dir`.

    `rope_scaling`: e.g. {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
    "high_freq_factor": 4.0, "original_max_position_embeddings": 64}.
    `max_shard_size` (e.g. "100KB") splits the weights over several files plus an index.
    `extra_config`: more config fields, e.g. {"attention_bias": True, "mlp_bias": True} for llama.
    """
    from transformers import AutoModelForCausalLM

    from minisgl_backend.tools.tiny_tokenizer import save_tiny_tokenizer

    config_class = _config_class(arch)
    _remove_old_weights(out_dir)
    tokenizer = save_tiny_tokenizer(out_dir)
    eos_id = tokenizer.convert_tokens_to_ids(tokenizer.eos_token)
    if vocab_size is None:
        vocab_size = -(-len(tokenizer) // 64) * 64
    if vocab_size < len(tokenizer):
        raise ValueError(f"vocab_size {vocab_size} is smaller than the tokenizer's {len(tokenizer)} tokens")
    theta = 10000.0 if arch == "llama" else 1000000.0
    config = config_class(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=hidden_size // num_heads,
        max_position_embeddings=max_position_embeddings,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": theta, **(rope_scaling or {})},
        tie_word_embeddings=tie_word_embeddings,
        initializer_range=initializer_range,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
        architectures=[config_class.__name__.replace("Config", "ForCausalLM")],
        **(extra_config or {}),
    )
    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG state alone
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _perturb_norms_and_biases(model, seed)
    model.generation_config.eos_token_id = eos_id
    model.generation_config.pad_token_id = eos_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out_dir, **kwargs)
    return out_dir


def _remove_old_weights(out_dir: str) -> None:
    """A previous model in `out_dir` (maybe sharded differently) must not leave stale files."""
    for path in glob.glob(os.path.join(out_dir, "*.safetensors")) + glob.glob(os.path.join(out_dir, "*.index.json")):
        os.remove(path)


@torch.no_grad()
def _perturb_norms_and_biases(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed + 1)
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            param.copy_(1.0 + 0.2 * torch.randn(param.shape, generator=gen))
        elif name.endswith(".bias"):
            param.copy_(0.2 * torch.randn(param.shape, generator=gen))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out_dir")
    p.add_argument("--arch", choices=ARCHS, default="llama")
    p.add_argument("--num-heads", type=int, default=4)
    p.add_argument("--num-kv-heads", type=int, default=2)
    p.add_argument("--hidden-size", type=int, default=64)
    p.add_argument("--intermediate-size", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--tie", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--vocab", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-position-embeddings", type=int, default=2048)
    args = p.parse_args(argv)
    out = make_tiny_model(
        args.out_dir, arch=args.arch, num_kv_heads=args.num_kv_heads, num_heads=args.num_heads,
        hidden_size=args.hidden_size, num_layers=args.layers, intermediate_size=args.intermediate_size,
        tie_word_embeddings=args.tie, vocab_size=args.vocab, seed=args.seed,
        max_position_embeddings=args.max_position_embeddings,
    )
    print(f"wrote tiny {args.arch} model to {out}")


if __name__ == "__main__":
    main()
