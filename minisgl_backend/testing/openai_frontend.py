"""The OpenAI frontend for tests and benchmarks: as a subprocess (`OpenAIFrontend`, the real
command line) or inside this process on a thread (`InProcessFrontend`)."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from minisgl_backend.checkout import ROOT
from minisgl_backend.openai.app import ServerSettings, create_app
from minisgl_backend.ports import answers_ok, free_port


class OpenAIFrontend:
    """`python -m minisgl_backend.openai` on a free port; `stop()` ends it."""

    def __init__(self, triton_url: str, log_path: str | os.PathLike, model: str = "minisgl",
                 extra_args: list[str] | None = None) -> None:
        self.port = free_port()
        self.log_path = Path(log_path)
        self.cmd = [sys.executable, "-m", "minisgl_backend.openai", "--triton-url", triton_url, "--model", model,
                    "--host", "127.0.0.1", "--port", str(self.port), *(extra_args or [])]
        self.proc: subprocess.Popen | None = None

    @classmethod
    def beside(cls, triton, log_dir: str | os.PathLike, *extra_args: str) -> "OpenAIFrontend":
        """A frontend for a test `TritonServer` (its gRPC port, its metrics URL), not started."""
        return cls(triton.grpc_url, Path(log_dir) / "frontend.log",
                   extra_args=["--metrics-url", triton.metrics_url, *extra_args])

    def __enter__(self) -> "OpenAIFrontend":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def sdk_client(self):
        """The official OpenAI SDK pointed at this frontend (no retries)."""
        import openai

        return openai.OpenAI(base_url=f"{self.base_url}/v1", api_key="unused", max_retries=0, timeout=120)

    def start(self, timeout: float = 120.0) -> "OpenAIFrontend":
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         cwd=str(ROOT))
        try:
            wait_healthy(self.base_url, timeout, self.proc)
        except Exception:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        self.proc = None

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


class InProcessFrontend:
    """The app under uvicorn on a thread of this process (its own event loop)."""

    def __init__(self, settings: ServerSettings) -> None:
        import uvicorn

        self.settings = settings = dataclasses.replace(settings, host="127.0.0.1", port=free_port())
        config = uvicorn.Config(create_app(settings), host="127.0.0.1", port=settings.port, loop="asyncio",
                                log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="openai-frontend", daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.settings.port}"

    def __enter__(self) -> "InProcessFrontend":
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the in-process frontend did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(15)


def wait_healthy(base_url: str, timeout: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the OpenAI frontend exited with {proc.returncode}")
        if answers_ok(f"{base_url}/health"):
            return
        time.sleep(0.3)
    raise TimeoutError(f"{base_url}/health not 200 after {timeout:.0f} s")
