"""Host-to-device copies that never stall the CPU.

A non-blocking copy from pageable memory is synchronous in practice: the CPU waits until the
copy has run, i.e. until the GPU finished the batch before it on the stream, which defeats
overlap scheduling. Pinned host memory makes the copy truly asynchronous.
"""

from __future__ import annotations

import torch


def to_device(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    device = torch.device(device)
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def copy_to(dst: torch.Tensor, src: torch.Tensor) -> None:
    """dst[...] = src (src on the host), asynchronously when dst is on a GPU."""
    if dst.device.type == "cuda":
        src = src.pin_memory()
    dst.copy_(src, non_blocking=True)

