"""The tritonserver launcher of the package, plus how the tests treat a missing server."""

from __future__ import annotations

import os
import time

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


def wait_idle(server: TritonServer, timeout: float = 30.0) -> str:
    """Wait until the gauges show an idle engine (nothing running or pending, no locked page,
    every page free or cached, KV usage 0); returns the metrics text, or fails with the gauges it
    saw last."""
    deadline = time.monotonic() + timeout
    text = ""
    while time.monotonic() < deadline:
        text = server.metrics_text()
        pages = {s: parse_metric(text, "minisgl_kv_pages", {"state": s}) for s in ("total", "free", "cached", "locked")}
        if (parse_metric(text, "minisgl_num_requests_running") == 0
                and parse_metric(text, "minisgl_num_requests_pending") == 0
                and pages["locked"] == 0 and pages["free"] + pages["cached"] == pages["total"] > 0
                and parse_metric(text, "minisgl_kv_cache_usage_ratio") == 0):
            return text
        time.sleep(0.2)
    raise AssertionError("the engine did not return to idle:\n" + "\n".join(
        line for line in text.splitlines() if line.startswith(("minisgl_num", "minisgl_kv"))))
