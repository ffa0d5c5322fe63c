"""glibc malloc set up for a CPU engine: freed memory stays in the process.

A CPU step allocates and frees megabytes of temporaries (gathered K/V pages, masks,
activations). With glibc's defaults, free memory at the top of the heap is given back to the
OS and large blocks are mmapped afresh, so the next step faults the same memory in again.
Keeping it (a high trim threshold, and blocks up to 32 MB from the heap) spares those page faults.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

logger = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_TRIM_THRESHOLD = 1 << 30  # free memory at the heap's top kept up to this much
_MMAP_THRESHOLD = 32 << 20  # glibc's own ceiling for the dynamic threshold on 64-bit


def keep_freed_memory() -> bool:
    """True when glibc took the settings; False elsewhere (another libc: nothing to change)."""
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    ok = mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD) == 1 and mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD) == 1
    if not ok:
        logger.warning("mallopt refused the CPU engine's malloc settings; freed memory may be refaulted")
    return ok
