"""`make serve` stops everything it started, however it is stopped.

Runs the real `make serve` command line (with `-o` for the two set-up stamps, so that make does
not try to rebuild the venv or tritonserver: this test is about signals, not set-up) on a tiny
random model and free ports, then signals it the way a terminal or a supervisor would:

* Ctrl-C: SIGINT to make's process group (GNU make itself does not forward SIGINT to its
  children: it relies on the terminal signalling the whole group);
* SIGTERM to make's pid alone (make forwards it to the recipe and waits);
* SIGTERM to make's pid, then SIGKILL to make's pid 2 s later (make dies at once; the
  supervisor's death signal is tied to make and the stop goes on);
* tritonserver dying on its own takes the rest down too.

Every process below make (supervisor, tritonserver, the Python-backend stub, the scheduler
processes, the OpenAI frontend when it exists) must be gone and every port free within the exit
timeout.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
import urllib.request

import pytest

from minisgl_backend.checkout import ROOT
from minisgl_backend.ports import answers_ok, free_ports, port_is_free
from minisgl_backend.testing.procinfo import descendants, is_alive
from minisgl_backend.testing.triton import GrpcStream, grpc_inputs

pytestmark = [pytest.mark.triton, pytest.mark.slow, pytest.mark.timeout(600),
              pytest.mark.usefixtures("require_triton")]

EXIT_TIMEOUT = 10  # seconds tritonserver may take to stop (make serve EXIT_TIMEOUT=...)
GONE_WITHIN = EXIT_TIMEOUT + 10  # the supervisor SIGKILLs at EXIT_TIMEOUT + 5
API_KEY = "sk-make-serve"


class Serve:
    def __init__(self, model: str, log_path) -> None:
        self.ports = dict(zip(("HTTP_PORT", "GRPC_PORT", "METRICS_PORT", "OPENAI_PORT"), free_ports(4)))
        cmd = ["make", "--no-print-directory", "-o", ".venv/.minisgl-setup", "-o", "build/triton/env.sh", "serve",
               f"MODEL={model}", "SETTINGS=max_total_tokens=4096 page_size=16", f"EXIT_TIMEOUT={EXIT_TIMEOUT}",
               f"API_KEY={API_KEY}", *(f"{k}={v}" for k, v in self.ports.items())]
        self.log_path = log_path
        self.log = open(log_path, "wb")
        # its own session, as a terminal's job: SIGINT to the group is Ctrl-C
        self.make = subprocess.Popen(cmd, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        self.tree: list[tuple[int, str, str]] = []

    def text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while "serve: READY" not in self.text():
            assert self.make.poll() is None, f"make serve exited early:\n{self.text()[-3000:]}"
            assert time.monotonic() < deadline, f"not READY after {timeout} s:\n{self.text()[-3000:]}"
            time.sleep(0.5)
        self.tree = descendants(self.make.pid)
        names = " ".join(cmd for _, _, cmd in self.tree)
        for needed in ("tritonserver", "triton_python_backend_stub", "minisgl_backend.launch"):
            assert needed in names, f"{needed} not running under make serve: {self.tree}"
        assert ("OpenAI frontend on port" in self.text()) == os.path.isfile(
            ROOT / "minisgl_backend" / "openai" / "__main__.py")
        assert "OpenAI frontend" in self.text(), "make serve says whether it started the OpenAI frontend"
        if "OpenAI frontend on port" in self.text():  # READY: every port it names answers, at once
            base = f"http://127.0.0.1:{self.ports['OPENAI_PORT']}"
            assert answers_ok(f"{base}/health"), self.text()[-2000:]
            # make serve API_KEY=...: the frontend refuses /v1/... without it
            assert not answers_ok(f"{base}/v1/models")
            keyed = urllib.request.Request(f"{base}/v1/models", headers={"Authorization": f"Bearer {API_KEY}"})
            with urllib.request.urlopen(keyed, timeout=30) as resp:
                assert resp.status == 200

    def generate(self) -> dict:
        req = urllib.request.Request(f"http://127.0.0.1:{self.ports['HTTP_PORT']}/v2/models/minisgl/generate",
                                     data=b'{"text_input": "Hi", "parameters": {"max_tokens": 4, "temperature": 0}}', method="POST")
        with urllib.request.urlopen(req, timeout=60) as resp:
            import json

            return json.loads(resp.read())

    def assert_all_gone(self, started: float) -> None:
        """Everything below make is gone and every port is free, within GONE_WITHIN of `started`."""
        while True:
            alive = [p for p in self.tree if is_alive(*p[:2])]
            busy = [port for port in self.ports.values() if not port_is_free(port)]
            if not alive and not busy and self.make.poll() is not None:
                break
            if time.monotonic() - started > GONE_WITHIN:
                self.cleanup()
                pytest.fail(f"after {GONE_WITHIN} s: alive {alive}, busy ports {busy}, make rc {self.make.poll()}"
                            f"\n{self.text()[-3000:]}")
            time.sleep(0.2)

    def cleanup(self) -> None:
        for pid, start, _ in self.tree:
            if is_alive(pid, start):
                os.kill(pid, signal.SIGKILL)
        if self.make.poll() is None:
            os.killpg(self.make.pid, signal.SIGKILL)
            self.make.wait(10)
        self.log.close()


def _sigint_group(serve: Serve) -> None:
    os.killpg(serve.make.pid, signal.SIGINT)


def _sigterm_make(serve: Serve) -> None:
    serve.make.send_signal(signal.SIGTERM)


def _sigterm_then_sigkill_make(serve: Serve) -> None:
    serve.make.send_signal(signal.SIGTERM)
    time.sleep(2)
    serve.make.kill()


def _tritonserver_dies(serve: Serve) -> None:
    pid = next(pid for pid, _, cmd in serve.tree if "bin/tritonserver" in cmd)
    os.kill(pid, signal.SIGKILL)


STOPS = {"SIGINT to the group (Ctrl-C)": _sigint_group, "SIGTERM to make": _sigterm_make,
         "SIGTERM then SIGKILL to make": _sigterm_then_sigkill_make, "tritonserver killed": _tritonserver_dies}


@pytest.mark.parametrize("how", list(STOPS))
def test_make_serve_stops_everything(tiny_llama, tmp_path, how):
    serve = Serve(tiny_llama, tmp_path / "serve.log")
    try:
        serve.wait_ready()
        assert "text_output" in serve.generate()
        started = time.monotonic()
        STOPS[how](serve)
        serve.assert_all_gone(started)
    finally:
        serve.cleanup()
    if how != "tritonserver killed":
        assert "successfully unloaded 'minisgl'" in serve.text(), "the model was unloaded cleanly"
        assert "stopping tritonserver and the engine" in serve.text()
    else:
        assert "tritonserver exited" in serve.text() and serve.make.returncode != 0


def test_stub_death_under_make_serve_fails_streams_and_serves_again(tiny_llama, tmp_path):
    """SIGKILL to the Python-backend stub while streams run: the scheduler processes follow within
    5 s, every stream gets an error, and the supervisor restarts tritonserver, so the model is
    READY again and serves the same greedy output (Triton alone would keep the model READY and
    leave the streams unanswered: see test_triton_reliability)."""
    serve = Serve(tiny_llama, tmp_path / "serve.log")
    clients = []
    try:
        serve.wait_ready()
        before = serve.generate()["text_output"]
        stub = next(pid for pid, _, cmd in serve.tree if "triton_python_backend_stub" in cmd)
        schedulers = [p for p in serve.tree if "minisgl_backend.launch" in p[2]]
        clients = [GrpcStream(f"127.0.0.1:{serve.ports['GRPC_PORT']}") for _ in range(3)]
        for i, client in enumerate(clients):
            client.send(f"s{i}", grpc_inputs(f"stream {i}", stream=True), parameters={"max_tokens": 3000,
                                                                                   "ignore_eos": True})
        for i, client in enumerate(clients):  # every stream runs (its ~2,000 tokens take a second or more)
            client.wait_started([f"s{i}"])
        os.kill(stub, signal.SIGKILL)
        killed = time.monotonic()
        while any(is_alive(*p[:2]) for p in schedulers):
            assert time.monotonic() - killed < 5, "scheduler processes outlived the stub by 5 s"
            time.sleep(0.05)
        for i, client in enumerate(clients):
            got = client.collect([f"s{i}"], timeout=120)[f"s{i}"]
            assert got["error"] is not None and not got["final"], f"stream {i} got no error: {got}"
        deadline = time.monotonic() + 300
        while serve.text().count("serve: READY") < 2:
            assert serve.make.poll() is None and time.monotonic() < deadline, serve.text()[-3000:]
            time.sleep(0.5)
        assert "restarting tritonserver (1/3)" in serve.text()
        assert serve.generate()["text_output"] == before, "the restarted model serves the same greedy output"
        serve.tree = descendants(serve.make.pid)
        started = time.monotonic()
        serve.make.send_signal(signal.SIGTERM)
        serve.assert_all_gone(started)
    finally:
        for client in clients:
            try:
                client.close(cancel=True)
            except Exception:
                pass
        serve.cleanup()
