"""The adapters a server knows by name (which of them are resident is the scheduler's business).

Names come from `multi_lora.json` beside a Triton model's config.pbtxt (`{"name": "/path"}`, as
Triton's vLLM backend reads it), from `LLM(..., lora_modules={...})`, or from a run-time load
(`/v1/load_lora_adapter`), which `lora_root` must allow. Every folder is checked when it is
registered (readable, LoRA, a rank within `max_lora_rank`, shapes that fit the base model), so a
bad adapter is refused by name, never discovered by a request.
"""

from __future__ import annotations

import os
import threading

from minisgl_backend.config import EngineConfig, LoraConfig
from minisgl_backend.lora.adapter import AdapterError, check_adapter
from minisgl_backend.messages import DropLoraMsg
from minisgl_backend.models.hf_config import ModelArchConfig, read_arch_config


def registry_for(config: EngineConfig, modules: dict[str, str] | None = None) -> "LoraRegistry | None":
    """The registry of a server with `config` (None without enable_lora), holding `modules`."""
    if not config.lora.enable_lora:
        if modules:
            raise AdapterError("LoRA adapters were given but enable_lora is off")
        return None
    registry = LoraRegistry(config.lora, read_arch_config(config.model.model_path))
    for name, path in (modules or {}).items():
        registry.add(name, path)
    return registry


class LoraRegistry:
    def __init__(self, config: LoraConfig, arch: ModelArchConfig) -> None:
        self.config = config
        self.arch = arch
        self._paths: dict[str, str] = {}
        self._lock = threading.Lock()

    @property
    def names(self) -> list[str]:
        with self._lock:
            return list(self._paths)

    def path(self, name: str) -> str:
        with self._lock:
            return self._paths[name]

    def check_request(self, name: str | None) -> str | None:
        """Why a request naming adapter `name` cannot be served (Triton's vLLM backend's words), or None."""
        if name is None:
            return None
        if not self.config.enable_lora:
            return "LoRA feature is not enabled."
        if name not in self.names:
            return f"LoRA {name} is not supported, we currently support {self.names}"
        return None

    def add(self, name: str, path: str, run_time: bool = False) -> None:
        """Register adapter `name` at `path` (AdapterError says why not)."""
        if not self.config.enable_lora:
            raise AdapterError("LoRA feature is not enabled.")
        if not name or not isinstance(name, str):
            raise AdapterError("an adapter needs a name")
        path = os.path.realpath(path)
        if run_time:
            self._check_under_root(path)
        check_adapter(name, path, self.arch, self.config.max_lora_rank)
        with self._lock:
            if name in self._paths:
                raise AdapterError(f"an adapter named {name!r} is already loaded (from {self._paths[name]!r})")
            self._paths[name] = path

    def listing(self) -> dict[str, str]:
        with self._lock:
            return dict(self._paths)

    def remove(self, name: str) -> str:
        with self._lock:
            if name not in self._paths:
                raise AdapterError(f"no adapter named {name!r} is loaded; loaded: {list(self._paths)}")
            return self._paths.pop(name)

    def _check_under_root(self, path: str) -> None:
        root = self.config.lora_root
        if not root:
            raise AdapterError("loading adapters at run time is off: set the lora_root setting to the folder "
                               "they may come from")
        root = os.path.realpath(root)
        if os.path.commonpath([root, path]) != root:
            raise AdapterError(f"{path!r} is outside lora_root ({root!r}): adapters load only from under it")


def unload_lora(router, name: str, send) -> None:
    """Forget adapter `name` in `router`'s registry and tell the scheduler to drop it; refused
    while requests of it are in flight."""
    if router.lora is None:
        raise AdapterError("LoRA feature is not enabled.")
    running = router.requests_of(name)
    if running:
        raise AdapterError(f"LoRA adapter {name!r} has {running} request(s) in flight: unload it once they are done")
    send(DropLoraMsg(router.lora.remove(name)))
