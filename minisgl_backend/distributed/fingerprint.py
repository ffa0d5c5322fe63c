"""What every node of a multi-node group must agree on, and the message that names a difference.

A node's fingerprint is the settings that shape the schedule or the model (everything but the
node-local ones below, with `device` and `dtype` resolved) plus its model folder's: config.json
and generation_config.json as parsed JSON, the sizes of the weight and tokenizer files. Node 0
compares every joining node's fingerprint with its own before any rank starts.
"""

from __future__ import annotations

import json
import os
from typing import Any

from minisgl_backend.config import EngineConfig

# Settings that may differ between nodes: where things are, how this host's processes run,
# timeouts, and what only node 0's frontend uses.
NODE_LOCAL_SETTINGS = frozenset({
    "model_path", "node_rank", "dist_init_addr", "node_addr", "node_join_timeout_s", "node_timeout_s",
    "dist_timeout_s", "cpu_threads", "cpu_cores", "mem_fraction", "stream_interval",
    "inject_detokenize_fault_seed",
})
_JSON_FILES = ("config.json", "generation_config.json")
_SIZED_SUFFIXES = (".safetensors", ".safetensors.index.json")
_SIZED_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "merges.txt",
                "special_tokens_map.json")


def node_fingerprint(config: EngineConfig) -> dict[str, Any]:
    """{"settings": {...}, "model": {...}} of this node (JSON-serialisable)."""
    settings = {k: v for k, v in config.to_flat().items() if k not in NODE_LOCAL_SETTINGS}
    settings["device"], settings["dtype"] = config.device, config.dtype_name
    return {"settings": settings, "model": model_fingerprint(config.model.model_path)}


def model_fingerprint(folder: str) -> dict[str, Any]:
    """config.json / generation_config.json (parsed) and the byte sizes of the weight and
    tokenizer files of a model folder."""
    entries: dict[str, Any] = {}
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            continue
        if name in _JSON_FILES:
            with open(path, encoding="utf-8") as f:
                entries[name] = json.load(f)
        elif name.endswith(_SIZED_SUFFIXES) or name in _SIZED_FILES:
            entries[name] = os.path.getsize(path)
    return entries


def fingerprint_mismatch(mine: dict[str, Any], theirs: dict[str, Any], node_rank: int) -> str | None:
    """None when node `node_rank`'s fingerprint (`theirs`) agrees with node 0's (`mine`), else a
    message naming the first difference."""
    for name in sorted(set(mine["settings"]) | set(theirs["settings"])):
        a, b = mine["settings"].get(name), theirs["settings"].get(name)
        if a != b:
            return f"node {node_rank} has {name}={_show(b)}, node 0 has {_show(a)}"
    return _model_mismatch(mine["model"], theirs["model"], node_rank)


def _model_mismatch(mine: dict[str, Any], theirs: dict[str, Any], node_rank: int) -> str | None:
    prefix = f"node {node_rank}'s model differs from node 0's:"
    for name in sorted(set(mine) | set(theirs)):
        if name not in theirs:
            return f"{prefix} {name} is missing on node {node_rank}"
        if name not in mine:
            return f"{prefix} {name} is only on node {node_rank}"
        a, b = mine[name], theirs[name]
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            key = next(k for k in sorted(set(a) | set(b), key=str) if a.get(k) != b.get(k))
            return f"{prefix} {name} has {key}={_show(b.get(key))} on node {node_rank}, {_show(a.get(key))} on node 0"
        return f"{prefix} {name} has {b} bytes on node {node_rank}, {a} on node 0"
    return None


def _show(value: Any) -> str:
    return "(unset)" if value is None else json.dumps(value) if not isinstance(value, str) else value
