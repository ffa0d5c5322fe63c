"""Random LoRA adapters in PEFT's folder format, written without PEFT (so the GPU host, which has
no package index, needs no more wheels): `adapter_config.json` + `adapter_model.safetensors`."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from minisgl_backend.lora.adapter import module_shape
from minisgl_backend.models.hf_config import read_arch_config

PROJECTIONS = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o", "gate_proj": "gate", "up_proj": "up",
               "down_proj": "down"}


def write_random_adapter(base: str, out: str | Path, targets: list[str], rank: int = 8, alpha: float = 16,
                         seed: int = 0, scale: float = 0.05) -> str:
    """An adapter of the model at `base` on `targets` (HF projection names) with random A and B
    (entries ~ N(0, scale^2)); returns its folder."""
    arch = read_arch_config(base)
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(arch.num_hidden_layers):
        for name in targets:
            inputs, outputs = module_shape(arch, PROJECTIONS[name])
            group = "mlp" if name in ("gate_proj", "up_proj", "down_proj") else "self_attn"
            key = f"base_model.model.model.layers.{layer}.{group}.{name}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, inputs, generator=generator) * scale
            tensors[f"{key}.lora_B.weight"] = torch.randn(outputs, rank, generator=generator) * scale
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "base_model_name_or_path": base, "r": rank, "lora_alpha": alpha,
              "target_modules": targets, "bias": "none", "lora_dropout": 0.0, "use_rslora": False}
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return str(out)
