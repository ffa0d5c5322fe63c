"""Builds `csrc/*.c` into one shared library with the machine's C compiler, at first use, cached by
a hash of the sources, flags, compiler and CPU (in ~/.cache/minisgl/kernels, else the temp folder).

Loaded after torch, the library's libgomp is torch's own (same soname), so its OpenMP loops run
on torch's threads and thread count.
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
from functools import lru_cache
from pathlib import Path

logger = logging.getLogger(__name__)

SOURCES = tuple(sorted((Path(__file__).resolve().parent / "csrc").glob("*.c")))
# -ffast-math lets the exp loops vectorize (glibc's libmvec). It is given to the compile step
# only: linked with it, gcc < 13 adds crtfastmath.o to a shared library, whose constructor
# switches the whole process (torch included) to flush-denormals-to-zero.
COMPILE_FLAGS = ("-O3", "-march=native", "-ffast-math", "-fopenmp", "-fPIC", "-c")
LINK_FLAGS = ("-shared", "-fopenmp")


@lru_cache(maxsize=None)
def cpu_library() -> ctypes.CDLL | None:
    """The compiled library, or None (with a warning, once) where it cannot be built here."""
    import torch  # noqa: F401  (loaded first: the library then binds to torch's libgomp)

    try:
        return ctypes.CDLL(str(build()))
    except (OSError, subprocess.SubprocessError, RuntimeError) as exc:
        logger.warning("compiled CPU kernels unavailable, the CPU path falls back to torch ops "
                       "(gather + SDPA for attention, unfused RMSNorm / rope / SiLU): %s", exc)
        return None


def build(extra_flags: tuple[str, ...] = ()) -> Path:
    """The cached library's path, compiling it first when this machine has none. `extra_flags`
    follow COMPILE_FLAGS (tests build the portable paths with "-mno-avx512f")."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise RuntimeError("no C compiler (cc / gcc) on PATH")
    flags = COMPILE_FLAGS + tuple(extra_flags)
    parts = [s.read_bytes() for s in SOURCES] + [" ".join(flags + LINK_FLAGS).encode(),
                                                  compiler.encode(), _cpu_model().encode()]
    key = hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]
    home = os.path.expanduser("~")  # "~" itself when there is no home: then only the temp folder
    folders = [Path(home) / ".cache" / "minisgl" / "kernels"] if home != "~" else []
    for folder in folders + [Path(tempfile.gettempdir()) / "minisgl-kernels"]:
        library = folder / f"minisgl-cpu-{key}.so"
        if library.is_file():
            return library
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=folder) as tmp:  # several processes may build at once
                _compile(compiler, flags, Path(tmp), library.name)
                os.replace(Path(tmp) / library.name, library)
            return library
        except OSError:  # an unwritable or read-only home: the temp folder next
            continue
    raise RuntimeError("no writable folder for the compiled kernels")


def _compile(compiler: str, flags: tuple[str, ...], folder: Path, name: str) -> None:
    objects = [folder / f"{s.stem}.o" for s in SOURCES]
    commands = [[compiler, *flags, str(s), "-o", str(o)] for s, o in zip(SOURCES, objects)]
    commands.append([compiler, *LINK_FLAGS, *map(str, objects), "-o", str(folder / name), "-lm"])
    for cmd in commands:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stderr.strip()[-2000:]}")


def _cpu_model() -> str:
    """What -march=native compiles for (the CPU's model and its flags): the build is cached per CPU."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    first = {key: next((ln for ln in lines if ln.startswith(key)), "") for key in ("model name", "flags")}
    return "\n".join(first.values())
