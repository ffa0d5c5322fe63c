"""A LoRA adapter in PEFT's format (`adapter_config.json` + `adapter_model.safetensors`), read
for one tensor-parallel rank.

Each target module gets A [r, in] and B [out, r]; its delta is `x A^T B^T * scaling`, scaling
`lora_alpha / r` (or `lora_alpha / sqrt(r)` with rsLoRA). Scaling is folded into B here. Under
tensor parallelism a rank keeps what its layer's shard needs: for the column-parallel modules
(q, k, v, gate, up) all of A and its rows of B; for the row-parallel ones (o, down) its columns of
A and all of B (their partial deltas are summed by the layer's all-reduce, like its output).
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field

import torch
from safetensors import safe_open

from minisgl_backend.models.hf_config import ModelArchConfig

MODULES = ("q", "k", "v", "o", "gate", "up", "down")
_HF_NAMES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
             "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
_KEY = re.compile(r"layers\.(\d+)\.(self_attn\.[qkvo]_proj|mlp\.(?:gate|up|down)_proj)\.lora_([AB])\.weight$")
_ROW_PARALLEL = ("o", "down")


class AdapterError(ValueError):
    """The adapter folder cannot be served; the message says why."""


@dataclass
class LoraAdapter:
    name: str
    path: str
    rank: int  # the largest rank of its modules
    # (layer, module) -> (A [r, in_local], B * scaling [out_local, r]) on the host
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    @property
    def modules(self) -> set[str]:
        return {module for _, module in self.weights}


def read_config(path: str) -> dict:
    config_path = os.path.join(path, "adapter_config.json")
    if not os.path.isfile(config_path):
        raise AdapterError(f"{path!r} is not a LoRA adapter folder: it has no adapter_config.json")
    with open(config_path, encoding="utf-8") as f:
        config = json.load(f)
    kind = config.get("peft_type", "LORA")
    if kind != "LORA":
        raise AdapterError(f"adapter {path!r} is a {kind} adapter; only LoRA is served")
    for flag, what in (("use_dora", "DoRA"), ("modules_to_save", "modules_to_save")):
        if config.get(flag):
            raise AdapterError(f"adapter {path!r} uses {what}, which is not supported")
    if config.get("bias", "none") != "none":
        raise AdapterError(f"adapter {path!r} trains biases (bias={config['bias']!r}); only bias='none' is served")
    return config


def check_adapter(name: str, path: str, arch: ModelArchConfig, max_rank: int) -> None:
    """Whether the folder can be served (AdapterError says why not), from its config and the
    tensors' shapes only: registering an adapter reads none of its weights."""
    read_config(path)
    _checked_pairs(name, path, arch, max_rank, weights=False)


def load_adapter(name: str, path: str, arch: ModelArchConfig, max_rank: int, tp_rank: int = 0,
                 tp_size: int = 1) -> LoraAdapter:
    """The adapter's weights for this rank, checked against the base model's shapes."""
    config = read_config(path)
    adapter = LoraAdapter(name, path, 0)
    for (layer, module), (a, b) in _checked_pairs(name, path, arch, max_rank, weights=True).items():
        rank = a.shape[0]
        scaling = _scaling(config, f"model.layers.{layer}.{_HF_NAMES[module]}", rank)
        adapter.weights[(layer, module)] = _shard(module, a.float(), b.float() * scaling, arch, tp_rank, tp_size)
        adapter.rank = max(adapter.rank, rank)
    return adapter


def _checked_pairs(name: str, path: str, arch: ModelArchConfig, max_rank: int,
                   weights: bool) -> dict[tuple[int, str], tuple]:
    """(layer, module) -> (A, B): the tensors, or with `weights` false only their shapes."""
    pairs = {}
    for (layer, module), pair in sorted(_read_tensors(path, weights).items()):
        if set(pair) != {"A", "B"}:
            raise AdapterError(f"adapter {path!r} has lora_{next(iter(pair))} of layer {layer} {module} "
                               f"without its pair")
        a, b = pair["A"], pair["B"]
        a_shape, b_shape = tuple(_shape(a)), tuple(_shape(b))
        if a_shape[0] > max_rank:
            raise AdapterError(f"adapter {name!r} has rank {a_shape[0]} (layer {layer} {module}); "
                               f"max_lora_rank is {max_rank}")
        _check_shapes(path, arch, layer, module, a_shape, b_shape)
        pairs[(layer, module)] = (a, b)
    if not pairs:
        raise AdapterError(f"adapter {path!r} holds no LoRA weights of q/k/v/o/gate/up/down projections")
    return pairs


def _shape(value) -> tuple[int, ...]:
    return tuple(value.shape) if isinstance(value, torch.Tensor) else tuple(value)


def _read_tensors(path: str, weights: bool) -> dict[tuple[int, str], dict[str, object]]:
    """(layer, module) -> {"A": ..., "B": ...}: tensors, or their shapes (no data read)."""
    file = os.path.join(path, "adapter_model.safetensors")
    if not os.path.isfile(file):
        raise AdapterError(f"{path!r} has no adapter_model.safetensors")
    out: dict[tuple[int, str], dict[str, object]] = {}
    with safe_open(file, framework="pt", device="cpu") as handle:
        for key in handle.keys():
            match = _KEY.search(key)
            if match is None:
                raise AdapterError(f"adapter {path!r} has tensor {key!r}, which is not a LoRA weight of a "
                                   "q/k/v/o/gate/up/down projection")
            module = next(m for m, hf in _HF_NAMES.items() if hf == match.group(2))
            value = handle.get_tensor(key) if weights else handle.get_slice(key).get_shape()
            out.setdefault((int(match.group(1)), module), {})[match.group(3)] = value
    return out


def _check_shapes(path: str, arch: ModelArchConfig, layer: int, module: str, a: tuple[int, ...],
                  b: tuple[int, ...]) -> None:
    inputs, outputs = module_shape(arch, module)
    if layer >= arch.num_hidden_layers or a[1] != inputs or b != (outputs, a[0]):
        raise AdapterError(f"adapter {path!r} does not fit the base model: layer {layer} {module} has A "
                           f"{a} and B {b}, the model needs [r, {inputs}] and "
                           f"[{outputs}, r] over {arch.num_hidden_layers} layers")


def module_shape(arch: ModelArchConfig, module: str) -> tuple[int, int]:
    """(in, out) features of the module in the base model, over all ranks."""
    q, kv = arch.num_attention_heads * arch.head_dim, arch.num_key_value_heads * arch.head_dim
    return {"q": (arch.hidden_size, q), "k": (arch.hidden_size, kv), "v": (arch.hidden_size, kv),
            "o": (q, arch.hidden_size), "gate": (arch.hidden_size, arch.intermediate_size),
            "up": (arch.hidden_size, arch.intermediate_size),
            "down": (arch.intermediate_size, arch.hidden_size)}[module]


def _scaling(config: dict, key: str, rank: int) -> float:
    """`lora_alpha` (or its `alpha_pattern` entry matching `key`, as PEFT matches them) over r or sqrt(r)."""
    alpha = config.get("lora_alpha", rank)
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", key):
            alpha = value
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def _shard(module: str, a: torch.Tensor, b: torch.Tensor, arch: ModelArchConfig, tp_rank: int,
           tp_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    if tp_size == 1:
        return a.contiguous(), b.contiguous()
    if module in _ROW_PARALLEL:
        n = a.shape[1] // tp_size
        return a[:, tp_rank * n:(tp_rank + 1) * n].contiguous(), b.contiguous()
    start, rows = _column_rows(module, arch, tp_rank, tp_size)
    return a.contiguous(), b[start:start + rows].contiguous()


def _column_rows(module: str, arch: ModelArchConfig, tp_rank: int, tp_size: int) -> tuple[int, int]:
    """(first row, rows) of B this rank holds: as the base layer shards its weight."""
    if module in ("k", "v"):
        heads = arch.num_key_value_heads
        local = max(1, heads // tp_size)
        return tp_rank * heads // tp_size * arch.head_dim, local * arch.head_dim
    _, out = module_shape(arch, module)
    rows = out // tp_size
    return tp_rank * rows, rows
