"""The CPU decode-attention kernel (`csrc/paged_decode.c`), compiled with the machine's C compiler
at first use and cached by a hash of its source, flags and CPU.

Decode rows read their keys and values straight from the paged pool: no gather of every row's
pages into a padded copy and no mask, which on the CPU cost more than the attention itself
(at 256 streams of a micro model the gather was 33 % and SDPA 26 % of the scheduler's time).
Loaded after torch, the library's libgomp is torch's own, so it runs on torch's threads.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).resolve().parent / "csrc" / "paged_decode.c"
# -ffast-math lets the exp loop vectorize (glibc's libmvec). It is given to the compile step
# only: linked with it, gcc < 13 adds crtfastmath.o to a shared library, whose constructor
# switches the whole process (torch included) to flush-denormals-to-zero.
COMPILE_FLAGS = ("-O3", "-march=native", "-ffast-math", "-fopenmp", "-fPIC", "-c")
LINK_FLAGS = ("-shared", "-fopenmp")
_ARGTYPES = ([ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p,
              ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p]
             + [ctypes.c_int64] * 4 + [ctypes.c_float, ctypes.c_int64, ctypes.c_void_p])


@dataclass(frozen=True)
class PagedDecodeKernel:
    """`out[b, h] = softmax(scale * q[b, h] . K[rows[b], :seq_lens[b]]) @ V[...]` over the pool."""

    fn: ctypes._CFuncPtr

    def __call__(self, q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, table: torch.Tensor,
                 rows: torch.Tensor, seq_lens: torch.Tensor, max_len: int, scale: float) -> torch.Tensor:
        """q [B, Hq, D] (rows and heads may be strided), pools [slots, Hkv, D] float32, table [R, W]
        int32 slot ids, rows / seq_lens [B] int64 -> [B, Hq, D]."""
        batch, num_heads, head_dim = q.shape
        assert q.dtype == k_pool.dtype == v_pool.dtype == torch.float32 and q.stride(2) == 1
        assert k_pool.is_contiguous() and v_pool.is_contiguous() and table.stride(1) == 1
        assert table.dtype == torch.int32 and rows.dtype == seq_lens.dtype == torch.int64
        rows, seq_lens = rows.contiguous(), seq_lens.contiguous()  # held until the call returns
        out = torch.empty(batch, num_heads, head_dim, dtype=torch.float32)
        failed = self.fn(q.data_ptr(), q.stride(0), q.stride(1), k_pool.data_ptr(), v_pool.data_ptr(),
                         table.data_ptr(), table.stride(0), rows.data_ptr(), seq_lens.data_ptr(),
                         batch, num_heads, k_pool.shape[1], head_dim, scale, max_len, out.data_ptr())
        if failed:
            raise MemoryError("paged decode attention: no memory for its score buffers")
        return out


@lru_cache(maxsize=None)
def paged_decode_kernel() -> PagedDecodeKernel | None:
    """The compiled kernel, or None (with a warning, once) where it cannot be built here."""
    try:
        library = _build()
    except (OSError, subprocess.SubprocessError, RuntimeError) as exc:
        logger.warning("CPU decode attention falls back to torch (gather + SDPA): %s", exc)
        return None
    fn = ctypes.CDLL(str(library)).paged_decode_attention_f32
    fn.argtypes, fn.restype = _ARGTYPES, ctypes.c_int
    return PagedDecodeKernel(fn)


def _build() -> Path:
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise RuntimeError("no C compiler (cc / gcc) on PATH")
    source = SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([source, " ".join(COMPILE_FLAGS + LINK_FLAGS).encode(), compiler.encode(),
                                     _cpu_model().encode()])).hexdigest()[:16]
    home = os.path.expanduser("~")  # "~" itself when there is no home: then only the temp folder
    folders = [Path(home) / ".cache" / "minisgl" / "kernels"] if home != "~" else []
    for folder in folders + [Path(tempfile.gettempdir()) / "minisgl-kernels"]:
        library = folder / f"paged_decode-{key}.so"
        if library.is_file():
            return library
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=folder) as tmp:  # several processes may build at once
                obj, built = Path(tmp) / "paged_decode.o", Path(tmp) / library.name
                for cmd in ([compiler, *COMPILE_FLAGS, str(SOURCE), "-o", str(obj)],
                            [compiler, *LINK_FLAGS, str(obj), "-o", str(built), "-lm"]):
                    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
                    if proc.returncode != 0:
                        raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stderr.strip()[-2000:]}")
                os.replace(built, library)
            return library
        except OSError:  # an unwritable or read-only home: the temp folder next
            continue
    raise RuntimeError("no writable folder for the compiled kernel")


def _cpu_model() -> str:
    """What -march=native compiles for (the CPU's model and its flags): the build is cached per CPU."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    first = {key: next((ln for ln in lines if ln.startswith(key)), "") for key in ("model name", "flags")}
    return "\n".join(first.values())
