"""The tritonserver launcher of the package, plus how the tests treat a missing server."""

from __future__ import annotations

import os

from minisgl_backend.triton.server import (MODEL, ROOT, TRITON_HOME, GrpcStream, TritonServer,  # noqa: F401
                                           grpc_inputs, group_members, parse_metric, triton_available)


def require_triton() -> None:
    """Fail (not skip) without a tritonserver: `make setup` provides one on every machine."""
    require_tool(triton_available())


def require_tool(missing: str | None) -> None:
    """`missing` is why a tool the suite needs cannot run (None: it can). On the project's
    machines that is a broken set-up, so it fails; MINISGL_ALLOW_NO_TRITON=1 makes it a skip."""
    import pytest

    if missing is None:
        return
    if os.environ.get("MINISGL_ALLOW_NO_TRITON") == "1":
        pytest.skip(missing)
    pytest.fail(missing)
