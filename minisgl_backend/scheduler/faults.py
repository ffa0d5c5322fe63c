"""Telling one request's failure from the engine's, and the fault-injection hook of the tests.

An ordinary exception raised while running a batch usually comes from one request's own inputs
(its sampling settings, say). The scheduler re-runs such a batch one request at a time to find
who fails alone; `is_device_failure` names the exceptions for which that is pointless because
the device or the process group itself is broken.
"""

from __future__ import annotations

from minisgl_backend.batch import Batch
from minisgl_backend.config import FaultConfig

# device errors, and collective errors (a peer rank died): re-running a request cannot help
_DEVICE_MARKERS = ("CUDA error", "CUDA out of memory", "device-side assert", "NCCL", "cuDNN", "CUBLAS_STATUS",
                   "illegal memory access", "gloo", "Connection closed by peer", "Connection reset by peer")


class InjectedFault(RuntimeError):
    """Raised by the fault-injection hook (FaultConfig), never in normal serving."""


class NoResult:
    """The result of a batch none of whose requests is left to run."""

    details = None

    def wait(self) -> tuple[list[int], None]:
        return [], None


def is_device_failure(exc: BaseException) -> bool:
    """Exceptions after which the engine cannot be trusted for anyone (re-running is pointless)."""
    import torch

    if isinstance(exc, MemoryError):
        return True
    device_errors = tuple(t for t in (getattr(torch, "AcceleratorError", None),
                                      getattr(torch.cuda, "OutOfMemoryError", None),
                                      getattr(getattr(torch, "distributed", None), "DistError", None))
                          if isinstance(t, type))
    if device_errors and isinstance(exc, device_errors):
        return True
    text = str(exc)
    return any(marker in text for marker in _DEVICE_MARKERS)


def check_injected_fault(batch: Batch, config: FaultConfig) -> None:
    """Raise `InjectedFault` if the batch samples for a request configured to fail."""
    seed = config.inject_sampling_fault_seed
    if seed < 0:
        return
    for item in batch.items:
        req = item.req
        if req.seed == seed and item.samples and item.end - len(req.input_ids) >= config.inject_sampling_fault_step:
            raise InjectedFault(f"injected sampling fault (request seed {seed}, output position "
                                f"{item.end - len(req.input_ids)})")
