"""One dataclass tree for every setting.

`EngineConfig.from_flat(**kwargs)` accepts any leaf field by its own name (``page_size=16``),
which is how `LLM(...)` and the Triton ``config.pbtxt`` parameters build it; values may arrive
as strings (Triton parameters always do) and are converted to the field's type. `AdapterConfig`
holds the settings of the Triton adapter itself (they never reach the engine).

Each field's `doc` metadata is its user documentation: `docs/configuration.md`'s settings table
is generated from it (`python -m minisgl_backend.tools.settings_table`).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field, fields
from typing import Any, Iterator, Mapping

from minisgl_backend.coerce import COERCERS

_DTYPES = ("float32", "float16", "bfloat16", "auto")
_DEVICES = ("cpu", "cuda", "auto")
_POLICIES = ("fcfs", "lpm")
_ATTENTION_BACKENDS = ("auto", "torch", "cpu", "flashinfer")
_LAYER_OPS = ("auto", "torch")
_DECODE_ATTENTION = ("flashinfer", "triton")
_SPECULATIVE_ALGORITHMS = ("none", "ngram")
# KV cache storage: fp8 is stored unscaled (scale 1.0), as vLLM / SGLang store it without calibration
KV_CACHE_DTYPES = {"auto": None, "fp8": "float8_e4m3fn", "fp8_e4m3": "float8_e4m3fn", "fp8_e5m2": "float8_e5m2"}

# Settings that existed once: a config that still names one gets this answer instead of "unknown".
REMOVED_SETTINGS = {
    "sender_nice": "the response sender runs at the stub's priority",
    "sender_pacing": "the sender always rests as long as its last round took",
    "cpu_affinity": "use cpu_cores to pin the engine's ranks",
    "fuse_attention_prologue": "the attention prologue is fused wherever a kernel for it exists",
    "flashinfer_pdl": "flashinfer's kernels keep their own programmatic-dependent-launch default",
    "lpm_min_queue": "lpm orders every queue",
    "lpm_window": "lpm looks at the oldest 128 waiting requests",
    "disable_overlap": "use enable_overlap=false",
    "master_addr": "use dist_init_addr=HOST:PORT (node 0's address; empty: 127.0.0.1 and a free port)",
    "master_port": "use dist_init_addr=HOST:PORT (node 0's address; empty: 127.0.0.1 and a free port)",
}


class ConfigError(ValueError):
    """A configuration value is missing, of the wrong type or out of range."""


def setting(default: Any, doc: str) -> Any:
    """A config field with its user documentation."""
    return field(default=default, metadata={"doc": doc})


@dataclass
class ModelConfig:
    model_path: str = setting("", "local Hugging Face model folder (safetensors); empty under Triton: "
                                  "$MINISGL_MODEL_PATH, else the checkout's build/models/smollm2")
    dtype: str = setting("auto", "float32 | float16 | bfloat16 | auto (bfloat16 on CUDA, float32 on the CPU)")
    device: str = setting("auto", "cpu | cuda | auto (cuda when available)")
    max_model_len: int = setting(0, "longest prompt + output in tokens; 0: the model's max_position_embeddings")

    def validate(self) -> None:
        if not self.model_path:
            raise ConfigError("model_path is required: a local Hugging Face model folder")
        if not os.path.isdir(self.model_path):
            raise ConfigError(f"model_path {self.model_path!r} is not a folder")
        _require_choice("dtype", self.dtype, _DTYPES)
        _require_choice("device", self.device, _DEVICES)
        _require(self.max_model_len >= 0, "max_model_len must be >= 0")


@dataclass
class CacheConfig:
    page_size: int = setting(16, "tokens per KV page (the radix cache shares whole pages)")
    max_total_tokens: int = setting(0, "KV pool capacity in tokens; 0: sized by mem_fraction on CUDA, "
                                       "1 GiB of K/V on the CPU")
    mem_fraction: float = setting(0.85, "share of free GPU memory the KV pool may take (CUDA)")
    enable_prefix_cache: bool = setting(True, "reuse cached prompt prefixes (radix tree)")
    kv_cache_dtype: str = setting("auto", "auto (the model's dtype) | fp8 (= fp8_e4m3) | fp8_e5m2: half the "
                                          "bytes per token, unscaled")

    def validate(self) -> None:
        _require_choice("kv_cache_dtype", self.kv_cache_dtype, tuple(KV_CACHE_DTYPES))
        _require(self.page_size >= 1, "page_size must be >= 1")
        _require(self.max_total_tokens >= 0, "max_total_tokens must be >= 0")
        _require(0.0 < self.mem_fraction <= 1.0, "mem_fraction must be in (0, 1]")


@dataclass
class SchedulerConfig:
    max_running_requests: int = setting(256, "most requests decoding at once")
    prefill_budget: int = setting(8192, "most prompt tokens in one prefill step")
    chunk_size: int = setting(2048, "longest piece of one prompt in one step (chunked prefill)")
    enable_overlap: bool = setting(True, "schedule step N+1 while step N runs on the device")
    max_pending_requests: int = setting(4096, "longest queue; a request beyond it is refused")
    enable_mixed_batches: bool = setting(True, "a step carries decode tokens and prefill chunks together")
    step_token_budget: int = setting(512, "tokens of one mixed step")
    max_prefill_steps_in_a_row: int = setting(4, "with mixed steps off: decode runs at least this often")
    schedule_policy: str = setting("fcfs", "fcfs | lpm (longest cached prefix first)")
    max_wait_steps: int = setting(256, "a request waiting this many steps is admitted first (aging)")

    def validate(self) -> None:
        for name in ("max_running_requests", "prefill_budget", "chunk_size", "max_pending_requests",
                     "step_token_budget", "max_prefill_steps_in_a_row", "max_wait_steps"):
            _require(getattr(self, name) >= 1, f"{name} must be >= 1")
        _require_choice("schedule_policy", self.schedule_policy, _POLICIES)


@dataclass
class ParallelConfig:
    tp_size: int = setting(1, "tensor-parallel ranks (one process each), over all nodes")
    nnodes: int = setting(1, "hosts the tp_size ranks are spread over (tp_size / nnodes each); node 0 serves, "
                             "the others run `python -m minisgl_backend.node`")
    node_rank: int = setting(0, "this host's place among the nnodes (0: the Triton model)")
    dist_init_addr: str = setting("", "HOST:PORT of node 0 where the nodes meet (a TCP store); empty: "
                                      "127.0.0.1 and a free port (one node only)")
    node_addr: str = setting("", "this node's address the other nodes reach its ranks at (gloo); empty: "
                                 "what the hostname resolves to, or GLOO_SOCKET_IFNAME's interface")
    node_join_timeout_s: float = setting(300.0, "how long node 0 waits for every node to join (and a node "
                                                "for node 0) before the load fails")
    node_timeout_s: float = setting(5.0, "a node whose heartbeat stops this long counts as lost: the requests "
                                         "in flight fail and the group ends")
    dist_timeout_s: float = setting(600.0, "timeout of one torch.distributed collective")
    cpu_threads: int = setting(0, "torch threads per rank on the CPU; 0: cores / ranks per node (under Triton "
                                  "one core fewer)")
    cpu_cores: str = setting("", "cores this node's ranks are pinned to, shared out in order (\"0-3,8\"); "
                                 "empty: the OS decides")

    @property
    def ranks_per_node(self) -> int:
        return self.tp_size // self.nnodes

    @property
    def local_ranks(self) -> range:
        """The global ranks this node runs."""
        return range(self.node_rank * self.ranks_per_node, (self.node_rank + 1) * self.ranks_per_node)

    def init_address(self) -> tuple[str, int]:
        """(host, port) of `dist_init_addr`; port 0 when it is empty (a free one is picked)."""
        return split_host_port(self.dist_init_addr) if self.dist_init_addr else ("127.0.0.1", 0)

    def validate(self) -> None:
        _require(self.tp_size >= 1, "tp_size must be >= 1")
        _require(self.nnodes >= 1, "nnodes must be >= 1")
        _require(0 <= self.node_rank < self.nnodes, f"node_rank must be in [0, nnodes={self.nnodes}), "
                                                    f"got {self.node_rank}")
        _require(self.tp_size % self.nnodes == 0, f"tp_size {self.tp_size} does not divide over nnodes "
                                                  f"{self.nnodes}: every node runs tp_size / nnodes ranks")
        _require(self.nnodes == 1 or bool(self.dist_init_addr),
                 f"nnodes={self.nnodes} needs dist_init_addr=HOST:PORT, node 0's address the other nodes reach")
        if self.dist_init_addr:
            split_host_port(self.dist_init_addr)
        for name in ("node_join_timeout_s", "node_timeout_s", "dist_timeout_s"):
            _require(getattr(self, name) > 0, f"{name} must be > 0")
        _require(self.cpu_threads >= 0, "cpu_threads must be >= 0 (0: automatic)")
        if self.cpu_cores:
            from minisgl_backend.cpu_affinity import parse_cpu_list

            try:
                cores = parse_cpu_list(self.cpu_cores)
            except ValueError as exc:
                raise ConfigError(f"cpu_cores: {exc}") from None
            _require(len(cores) >= self.ranks_per_node, f"cpu_cores '{self.cpu_cores}' has {len(cores)} cores for "
                                                        f"{self.ranks_per_node} ranks: one at least each")


def split_host_port(address: str) -> tuple[str, int]:
    """`host:port` or `[v6]:port` -> (host, port); a ConfigError shows the expected form."""
    host, sep, port = address.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"dist_init_addr must be HOST:PORT (e.g. 10.0.0.1:29500), got {address!r}")
    return host, int(port)


@dataclass
class GraphConfig:
    enable_cuda_graph: bool = setting(True, "replay decode steps as CUDA graphs")
    cuda_graph_max_bs: int = setting(256, "largest decode batch captured as a graph")

    def validate(self) -> None:
        _require(self.cuda_graph_max_bs >= 1, "cuda_graph_max_bs must be >= 1")


@dataclass
class FrontendConfig:
    stream_interval: int = setting(1, "ids per streamed response before the end (more when the sender lags)")

    def validate(self) -> None:
        _require(self.stream_interval >= 1, "stream_interval must be >= 1")


@dataclass
class KernelConfig:
    attention_backend: str = setting("auto", "auto | torch | cpu | flashinfer (auto: flashinfer on CUDA, "
                                             "the compiled C kernel on a float32 CPU, else torch)")
    layer_ops: str = setting("auto", "auto (fused kernels where they run) | torch (the transformers-exact "
                                     "reference)")
    decode_attention: str = setting("flashinfer", "flashinfer | triton (experimental: a Triton decode kernel "
                                                  "that reads the page table on the device)")

    def validate(self) -> None:
        _require_choice("attention_backend", self.attention_backend, _ATTENTION_BACKENDS)
        _require_choice("layer_ops", self.layer_ops, _LAYER_OPS)
        _require_choice("decode_attention", self.decode_attention, _DECODE_ATTENTION)


@dataclass
class SpeculativeConfig:
    speculative_algorithm: str = setting("none", "none | ngram (draft from the request's own earlier tokens, verify "
                                                 "them in one step; outputs stay token for token the same)")
    speculative_num_tokens: int = setting(4, "ngram: most drafted tokens per request and step")
    ngram_min: int = setting(2, "ngram: shortest suffix of the request's tokens looked up")
    ngram_max: int = setting(4, "ngram: longest suffix looked up (the longest one found wins)")
    speculative_max_batch_size: int = setting(8, "ngram: speculate only while at most this many requests decode "
                                                 "(0: never); within it a request drafts only as far as its "
                                                 "drafts pay, by the step cost measured at start-up")

    @property
    def enabled(self) -> bool:
        return self.speculative_algorithm != "none" and self.speculative_max_batch_size > 0

    def validate(self) -> None:
        _require_choice("speculative_algorithm", self.speculative_algorithm, _SPECULATIVE_ALGORITHMS)
        _require(self.speculative_num_tokens >= 1, "speculative_num_tokens must be >= 1")
        _require(1 <= self.ngram_min <= self.ngram_max, "need 1 <= ngram_min <= ngram_max")
        _require(self.speculative_max_batch_size >= 0, "speculative_max_batch_size must be >= 0")


@dataclass
class LoraConfig:
    enable_lora: bool = setting(False, "serve LoRA adapters (multi_lora.json beside config.pbtxt, LLM(lora_modules=...), "
                                       "or loaded at run time)")
    max_loras: int = setting(4, "adapters resident on the device at once (loaded on first use, the least recently "
                                "used idle one evicted)")
    max_lora_rank: int = setting(16, "largest adapter rank served")
    lora_root: str = setting("", "adapters may be loaded at run time (/v1/load_lora_adapter) from folders under this "
                                 "one; empty: run-time loading is off")

    def validate(self) -> None:
        _require(self.max_loras >= 1, "max_loras must be >= 1")
        _require(1 <= self.max_lora_rank <= 512, "max_lora_rank must be in [1, 512]")
        if self.lora_root:
            _require(os.path.isdir(self.lora_root), f"lora_root {self.lora_root!r} is not a folder")


@dataclass
class FaultConfig:
    """Fault injection for reliability tests (-1: off)."""

    inject_sampling_fault_seed: int = setting(-1, "tests: a request with this seed makes its batches' "
                                                  "forward raise")
    inject_sampling_fault_step: int = setting(0, "tests: ... from this output token on")
    inject_detokenize_fault_seed: int = setting(-1, "tests: a request with this seed fails to detokenize")

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
    kernels: KernelConfig = field(default_factory=KernelConfig)
    speculative: SpeculativeConfig = field(default_factory=SpeculativeConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    fault: FaultConfig = field(default_factory=FaultConfig)
    seed: int = setting(0, "base seed of sampling (a request's own seed overrides it)")

    def validate(self) -> "EngineConfig":
        for section in self.sections():
            section.validate()
        return self

    def sections(self) -> list[Any]:
        return [getattr(self, f.name) for f in fields(self) if dataclasses.is_dataclass(getattr(self, f.name))]

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
    def kv_dtype_name(self) -> str:
        """The KV cache's torch dtype name: the model's, or the fp8 format `kv_cache_dtype` names."""
        return KV_CACHE_DTYPES[self.cache.kv_cache_dtype] or self.dtype_name

    @classmethod
    def from_flat(cls, values: Mapping[str, Any] | None = None, **kwargs: Any) -> "EngineConfig":
        """Build from leaf field names (``page_size``, ``tp_size``, ``model_path``...)."""
        config = cls()
        merged = {**(values or {}), **kwargs}
        if "model" in merged:
            merged["model_path"] = merged.pop("model")
        _assign(config, merged, "engine setting")
        return config.validate()

    def to_flat(self) -> dict[str, Any]:
        return {name: getattr(owner, name) for name, (owner, _) in _leaf_index(self).items()}

    def replace(self, **kwargs: Any) -> "EngineConfig":
        return EngineConfig.from_flat({**self.to_flat(), **kwargs})


@dataclass
class AdapterConfig:
    """Settings of the Triton Python-backend adapter (config.pbtxt parameters, not engine settings)."""

    cancel_poll_interval_ms: int = setting(50, "how often live requests are checked for cancellation")
    stats_interval_ms: int = setting(500, "how often the gauges are refreshed and recorded metrics sent")
    cancel_grace_s: float = setting(10.0, "a cancelled request the engine never confirms ends after this")

    def validate(self) -> "AdapterConfig":
        _require(self.cancel_poll_interval_ms >= 1, "cancel_poll_interval_ms must be >= 1")
        _require(self.stats_interval_ms >= 1, "stats_interval_ms must be >= 1")
        _require(self.cancel_grace_s > 0, "cancel_grace_s must be > 0")
        return self

    @classmethod
    def from_flat(cls, values: Mapping[str, Any]) -> "AdapterConfig":
        config = cls()
        _assign(config, values, "adapter setting")
        return config.validate()


def adapter_setting_names() -> set[str]:
    return {f.name for f in fields(AdapterConfig)}


def documented_settings() -> Iterator[tuple[str, str, Any, str]]:
    """(section, name, default, doc) of every setting, in the tree's order: the settings table."""
    for section in EngineConfig().sections() + [AdapterConfig()]:
        for f in fields(section):
            yield type(section).__name__, f.name, getattr(section, f.name), f.metadata["doc"]
    root = next(f for f in fields(EngineConfig) if f.name == "seed")
    yield "EngineConfig", "seed", root.default, root.metadata["doc"]


def _assign(config: Any, values: Mapping[str, Any], kind: str) -> None:
    leaves = _leaf_index(config)
    for name, raw in values.items():
        if name in REMOVED_SETTINGS:
            raise ConfigError(f"setting {name!r} was removed: {REMOVED_SETTINGS[name]}")
        if name not in leaves:
            raise ConfigError(f"unknown {kind} {name!r}; known: {', '.join(sorted(leaves))}")
        owner, ftype = leaves[name]
        setattr(owner, name, _convert(raw, ftype, name))


def _leaf_index(config: Any) -> dict[str, tuple[Any, type]]:
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


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _require_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    _require(value in choices, f"{name} must be one of {', '.join(choices)}, got {value!r}")
