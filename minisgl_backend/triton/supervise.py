"""The foreground process of `make serve`: runs tritonserver (and the OpenAI frontend) and makes
sure that however it is stopped, nothing it started outlives it.

    python -m minisgl_backend.triton.supervise --model-repository R --http-port 8000 ... [-- TRITON_ARGS]

Why a Python supervisor rather than a shell trap: a bash trap that is interrupted by a second
signal can die before it stops the server. Here:

* SIGINT, SIGTERM and SIGHUP only set a flag; the stop sequence runs in the main loop, once,
  and a later signal cannot cut it short (SIGTERM, wait `exit_timeout`, SIGKILL, reap).
* tritonserver stays in our process group (no setsid), so a terminal's Ctrl-C reaches it too,
  and its death signal (PR_SET_PDEATHSIG) is tied to us: if we are SIGKILLed it gets SIGTERM
  and shuts down on its own; the same holds for the OpenAI frontend. Our own death signal is
  tied to our parent (make), so `kill -9 <make>` still stops everything.
* we are a child subreaper: the stub and the scheduler processes, orphaned if tritonserver dies
  first, become our children, so the final sweep finds and kills them.
* if the Python-backend stub dies while serving (or the engine fails and the model unloads),
  tritonserver is restarted (up to --max-restarts times): Triton itself would keep the model
  READY and leave the streams in flight unanswered.

`ProcessSupervisor` is that machinery on its own (stop signals as a flag, subreaper, death
signals, the stop sequence, the sweep of adopted orphans, a restart budget, port checks);
`Supervisor` runs one replica with it, and `minisgl_backend.cluster` runs N such replicas (each
one a `python -m minisgl_backend.triton.supervise` child) plus a router with it.
"""

from __future__ import annotations

import argparse
import functools
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable, Collection

from minisgl_backend import procinfo
from minisgl_backend.checkout import ROOT, TRITONSERVER_WRAPPER
from minisgl_backend.ports import answers_ok, port_is_free
from minisgl_backend.processes import PR_SET_CHILD_SUBREAPER, die_with_parent, prctl
from minisgl_backend.triton.repository import MODEL_NAME as MODEL

OPENAI_MAIN = ROOT / "minisgl_backend" / "openai" / "__main__.py"

_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
# our children get SIGTERM when we die: tritonserver and the frontend then stop on their own
_CHILD_DEATH_SIGNAL = functools.partial(die_with_parent, signal.SIGTERM)


def say(message: str, prefix: str = "serve") -> None:
    print(f"{prefix}: {message}", flush=True)


@dataclass
class RestartBudget:
    """At most `limit` restarts; each one is said, as is running out."""

    limit: int
    used: int = 0
    prefix: str = "serve"

    def take(self, why: str, what: str) -> bool:
        if self.used >= self.limit:
            say(f"{why} and {self.used} restarts were used up: stopping", self.prefix)
            return False
        self.used += 1
        say(f"{why}: restarting {what} ({self.used}/{self.limit})", self.prefix)
        return True


class ProcessSupervisor:
    """The machinery of a foreground supervisor: see the module's docstring."""

    prefix = "serve"

    def __init__(self) -> None:
        self.stop_signal: int | None = None

    def say(self, message: str) -> None:
        say(message, self.prefix)

    # ------------------------------------------------------------ signals

    def install(self) -> None:
        for sig in _STOP_SIGNALS:
            signal.signal(sig, self._on_signal)
        prctl(PR_SET_CHILD_SUBREAPER, 1)
        parent = os.getppid()
        die_with_parent(signal.SIGTERM)
        if os.getppid() != parent:  # the parent died before the death signal was armed
            self.stop_signal = signal.SIGTERM

    def _on_signal(self, sig: int, _frame: object) -> None:
        if self.stop_signal is None:
            self.stop_signal = sig  # only a flag: the stop sequence runs once, in the main loop

    # ------------------------------------------------------------ children

    def spawn(self, cmd: list[str], **popen: object) -> subprocess.Popen:
        """A child whose death signal is tied to us (it gets SIGTERM when we die)."""
        return subprocess.Popen(cmd, cwd=str(ROOT), stdin=subprocess.DEVNULL, preexec_fn=_CHILD_DEATH_SIGNAL,
                                **popen)

    def stop_processes(self, procs: Collection[subprocess.Popen | None], grace: float) -> None:
        """SIGTERM, wait up to `grace` seconds, SIGKILL what is left."""
        live = [p for p in procs if p is not None and p.poll() is None]
        for proc in live:
            proc.terminate()
        deadline = time.monotonic() + grace
        while any(p.poll() is None for p in live) and time.monotonic() < deadline:
            time.sleep(0.1)
        for proc in live:
            if proc.poll() is None:
                self.say(f"pid {proc.pid} did not exit within {grace:.0f} s: SIGKILL")
                proc.kill()
                proc.wait()

    def wait_until(self, ready: Callable[[], bool], alive: Callable[[], bool], timeout: float,
                   interval: float = 0.5) -> str:
        """Poll `ready` until it holds: "ready", or why not: "stopped" (a stop signal), "exited"
        (`alive` turned false), "timeout"."""
        deadline = time.monotonic() + timeout
        while self.stop_signal is None:
            if not alive():
                return "exited"
            if ready():
                return "ready"
            if time.monotonic() > deadline:
                return "timeout"
            time.sleep(interval)
        return "stopped"


class Supervisor(ProcessSupervisor):
    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__()
        self.args = args
        self.server: subprocess.Popen | None = None
        self.openai: subprocess.Popen | None = None
        self.budget = RestartBudget(args.max_restarts)

    @property
    def restarts(self) -> int:
        return self.budget.used

    # ------------------------------------------------------------ run

    def run(self) -> int:
        try:
            code = self._check_ports()
            if code is None:
                code = self._start_all()
            while code is None:  # None: serving stopped without an exit code, start again
                code = self._serve()
                if code is None:
                    self._kill_all()
                    code = self._start_all()
        finally:
            self._stop()
        return code

    def _check_ports(self) -> int | None:
        a = self.args
        named = [(a.http_port, "tritonserver HTTP"), (a.grpc_port, "tritonserver gRPC"),
                 (a.metrics_port, "tritonserver metrics")]
        if OPENAI_MAIN.is_file():
            named.append((a.openai_port, "the OpenAI frontend"))
        problems = port_problems(named)
        for problem in problems:
            self.say(problem)
        return 1 if problems else None

    def _start_all(self) -> int | None:
        """tritonserver, then (once the model is READY) the OpenAI frontend; None when serving."""
        a = self.args
        say(f"tritonserver --model-repository {a.model_repository} (http {a.http_port}, grpc {a.grpc_port}, "
            f"metrics {a.metrics_port})")
        self.server = self._spawn([str(TRITONSERVER_WRAPPER), "--model-repository", a.model_repository,
                                   "--http-port", str(a.http_port), "--grpc-port", str(a.grpc_port),
                                   "--metrics-port", str(a.metrics_port), "--exit-timeout-secs", str(a.exit_timeout),
                                   # an engine that dies unloads the model, and readiness says so
                                   "--model-control-mode=explicit", f"--load-model={MODEL}", *a.triton_args])
        code = self._wait_ready()
        if code is None:
            self._start_openai()
        return code

    def _kill_all(self) -> None:
        for proc in (self.openai, self.server):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
        self.openai = None
        kill_adopted()

    def _spawn(self, cmd: list[str]) -> subprocess.Popen:
        return self.spawn(cmd)

    def _wait_ready(self) -> int | None:
        """None once the model is READY; an exit code if we must stop before."""
        url = f"http://127.0.0.1:{self.args.http_port}/v2/models/{MODEL}/ready"
        outcome = self.wait_until(lambda: answers_ok(url), lambda: self.server.poll() is None,
                                  self.args.ready_timeout)
        if outcome == "exited":
            say(f"tritonserver exited ({self.server.returncode}) before the model was ready")
            return 1
        if outcome == "timeout":
            say(f"model not ready after {self.args.ready_timeout:.0f} s")
            return 1
        return None if outcome == "ready" else 128 + self.stop_signal

    def _start_openai(self) -> None:
        if not OPENAI_MAIN.is_file():
            say("OpenAI frontend skipped: minisgl_backend/openai is not in this checkout")
        else:
            # the key, if any, reaches it as $MINISGL_API_KEY (never on a command line)
            self.openai = self._spawn([sys.executable, "-m", "minisgl_backend.openai", "--triton-url",
                                       f"127.0.0.1:{self.args.grpc_port}", "--model", MODEL,
                                       "--port", str(self.args.openai_port), "--metrics-url",
                                       f"http://127.0.0.1:{self.args.metrics_port}/metrics"])
            say(f"OpenAI frontend on port {self.args.openai_port}")
            if not self._wait_openai():
                return
        say(f"READY  curl -X POST localhost:{self.args.http_port}/v2/models/{MODEL}/generate "
            "-d '{\"text_input\":\"Hi\",\"parameters\":{\"max_tokens\":16}}'")

    def _wait_openai(self) -> bool:
        """Until the frontend's /health answers (it loads its tokenizer first), so that
        READY means every port it names answers; False when it exited or a stop signal came (the
        serve loop then stops everything)."""
        url = f"http://127.0.0.1:{self.args.openai_port}/health"
        outcome = self.wait_until(lambda: answers_ok(url), lambda: self.openai.poll() is None,
                                  self.args.ready_timeout, interval=0.2)
        if outcome == "timeout":
            say(f"the OpenAI frontend does not answer {url} after {self.args.ready_timeout:.0f} s")
        return outcome in ("ready", "timeout")

    def _serve(self) -> int | None:
        """Until a stop signal (its exit code) or a child's death (1); None: restart everything."""
        next_stub_check = time.monotonic() + 1.0
        while self.stop_signal is None:
            code = self.server.poll()
            if code is not None and -code in _CRASH_SIGNALS:  # a stub killed mid-IPC can abort it
                return self._restart(f"tritonserver crashed (signal {-code})")
            if code is not None:  # stopped or killed from outside: so are we
                say(f"tritonserver exited ({code}): stopping everything")
                return 1
            if self.openai is not None and self.openai.poll() is not None:
                say(f"the OpenAI frontend exited ({self.openai.returncode}): stopping everything")
                return 1
            if time.monotonic() > next_stub_check:
                next_stub_check = time.monotonic() + 1.0
                if not _has_stub(self.server.pid) and self.server.poll() is None:  # a dead server: see above
                    return self._restart("the Python-backend stub is gone (it died, or the engine failed "
                                         "and the model unloaded)")
            time.sleep(0.2)
        return 128 + self.stop_signal

    def _restart(self, why: str) -> int | None:
        """Triton (2.51) neither restarts a decoupled model's stub nor answers its streams in flight,
        and keeps the model READY; a stub killed while it holds a shared-memory lock can also abort
        tritonserver. Restarting the server fails those streams (their connections drop) and
        serves again."""
        return None if self.budget.take(why, "tritonserver") else 1

    # ------------------------------------------------------------ stop

    def _stop(self) -> None:
        """SIGTERM, wait up to the exit timeout, SIGKILL what is left, and every orphan we adopted."""
        if self.stop_signal is not None:
            say(f"signal {signal.Signals(self.stop_signal).name}: stopping tritonserver and the engine")
        self.stop_processes((self.openai, self.server), self.args.exit_timeout + 5)
        kill_adopted()


_CRASH_SIGNALS = {signal.SIGABRT, signal.SIGSEGV, signal.SIGBUS, signal.SIGFPE, signal.SIGILL}


def _has_stub(server_pid: int) -> bool:
    return any("triton_python_backend_stub" in procinfo.cmdline(pid) for pid in procinfo.children(server_pid))


def kill_adopted(keep: Collection[int] = ()) -> None:
    """SIGKILL and reap everything below us (stubs, scheduler processes orphaned by the server),
    except our children in `keep` and what runs below them."""
    me, keep = os.getpid(), set(keep)
    for _ in range(50):
        others = [pid for pid in _children_and_zombies(me) if pid not in keep]
        if not others:
            return
        below, todo = [], list(others)
        while todo:
            pid = todo.pop()
            below.append(pid)
            todo.extend(procinfo.children(pid))
        for pid in below:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for pid in others:  # only these: a live child in `keep` keeps its exit status for its Popen
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass
        time.sleep(0.1)


def _children_and_zombies(parent: int) -> list[int]:
    out = []
    for pid in procinfo.pids():
        fields = procinfo.stat_fields(pid)
        if fields is not None and int(fields[1]) == parent:
            out.append(pid)
    return out


def port_problems(named_ports: list[tuple[int, str]], wait: float = 0.0) -> list[str]:
    """What stops these ports from being served: one given twice, or one that something else
    holds (each waited for up to `wait` seconds: a process that just died may still hold it)."""
    problems, seen = [], {}
    for port, name in named_ports:
        if port in seen:
            problems.append(f"port {port} is given twice: {seen[port]} and {name}")
        seen[port] = name
    deadline = time.monotonic() + wait
    for port, name in seen.items():
        while not port_is_free(port) and time.monotonic() < deadline:
            time.sleep(0.2)
        if not port_is_free(port):
            problems.append(f"port {port} ({name}) is already in use: stop what holds it or choose another port")
    return problems


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-repository", required=True)
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--grpc-port", type=int, default=8001)
    parser.add_argument("--metrics-port", type=int, default=8002)
    parser.add_argument("--openai-port", type=int, default=9000)
    parser.add_argument("--exit-timeout", type=int, default=15, help="seconds tritonserver may take to stop")
    parser.add_argument("--ready-timeout", type=float, default=900.0)
    parser.add_argument("--max-restarts", type=int, default=3,
                        help="times tritonserver is restarted after its Python-backend stub died")
    parser.add_argument("triton_args", nargs="*", help="more tritonserver flags (after --)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    supervisor = Supervisor(parse_args(argv))
    supervisor.install()
    return supervisor.run()


if __name__ == "__main__":
    sys.exit(main())
