"""The foreground process of `make serve-cluster`: N replicas behind the SGLang Model Gateway.

    python -m minisgl_backend.cluster --model-repository R --replicas 3 --policy cache_aware [-- TRITON_ARGS]

Each replica is a `python -m minisgl_backend.triton.supervise` child (tritonserver + the OpenAI
frontend, restarted by that supervisor when its stub dies) on its own ports: replica i serves
tritonserver on `--http-port`/`--grpc-port`/`--metrics-port` + 10 i and the OpenAI API on
`--openai-port` + i. Once every replica answers `/health`, `sglang-router` starts on
`--router-port` with their frontends as workers; READY is said once a chat completion comes back
through the router.

The machinery is `supervise.ProcessSupervisor`'s (stop signals as a flag, child subreaper, death
signals, the stop sequence, the sweep of orphans, restart budgets), so the guarantees of `make
serve` hold here: Ctrl-C / SIGTERM / SIGHUP stop every process, and so does a SIGKILL of this
process (each child's death signal is tied to it). A replica whose supervisor exits while serving
(its tritonserver was killed, its frontend died, its own restarts ran out) has its leftovers
killed and is started again, up to `--max-restarts` times per replica; the router's health
checks (every `--health-check-interval` s) take it out and back in. The router exiting stops
everything. Before anything starts: the router must be installed and every port free; a replica
that exits or does not become ready during the start stops everything, with the end of its log.

`MINISGL_API_KEY` (what `make serve-cluster API_KEY=...` sets) reaches every frontend through the
environment. The router is not given it: it forwards the client's `Authorization` header, so a
request without the key gets the replica's 401 in OpenAI's error shape (sglang-router's own
`--api-key` answers an empty 401), and its probes use the open endpoints. The READY check sends
the key.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from minisgl_backend.checkout import ROOT
from minisgl_backend.ports import answers_ok
from minisgl_backend.triton.repository import MODEL_NAME as MODEL
from minisgl_backend.triton.supervise import ProcessSupervisor, RestartBudget, kill_adopted, port_problems

POLICIES = ("cache_aware", "round_robin", "power_of_two", "random", "manual")
PORT_STRIDE = 10  # replica i: tritonserver ports + 10 i
API_KEY_ENV = "MINISGL_API_KEY"
ROUTER_PIN = "sglang-router==0.3.2"
PREFIX = "serve-cluster"


@dataclass
class Replica:
    index: int
    http_port: int
    grpc_port: int
    metrics_port: int
    openai_port: int
    log_path: Path
    budget: RestartBudget
    proc: subprocess.Popen | None = None
    ready: bool = False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.openai_port}"

    @property
    def name(self) -> str:
        return f"replica {self.index}"

    def named_ports(self) -> list[tuple[int, str]]:
        return [(self.http_port, f"{self.name}'s tritonserver HTTP"), (self.grpc_port, f"{self.name}'s tritonserver gRPC"),
                (self.metrics_port, f"{self.name}'s tritonserver metrics"),
                (self.openai_port, f"{self.name}'s OpenAI frontend")]

    def command(self, args: argparse.Namespace) -> list[str]:
        return [sys.executable, "-m", "minisgl_backend.triton.supervise", "--model-repository", args.model_repository,
                "--http-port", str(self.http_port), "--grpc-port", str(self.grpc_port),
                "--metrics-port", str(self.metrics_port), "--openai-port", str(self.openai_port),
                "--exit-timeout", str(args.exit_timeout), "--ready-timeout", str(args.ready_timeout),
                "--max-restarts", str(args.max_restarts), "--", *args.triton_args]


@dataclass
class RouterSpec:
    """sglang-router's command line for a set of workers (also used by tests and benchmarks)."""

    worker_urls: list[str]
    port: int
    metrics_port: int
    policy: str = "cache_aware"
    health_check_interval: int = 3
    startup_timeout: int = 900
    exit_timeout: int = 15
    log_level: str = "warn"
    host: str = "0.0.0.0"
    extra_args: list[str] = field(default_factory=list)

    def command(self, python: str = sys.executable) -> list[str]:
        interval = max(int(self.health_check_interval), 1)
        cmd = [python, "-m", "sglang_router.launch_router", "--host", self.host, "--port", str(self.port),
               "--prometheus-port", str(self.metrics_port), "--policy", self.policy,
               "--worker-urls", *self.worker_urls,
               "--health-check-interval-secs", str(interval),
               # a worker that failed requests is tried again after this, not the default minute,
               # so that a restarted replica rejoins once its health checks pass
               "--cb-timeout-duration-secs", str(max(2 * interval, 5)),
               "--worker-startup-timeout-secs", str(int(self.startup_timeout)), "--worker-startup-check-interval", "1",
               "--shutdown-grace-period-secs", str(int(self.exit_timeout)), "--log-level", self.log_level]
        return cmd + self.extra_args


def router_installed() -> bool:
    return importlib.util.find_spec("sglang_router") is not None


def chat_answers(base_url: str, api_key: str | None, timeout: float = 30.0) -> bool:
    """Whether a one-token chat completion comes back (200) from `base_url` now."""
    body = json.dumps({"model": MODEL, "max_tokens": 1, "messages": [{"role": "user", "content": "ping"}]}).encode()
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    request = urllib.request.Request(f"{base_url}/v1/chat/completions", data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            return resp.status == 200
    except OSError:
        return False


def log_tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return f"(no log at {path})"
    return "\n".join(f"    {line}" for line in text)


class ClusterSupervisor(ProcessSupervisor):
    prefix = PREFIX

    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__()
        self.args = args
        self.api_key = os.environ.get(API_KEY_ENV) or None
        self.log_dir = Path(args.log_dir)
        self.replicas = [Replica(i, args.http_port + PORT_STRIDE * i, args.grpc_port + PORT_STRIDE * i,
                                 args.metrics_port + PORT_STRIDE * i, args.openai_port + i,
                                 self.log_dir / f"replica-{i}.log", RestartBudget(args.max_restarts, prefix=PREFIX))
                         for i in range(args.replicas)]
        self.router_log = self.log_dir / "router.log"
        self.router: subprocess.Popen | None = None

    @property
    def router_url(self) -> str:
        return f"http://127.0.0.1:{self.args.router_port}"

    def router_spec(self) -> RouterSpec:
        a = self.args
        return RouterSpec([r.url for r in self.replicas], a.router_port, a.router_metrics_port, a.policy,
                          a.health_check_interval, int(a.ready_timeout), a.exit_timeout, a.router_log_level,
                          extra_args=shlex.split(a.router_args))

    # ------------------------------------------------------------ run

    def run(self) -> int:
        try:
            code = self._preflight()
            if code is None:
                code = self._start()
            if code is None:
                code = self._serve()
        finally:
            self._stop()
        return code

    def _preflight(self) -> int | None:
        """Whatever would fail later, said before anything starts."""
        problems = []
        if not router_installed():
            problems.append(f"the router is not installed: no module 'sglang_router' in {sys.executable}; "
                            f"run 'make setup' (requirements/serve.txt pins {ROUTER_PIN}) or "
                            f"'{sys.executable} -m pip install {ROUTER_PIN}'")
        if not Path(self.args.model_repository).is_dir():
            problems.append(f"--model-repository {self.args.model_repository} is not a folder")
        named = [p for r in self.replicas for p in r.named_ports()]
        named += [(self.args.router_port, "the router"), (self.args.router_metrics_port, "the router's metrics")]
        problems += port_problems(named)
        for problem in problems:
            self.say(problem)
        return 1 if problems else None

    def _start(self) -> int | None:
        """Every replica (at once), then the router; None once a chat completion came back through it."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.say(f"{len(self.replicas)} replicas of {self.args.model_repository}; logs in {self.log_dir}")
        for replica in self.replicas:
            self._start_replica(replica)
        deadline = time.monotonic() + 2 * self.args.ready_timeout + 60  # tritonserver, then the frontend
        waiting = list(self.replicas)
        while waiting:
            if self.stop_signal is not None:
                return 128 + self.stop_signal
            for replica in self.replicas:
                if replica.proc.poll() is not None:
                    return self._start_failed(replica, "exited")
            for replica in [r for r in waiting if answers_ok(f"{r.url}/health")]:
                waiting.remove(replica)
                replica.ready = True
                self.say(f"{replica.name} READY: OpenAI API on port {replica.openai_port}, tritonserver on "
                         f"{replica.http_port}/{replica.grpc_port}/{replica.metrics_port}")
            if waiting and time.monotonic() > deadline:
                return self._start_failed(waiting[0], "timeout")
            time.sleep(0.5)
        return self._start_router()

    def _start_replica(self, replica: Replica) -> None:
        with open(replica.log_path, "ab") as log:
            log.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} {PREFIX}: starting {replica.name}\n".encode())
            log.flush()
            replica.proc = self.spawn(replica.command(self.args), stdout=log, stderr=subprocess.STDOUT)
        replica.ready = False

    def _start_failed(self, replica: Replica, outcome: str) -> int:
        why = {"exited": f"exited ({replica.proc.returncode}) before it was ready",
               "timeout": "did not become ready in time"}[outcome]
        self.say(f"{replica.name} {why}; the end of {replica.log_path}:\n{log_tail(replica.log_path)}")
        return 1

    def _start_router(self) -> int | None:
        spec = self.router_spec()
        self.say(f"sglang-router on port {spec.port} (policy {spec.policy}, metrics {spec.metrics_port}, "
                 f"health checks every {spec.health_check_interval} s)")
        with open(self.router_log, "ab") as log:
            self.router = self.spawn(spec.command(), stdout=log, stderr=subprocess.STDOUT)
        outcome = self.wait_until(lambda: chat_answers(self.router_url, self.api_key),
                                  lambda: self.router.poll() is None, self.args.ready_timeout, interval=1.0)
        if outcome == "stopped":
            return 128 + self.stop_signal
        if outcome != "ready":
            why = (f"exited ({self.router.returncode})" if outcome == "exited"
                   else f"did not answer a chat completion after {self.args.ready_timeout:.0f} s")
            self.say(f"the router {why}; the end of {self.router_log}:\n{log_tail(self.router_log)}")
            return 1
        self.say(f"READY  {len(self.replicas)} replicas behind the router: curl localhost:{self.args.router_port}"
                 "/v1/chat/completions -H 'Content-Type: application/json' -d '{\"model\": \"" + MODEL + "\", "
                 "\"messages\": [{\"role\": \"user\", \"content\": \"Hi\"}]}'")
        return None

    def _serve(self) -> int:
        """Until a stop signal (its exit code), the router's exit or a replica out of restarts (1)."""
        next_health = 0.0
        while self.stop_signal is None:
            if self.router.poll() is not None:
                self.say(f"the router exited ({self.router.returncode}): stopping everything; the end of "
                         f"{self.router_log}:\n{log_tail(self.router_log)}")
                return 1
            for replica in self.replicas:
                if replica.proc.poll() is not None and not self._restart(replica):
                    return 1
            if time.monotonic() > next_health:
                next_health = time.monotonic() + 1.0
                for replica in self.replicas:
                    if not replica.ready and answers_ok(f"{replica.url}/health"):
                        replica.ready = True
                        self.say(f"{replica.name} READY again; the router sends to it once its health checks "
                                 "pass")
            time.sleep(0.2)
        return 128 + self.stop_signal

    def _restart(self, replica: Replica) -> bool:
        why = f"{replica.name} exited ({replica.proc.returncode})"
        self.say(f"{why}; the end of {replica.log_path}:\n{log_tail(replica.log_path, 12)}")
        kill_adopted(keep=self._live_pids())  # its tritonserver, stub and ranks, orphaned to us
        if not replica.budget.take(why, replica.name):
            return False
        for problem in port_problems(replica.named_ports(), wait=self.args.exit_timeout):
            self.say(f"{problem} (restarting {replica.name} anyway)")
        self._start_replica(replica)
        return True

    def _live_pids(self) -> list[int]:
        procs = [self.router, *(r.proc for r in self.replicas)]
        return [p.pid for p in procs if p is not None and p.poll() is None]

    # ------------------------------------------------------------ stop

    def _stop(self) -> None:
        if self.stop_signal is not None:
            self.say(f"signal {signal.Signals(self.stop_signal).name}: stopping the router and "
                     f"{len(self.replicas)} replicas")
        # a replica's own stop takes up to its exit timeout + 5 s
        self.stop_processes([self.router, *(r.proc for r in self.replicas)], self.args.exit_timeout + 10)
        kill_adopted()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m minisgl_backend.cluster", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-repository", required=True)
    p.add_argument("--replicas", type=int, default=3)
    p.add_argument("--http-port", type=int, default=8000, help=f"replica i: this + {PORT_STRIDE} i")
    p.add_argument("--grpc-port", type=int, default=8001, help=f"replica i: this + {PORT_STRIDE} i")
    p.add_argument("--metrics-port", type=int, default=8002, help=f"replica i: this + {PORT_STRIDE} i")
    p.add_argument("--openai-port", type=int, default=9000, help="replica i's OpenAI frontend: this + i")
    p.add_argument("--router-port", type=int, default=30000)
    p.add_argument("--router-metrics-port", type=int, default=29000, help="the router's Prometheus port")
    p.add_argument("--policy", default="cache_aware", choices=POLICIES)
    p.add_argument("--health-check-interval", type=int, default=3, help="seconds between the router's health checks")
    p.add_argument("--router-log-level", default="warn", choices=("debug", "info", "warn", "error"))
    p.add_argument("--router-args", default="", help="more sglang-router flags, one string")
    p.add_argument("--log-dir", default=str(ROOT / "build" / "cluster"), help="replica-<i>.log and router.log")
    p.add_argument("--exit-timeout", type=int, default=15, help="seconds each tritonserver may take to stop")
    p.add_argument("--ready-timeout", type=float, default=900.0)
    p.add_argument("--max-restarts", type=int, default=3, help="restarts per replica (and of each replica's "
                                                               "tritonserver by its own supervisor)")
    p.add_argument("triton_args", nargs="*", help="more tritonserver flags (after --)")
    args = p.parse_args(argv)
    if args.replicas < 1:
        p.error(f"--replicas must be at least 1 (got {args.replicas})")
    return args


def main(argv: list[str] | None = None) -> int:
    supervisor = ClusterSupervisor(parse_args(argv))
    supervisor.install()
    return supervisor.run()


if __name__ == "__main__":
    sys.exit(main())
