"""Read a Hugging Face `config.json` (transformers v4 or v5 layout) into `ModelArchConfig`."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

# architecture name in config.json -> model family implemented in llama.py
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass
class ModelArchConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # always has "rope_type" when set
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # bias on q/k/v
    o_proj_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # per-head RMSNorm on q and k before rope (Qwen3)
    eos_token_ids: list[int] = field(default_factory=list)
    bos_token_id: int | None = None
    torch_dtype: str | None = None  # the checkpoint's dtype as config.json states it

    @property
    def family(self) -> str:
        return SUPPORTED_ARCHITECTURES[self.architecture]


def read_arch_config(model_path: str) -> ModelArchConfig:
    """Parse `model_path/config.json` (+ `generation_config.json` for extra eos ids)."""
    path = os.path.join(model_path, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no config.json in model folder {model_path!r}")
    with open(path, encoding="utf-8") as f:
        cfg = json.load(f)
    return arch_config_from_dict(cfg, _read_generation_config(model_path))


def arch_config_from_dict(cfg: dict[str, Any], generation_cfg: dict[str, Any] | None = None) -> ModelArchConfig:
    arch = (cfg.get("architectures") or [None])[0]
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"unsupported model architecture {arch!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    family = SUPPORTED_ARCHITECTURES[arch]
    _reject_sliding_window(cfg, arch)
    hidden, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    rope_theta, rope_scaling = _read_rope(cfg)
    attention_bias = bool(cfg.get("attention_bias", False))
    return ModelArchConfig(
        architecture=arch,
        vocab_size=cfg["vocab_size"],
        hidden_size=hidden,
        intermediate_size=cfg["intermediate_size"],
        num_hidden_layers=cfg["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=cfg.get("head_dim") or hidden // heads,
        rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        max_position_embeddings=cfg.get("max_position_embeddings", 2048),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        attention_bias=True if family == "qwen2" else attention_bias,
        o_proj_bias=False if family == "qwen2" else attention_bias,
        mlp_bias=bool(cfg.get("mlp_bias", False)),
        qk_norm=family == "qwen3",
        eos_token_ids=_merge_ids(cfg.get("eos_token_id"), (generation_cfg or {}).get("eos_token_id")),
        bos_token_id=cfg.get("bos_token_id"),
        torch_dtype=cfg.get("dtype") or cfg.get("torch_dtype"),
    )


def _read_rope(cfg: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """v5: `rope_parameters` {rope_theta, rope_type, ...}; v4: `rope_theta` + `rope_scaling`."""
    params = dict(cfg.get("rope_parameters") or {})
    legacy = dict(cfg.get("rope_scaling") or {})
    theta = params.pop("rope_theta", None) or cfg.get("rope_theta") or 10000.0
    scaling = params or legacy
    rope_type = scaling.pop("rope_type", None) or scaling.pop("type", None) or "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"unsupported rope_type {rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
    if rope_type == "default":
        return float(theta), None
    return float(theta), {"rope_type": rope_type, **scaling}


def _reject_sliding_window(cfg: dict[str, Any], arch: str) -> None:
    window = cfg.get("sliding_window")
    uses_window = cfg.get("use_sliding_window", arch == "MistralForCausalLM")
    if uses_window and window and window < cfg.get("max_position_embeddings", 0):
        raise ValueError(f"{arch} with sliding-window attention (window {window}) is not supported")


def _read_generation_config(model_path: str) -> dict[str, Any]:
    path = os.path.join(model_path, "generation_config.json")
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _merge_ids(*values: int | list[int] | None) -> list[int]:
    ids: list[int] = []
    for value in values:
        for i in value if isinstance(value, list) else [value]:
            if i is not None and i not in ids:
                ids.append(int(i))
    return ids
