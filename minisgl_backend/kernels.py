"""Which kernels run, decided once per engine before the model is built, from the settings
(`config.kernels`), the model's head size and the device / dtypes.

Every "can this kernel run here?" question (the device, the dtype, an installed package, the
GPU's capability, the compiled CPU library) is asked in this module and nowhere else: the kernel
modules run what they are given.

- layer ops (`layer_ops`): `auto`: flashinfer's fused kernels on CUDA in fp16 / bf16, with the
  attention prologue (q/k norm, rope, K/V store) in one Triton kernel where that kernel can run;
  the compiled C ops on a float32 CPU; else the torch reference. `torch`: the reference.
- attention (`attention_backend`): `auto`: flashinfer on CUDA (fp16 / bf16, head sizes 64 / 128 /
  256), the torch backend with the compiled paged attention kernel over a float32 CPU pool, else
  plain torch. A backend asked for by name that cannot run here is a `ConfigError` saying why.
- decode attention (`decode_attention`, flashinfer backend only): flashinfer's decode kernel, or
  `triton`, a paged decode kernel that reads the page table on the device and plans nothing on
  the host. `triton` is experimental: flashinfer stays the default until a GPU run decides.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass

import torch

from minisgl_backend.attention.base import AttentionBackend
from minisgl_backend.attention.cpu_kernels import PagedAttentionKernel, kernel_of
from minisgl_backend.attention.flashinfer_backend import FlashInferBackend
from minisgl_backend.attention.torch_backend import TorchAttentionBackend
from minisgl_backend.config import ConfigError, EngineConfig
from minisgl_backend.cpu import cpu_library
from minisgl_backend.kvcache import KVCache
from minisgl_backend.kvcache.pool import FP8_DTYPES
from minisgl_backend.models.attention_prologue import attention_prologue
from minisgl_backend.models.cpu_ops import CpuOps
from minisgl_backend.models.flashinfer_ops import FlashInferOps, PrologueKernel
from minisgl_backend.models.hf_config import ModelArchConfig
from minisgl_backend.models.torch_ops import LayerOps, TorchOps

logger = logging.getLogger(__name__)

HALF_DTYPES = (torch.float16, torch.bfloat16)
# Head sizes flashinfer's fa2 paged kernels are built and tested for (its AOT set); others may
# JIT-compile but are not relied on.
FLASHINFER_HEAD_DIMS = (64, 128, 256)


@dataclass(frozen=True)
class Target:
    """What the kernels run on: the device, the model's dtype, the KV cache's dtype, the head size."""

    device: torch.device
    dtype: torch.dtype
    kv_dtype: torch.dtype
    head_dim: int

    @classmethod
    def of(cls, config: EngineConfig, arch: ModelArchConfig) -> "Target":
        return cls(torch.device(config.device), getattr(torch, config.dtype_name),
                   getattr(torch, config.kv_dtype_name), arch.head_dim)


@dataclass(frozen=True)
class KernelChoice:
    """The engine's kernels: the model's layer ops and the attention backend to build."""

    layer_ops: LayerOps
    attention: str  # "flashinfer", "cpu" (the torch backend with the compiled kernel) or "torch"
    decode_attention: str  # the flashinfer backend's decode kernel: "flashinfer" or "triton"
    target: Target
    cpu_attention_kernel: PagedAttentionKernel | None = None  # set when attention is "cpu"

    @property
    def lora_kernel(self) -> bool:
        """The LoRA delta by the gathered Triton kernels (lora/kernel.py; graph-safe), else per
        run of tokens with torch matmuls (the CPU)."""
        return self.target.device.type == "cuda"

    def make_attention(self, kv_cache: KVCache, page_table: torch.Tensor, *, num_qo_heads: int,
                       num_kv_heads: int, max_batch_size: int) -> AttentionBackend:
        if self.attention == "flashinfer":
            return FlashInferBackend(kv_cache, page_table, num_qo_heads, num_kv_heads, self.target.head_dim,
                                     self.target.dtype, self.target.device, max_batch_size,
                                     decode_kernel=self.decode_attention)
        return TorchAttentionBackend(kv_cache, page_table, self.cpu_attention_kernel)


def choose_kernels(config: EngineConfig, arch: ModelArchConfig) -> KernelChoice:
    """The kernels this engine runs (raises `ConfigError` for a named backend that cannot run here)."""
    target = Target.of(config, arch)
    settings = config.kernels
    attention, cpu_kernel = choose_attention(settings.attention_backend, target)
    if attention == "flashinfer" and settings.decode_attention == "triton":
        problem = triton_decode_problem(target)
        if problem is not None:
            raise ConfigError(f"decode_attention 'triton' cannot run here: {problem}")
    return KernelChoice(choose_layer_ops(settings.layer_ops, target), attention, settings.decode_attention,
                        target, cpu_kernel)


def choose_layer_ops(name: str, target: Target) -> LayerOps:
    """`torch`: the reference; `auto`: flashinfer's kernels, else the compiled C ops, else torch."""
    if name == "torch":
        return TorchOps()
    problem = fused_ops_problem(target)
    if problem is None:
        return FlashInferOps(_prologue_kernel(target))
    if target.device.type == "cuda":
        logger.warning("decoder layers use unfused torch ops: %s", problem)
    elif target.device.type == "cpu" and target.dtype == torch.float32:
        library = cpu_library()
        if library is not None:
            return CpuOps(library)
    return TorchOps()


def _prologue_kernel(target: Target) -> PrologueKernel | None:
    problem = prologue_problem(target)
    if problem is None:
        return attention_prologue
    logger.warning("the attention prologue runs as separate kernels: %s", problem)
    return None


def choose_attention(name: str, target: Target) -> tuple[str, PagedAttentionKernel | None]:
    """("flashinfer" | "cpu" | "torch", the compiled CPU kernel for "cpu") for `attention_backend`."""
    if name in ("auto", "flashinfer"):
        problem = flashinfer_attention_problem(target)
        if problem is None:
            return "flashinfer", None
        if name == "flashinfer":
            raise ConfigError(f"attention_backend 'flashinfer' cannot run here: {problem}")
    if name in ("auto", "cpu"):
        problem = cpu_attention_problem(target)
        kernel = None if problem else cpu_attention_kernel()
        if kernel is not None:
            return "cpu", kernel
        if name == "cpu":
            raise ConfigError(f"attention_backend 'cpu' cannot run here: "
                              f"{problem or 'the kernel did not build (see the log)'}")
    return "torch", None


# ---------------------------------------------------------------------------- why a kernel cannot run


def fused_ops_problem(target: Target) -> str | None:
    """Why flashinfer's layer ops cannot run here, or None."""
    if target.device.type != "cuda":
        return "not on CUDA"
    if target.dtype not in HALF_DTYPES:
        return f"dtype {target.dtype} (the fused kernels take float16 / bfloat16)"
    return flashinfer_import_problem()


def prologue_problem(target: Target) -> str | None:
    """Why the Triton attention prologue cannot run beside flashinfer's layer ops here, or None."""
    if not triton_installed():
        return "triton is not installed"
    if target.head_dim < 2 or target.head_dim & (target.head_dim - 1):
        return f"head_dim {target.head_dim} is not a power of two"
    if target.dtype not in HALF_DTYPES or target.kv_dtype not in (target.dtype, *FP8_DTYPES):
        return f"dtype {target.dtype} with a KV cache of {target.kv_dtype}"
    return triton_fp8_problem(target.kv_dtype, target.device)


def flashinfer_attention_problem(target: Target) -> str | None:
    """Why the flashinfer attention backend cannot serve this model here, or None."""
    if target.device.type != "cuda":
        return "flashinfer runs on CUDA only"
    if target.dtype not in HALF_DTYPES:
        return f"flashinfer needs float16 or bfloat16, not {target.dtype}"
    if target.head_dim not in FLASHINFER_HEAD_DIMS:
        return f"flashinfer head_dim must be one of {FLASHINFER_HEAD_DIMS}, got {target.head_dim}"
    if target.kv_dtype not in (target.dtype, *FP8_DTYPES):
        return f"a KV cache of {target.kv_dtype} with a {target.dtype} model (the model's dtype or fp8 only)"
    return flashinfer_import_problem()


def triton_decode_problem(target: Target) -> str | None:
    """Why the Triton decode kernel (`attention/triton_decode.py`) cannot serve this model and KV
    cache here, or None (asked when the engine starts, not at the first decode step)."""
    if not triton_installed():
        return "decode_attention=triton needs the triton package (CUDA builds of torch bring it)"
    if target.head_dim < 16 or target.head_dim & (target.head_dim - 1):
        return f"head_dim {target.head_dim} is not a power of two >= 16"
    if target.dtype not in HALF_DTYPES:
        return f"dtype {target.dtype} (fp16 / bf16 only)"
    if target.kv_dtype not in (target.dtype, *FP8_DTYPES):
        return f"KV cache dtype {target.kv_dtype} with model dtype {target.dtype}"
    return triton_fp8_problem(target.kv_dtype, target.device)


def cpu_attention_problem(target: Target) -> str | None:
    """Why the compiled paged attention kernel cannot read this KV pool, or None."""
    if target.device.type != "cpu" or target.kv_dtype != torch.float32:
        return f"it takes a float32 KV pool on the CPU (here {target.kv_dtype} on {target.device})"
    return None


# ---------------------------------------------------------------------------- probes


def flashinfer_import_problem() -> str | None:
    """None when flashinfer imports (asked on CUDA only: it imports on a CPU machine, but none of
    its kernels run there)."""
    try:
        import flashinfer  # noqa: F401
    except Exception as exc:  # ImportError, or a broken CUDA toolchain underneath
        return f"flashinfer is not importable: {exc}"
    return None


def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_fp8_problem(kv_dtype: torch.dtype, device: torch.device | str) -> str | None:
    """Why a Triton kernel cannot load or store this KV dtype on `device`, or None: Triton has
    e4m3 only from sm_89 (Ada, Hopper) on; e5m2 and the other dtypes everywhere (and Triton's
    interpreter, on the CPU, converts any)."""
    device = torch.device(device)
    if kv_dtype != torch.float8_e4m3fn or device.type != "cuda":
        return None
    major, minor = gpu_capability(device.index if device.index is not None else torch.cuda.current_device())
    if (major, minor) < (8, 9):
        return f"an fp8 e4m3 KV cache in Triton kernels needs sm_89+ (this GPU is sm_{major}{minor}); use fp8_e5m2"
    return None


def gpu_capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def cpu_attention_kernel() -> PagedAttentionKernel | None:
    """The compiled paged attention kernel, or None where the CPU library cannot be built here
    (`cpu_library` warns once)."""
    library = cpu_library()
    return None if library is None else kernel_of(library)
