"""A check, run inside the Python-backend stub before the engine starts, that the stub's C++
side and the numpy it imported agree on how arrays are laid out.

The stub in nvidia-pytriton's tritonserver (2.51) was built against numpy 1.x. Under numpy 2 it
builds every input array with stride 0 (each element reads as the first byte), so the first
request's text input fails to decode and the stub dies. A round trip through `pb_utils.Tensor`
shows the defect at load time, where it can be reported plainly.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def stub_numpy_problem(pb_utils: Any) -> str | None:
    """None when arrays survive a round trip through the stub, else what is wrong and what to do."""
    sent = np.arange(1, 9, dtype=np.int32)
    try:
        # from_dlpack: the stub wraps the buffer itself and as_numpy() builds a new array in C++,
        # as it does for a request's inputs (a Tensor made from an array keeps that array)
        source = pb_utils.Tensor("minisgl_stub_probe", sent)
        got = np.asarray(pb_utils.Tensor.from_dlpack("minisgl_stub_probe", source).as_numpy())
        intact = got.shape == sent.shape and bool((got == sent).all())
    except Exception as e:  # noqa: BLE001 - any failure of the round trip is the finding
        got, intact = repr(e), False
    if intact:
        return None
    return (f"the Python-backend stub garbles arrays with numpy {np.__version__} (from {np.__file__}): "
            f"[1..8] came back as {got}. This tritonserver's stub was built against numpy 1.x; give the "
            f"stub's Python numpy<2 (scripts/tritonserver puts the venv of 'make setup' first on PATH, "
            f"and nvidia-pytriton pins numpy<2 there)")
