"""One dataclass tree for every engine knob.

`EngineConfig.from_flat(**kwargs)` accepts any leaf field by its own name (``page_size=16``),
which is how `LLM(...)` and the Triton ``config.pbtxt`` parameters build it; values may arrive
as strings (Triton parameters always do) and are converted to the field's type.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field, fields
from typing import Any, Mapping

from minisgl_backend.coerce import COERCERS, to_bool

_DTYPES = ("float32", "float16", "bfloat16", "auto")
_DEVICES = ("cpu", "cuda", "auto")
_POLICIES = ("fcfs", "lpm")
# KV cache storage: auto = the model's dtype; fp8 (= fp8_e4m3) and fp8_e5m2 halve the cache's bytes
# (twice the tokens in the same memory, half the K/V reads of a decode step) at a precision cost,
# unscaled (scale 1.0) as vLLM / SGLang store fp8 without calibrated scales
KV_CACHE_DTYPES = {"auto": None, "fp8": "float8_e4m3fn", "fp8_e4m3": "float8_e4m3fn", "fp8_e5m2": "float8_e5m2"}


class ConfigError(ValueError):
    """A configuration value is missing, of the wrong type or out of range."""


@dataclass
class ModelConfig:
    model_path: str = ""
    dtype: str = "auto"  # auto: bfloat16 on CUDA, float32 on CPU
    device: str = "auto"  # auto: cuda when available
    max_model_len: int = 0  # 0: the model's max_position_embeddings

    def validate(self) -> None:
        if not self.model_path:
            raise ConfigError("model_path is required: a local Hugging Face model folder")
        if not os.path.isdir(self.model_path):
            raise ConfigError(f"model_path {self.model_path!r} is not a folder")
        if self.dtype not in _DTYPES:
            raise ConfigError(f"dtype must be one of {_DTYPES}, got {self.dtype!r}")
        if self.device not in _DEVICES:
            raise ConfigError(f"device must be one of {_DEVICES}, got {self.device!r}")
        _require(self.max_model_len >= 0, "max_model_len must be >= 0")


@dataclass
class CacheConfig:
    page_size: int = 16
    max_total_tokens: int = 0  # KV pool capacity in tokens; 0: sized by mem_fraction (CUDA) or 65536 (CPU)
    mem_fraction: float = 0.85  # share of free GPU memory the KV pool may take (CUDA only)
    enable_prefix_cache: bool = True
    kv_cache_dtype: str = "auto"  # auto (the model's dtype) | fp8 | fp8_e4m3 | fp8_e5m2

    def validate(self) -> None:
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ConfigError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {self.kv_cache_dtype!r}")
        _require(self.page_size >= 1, "page_size must be >= 1")
        _require(self.max_total_tokens >= 0, "max_total_tokens must be >= 0")
        _require(0.0 < self.mem_fraction <= 1.0, "mem_fraction must be in (0, 1]")


@dataclass
class SchedulerConfig:
    max_running_requests: int = 256
    prefill_budget: int = 8192  # tokens per prefill batch
    chunk_size: int = 2048  # longest piece of one prompt in one batch
    enable_overlap: bool = True
    max_pending_requests: int = 4096
    # Online scheduling (scheduler/policy.py). Mixed steps: while requests decode, a step carries
    # their decode tokens plus prefill chunks up to `step_token_budget` tokens in all.
    enable_mixed_batches: bool = True
    step_token_budget: int = 512
    max_prefill_steps_in_a_row: int = 4  # mixed steps off: decode runs at least this often
    schedule_policy: str = "fcfs"  # fcfs | lpm (longest cached prefix first)
    lpm_min_queue: int = 8  # lpm orders the queue only from this length on (FCFS below)
    lpm_window: int = 128  # lpm looks at the oldest this many waiting requests
    max_wait_steps: int = 256  # a request waiting this many steps goes first (aging)

    def validate(self) -> None:
        _require(self.max_running_requests >= 1, "max_running_requests must be >= 1")
        _require(self.prefill_budget >= 1, "prefill_budget must be >= 1")
        _require(self.chunk_size >= 1, "chunk_size must be >= 1")
        _require(self.max_pending_requests >= 1, "max_pending_requests must be >= 1")
        _require(self.step_token_budget >= 1, "step_token_budget must be >= 1")
        _require(self.max_prefill_steps_in_a_row >= 1, "max_prefill_steps_in_a_row must be >= 1")
        _require(self.schedule_policy in _POLICIES,
                 f"schedule_policy must be one of {_POLICIES}, got {self.schedule_policy!r}")
        _require(self.lpm_min_queue >= 1, "lpm_min_queue must be >= 1")
        _require(self.lpm_window >= 1, "lpm_window must be >= 1")
        _require(self.max_wait_steps >= 1, "max_wait_steps must be >= 1")


@dataclass
class ParallelConfig:
    tp_size: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 0  # 0: pick a free port
    cpu_threads: int = 0  # torch threads per rank on CPU; 0: cores / tp_size (under Triton: one core fewer)
    # cores the ranks run on, shared out in order ("0-3,8"); empty: where the OS puts them (or,
    # under Triton on a CPU with the adapter's cpu_affinity=auto, the last cores)
    cpu_cores: str = ""

    def validate(self) -> None:
        _require(self.tp_size >= 1, "tp_size must be >= 1")
        _require(self.cpu_threads >= 0, "cpu_threads must be >= 0 (0: automatic)")
        if self.cpu_cores:
            from minisgl_backend.cpu_affinity import parse_cpu_list

            try:
                cores = parse_cpu_list(self.cpu_cores)
            except ValueError as exc:
                raise ConfigError(f"cpu_cores: {exc}") from None
            _require(len(cores) >= self.tp_size,
                     f"cpu_cores '{self.cpu_cores}' has {len(cores)} cores for {self.tp_size} ranks: one at least each")


@dataclass
class GraphConfig:
    enable_cuda_graph: bool = True
    cuda_graph_max_bs: int = 256

    def validate(self) -> None:
        _require(self.cuda_graph_max_bs >= 1, "cuda_graph_max_bs must be >= 1")


@dataclass
class FrontendConfig:
    stream_interval: int = 1  # ids per streamed response before the end (more when the sender lags)

    def validate(self) -> None:
        _require(self.stream_interval >= 1, "stream_interval must be >= 1")


@dataclass
class FaultConfig:
    """Fault injection for reliability tests (-1: off). A request whose sampling seed equals
    `inject_sampling_fault_seed` makes the forward of every batch holding it raise, from its
    `inject_sampling_fault_step`-th output token on; one whose seed equals
    `inject_detokenize_fault_seed` makes its detokenization raise in the frontend."""

    inject_sampling_fault_seed: int = -1
    inject_sampling_fault_step: int = 0
    inject_detokenize_fault_seed: int = -1

    def validate(self) -> None:
        _require(self.inject_sampling_fault_step >= 0, "inject_sampling_fault_step must be >= 0")


@dataclass
class EngineConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    graph: GraphConfig = field(default_factory=GraphConfig)
    frontend: FrontendConfig = field(default_factory=FrontendConfig)
    fault: FaultConfig = field(default_factory=FaultConfig)
    seed: int = 0
    attention_backend: str = "auto"  # auto | torch | cpu | flashinfer
    layer_ops: str = "auto"  # auto (fused: flashinfer on CUDA, compiled C on a float32 CPU) | torch
    # with layer_ops auto: each layer's q/k norm, rope and K/V store in one kernel (Triton on
    # CUDA, compiled C on the CPU); false runs them as separate kernels
    fuse_attention_prologue: bool = True
    # decode attention on flashinfer: its kernel (a host plan() per step) or triton (reads the
    # page table on the device: no host planning, CUDA graphs replay without it)
    decode_attention: str = "flashinfer"
    # flashinfer's norm, SiLU-and-mul and attention kernels with programmatic dependent launch: auto
    # is flashinfer's default (on from sm_90), true / false force it (an A/B: PDL edges in a CUDA graph)
    flashinfer_pdl: str = "auto"

    def validate(self) -> "EngineConfig":
        for section in (self.model, self.cache, self.scheduler, self.parallel, self.graph, self.frontend,
                        self.fault):
            section.validate()
        if self.attention_backend not in ("auto", "torch", "cpu", "flashinfer"):
            raise ConfigError("attention_backend must be auto, torch, cpu or flashinfer")
        if self.layer_ops not in ("auto", "torch"):
            raise ConfigError("layer_ops must be auto or torch")
        if self.decode_attention not in ("flashinfer", "triton"):
            raise ConfigError("decode_attention must be flashinfer or triton")
        if self.flashinfer_pdl not in ("auto", "true", "false"):
            raise ConfigError("flashinfer_pdl must be auto, true or false")
        return self

    @property
    def device(self) -> str:
        if self.model.device != "auto":
            return self.model.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    @property
    def dtype_name(self) -> str:
        if self.model.dtype != "auto":
            return self.model.dtype
        return "bfloat16" if self.device == "cuda" else "float32"

    @property
    def pdl(self) -> bool | None:
        """`flashinfer_pdl` for the kernels: None leaves flashinfer's default."""
        return {"auto": None, "true": True, "false": False}[self.flashinfer_pdl]

    @property
    def kv_dtype_name(self) -> str:
        """The KV cache's torch dtype name: the model's, or the fp8 format `kv_cache_dtype` names."""
        return KV_CACHE_DTYPES[self.cache.kv_cache_dtype] or self.dtype_name

    @classmethod
    def from_flat(cls, values: Mapping[str, Any] | None = None, **kwargs: Any) -> "EngineConfig":
        """Build from leaf field names (``page_size``, ``tp_size``, ``model_path``...)."""
        merged = {**(values or {}), **kwargs}
        config = cls()
        leaves = _leaf_index(config)
        for name, raw in merged.items():
            if name == "model":
                name = "model_path"
            if name == "disable_overlap":
                name, raw = "enable_overlap", not _convert(raw, bool, name)
            if name not in leaves:
                raise ConfigError(f"unknown engine setting {name!r}; known: {', '.join(sorted(leaves))}")
            owner, ftype = leaves[name]
            setattr(owner, name, _convert(raw, ftype, name))
        if _env_flag("MINISGL_DISABLE_OVERLAP_SCHEDULING"):
            config.scheduler.enable_overlap = False
        return config.validate()

    def to_flat(self) -> dict[str, Any]:
        return {name: getattr(owner, name) for name, (owner, _) in _leaf_index(self).items()}

    def replace(self, **kwargs: Any) -> "EngineConfig":
        return EngineConfig.from_flat({**self.to_flat(), **kwargs})


def _leaf_index(config: EngineConfig) -> dict[str, tuple[Any, type]]:
    index: dict[str, tuple[Any, type]] = {}
    for f in fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            for leaf in fields(value):
                index[leaf.name] = (value, _field_type(leaf))
        else:
            index[f.name] = (config, _field_type(f))
    return index


def _field_type(f: dataclasses.Field) -> type:
    return {"int": int, "float": float, "bool": bool, "str": str}[str(f.type)]


def _convert(raw: Any, ftype: type, name: str) -> Any:
    try:
        return COERCERS[ftype](raw)
    except ValueError:
        raise ConfigError(f"setting {name!r} expects {ftype.__name__}, got {raw!r}") from None


def _env_flag(name: str) -> bool:
    try:
        return to_bool(os.environ.get(name, "0"))
    except ValueError:
        return False


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)
