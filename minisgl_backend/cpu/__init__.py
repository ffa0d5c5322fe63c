"""Compiled CPU kernels (`csrc/*.c`): paged attention (decode rows and extends) and the decoder layer's elementwise
ops, built into one library with the machine's C compiler at first use (see `build.py`)."""

from minisgl_backend.cpu.build import cpu_library

__all__ = ["cpu_library"]
