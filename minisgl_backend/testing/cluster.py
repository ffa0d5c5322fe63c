"""`make serve-cluster` for tests and benchmarks: the real script (`scripts/serve_cluster.sh`) on
ports that are free, and more sglang-routers in front of its replicas (`ExtraRouter`).

`ServeCluster(...).start()` runs the script in its own session (a terminal's job: a signal to the
group is Ctrl-C), waits for `serve-cluster: READY` and records the process tree; `stop(sig)`
signals it; `leftovers()` says what of that tree or of its ports outlived it; `cleanup()` kills
whatever is left, whatever happened.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from minisgl_backend.checkout import ROOT
from minisgl_backend.cluster import PORT_STRIDE, RouterSpec
from minisgl_backend.ports import free_ports, port_is_free
from minisgl_backend.testing.procinfo import descendants, is_alive
from minisgl_backend.testing.triton import parse_metric

SCRIPT = ROOT / "scripts" / "serve_cluster.sh"


@dataclass(frozen=True)
class ReplicaPorts:
    http: int
    grpc: int
    metrics: int
    openai: int

    @property
    def openai_url(self) -> str:
        return f"http://127.0.0.1:{self.openai}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics}/metrics"

    def metric(self, name: str, labels: dict[str, str] | None = None) -> float:
        with urllib.request.urlopen(self.metrics_url, timeout=10) as resp:
            return parse_metric(resp.read().decode(), name, labels)


def cluster_ports(replicas: int, rng: random.Random | None = None) -> dict[str, int]:
    """A port layout for `serve_cluster.sh` (replica 0's ports, the router's) whose every port
    is free now."""
    rng = rng or random.Random()
    for _ in range(200):
        base = rng.randrange(20000, 60000 - PORT_STRIDE * replicas - 100, 2)
        layout = {"HTTP_PORT": base, "GRPC_PORT": base + 1, "METRICS_PORT": base + 2,
                  "OPENAI_PORT": base + PORT_STRIDE * replicas + 3}
        router, router_metrics = free_ports(2)
        layout.update(ROUTER_PORT=router, ROUTER_METRICS_PORT=router_metrics)
        ports = expand_ports(layout, replicas)
        if len(set(ports)) == len(ports) and all(port_is_free(p) for p in ports):
            return layout
    raise RuntimeError("no free port layout found")


def expand_ports(layout: dict[str, int], replicas: int) -> list[int]:
    out = [layout["ROUTER_PORT"], layout["ROUTER_METRICS_PORT"]]
    for r in replica_ports(layout, replicas):
        out += [r.http, r.grpc, r.metrics, r.openai]
    return out


def replica_ports(layout: dict[str, int], replicas: int) -> list[ReplicaPorts]:
    return [ReplicaPorts(layout["HTTP_PORT"] + PORT_STRIDE * i, layout["GRPC_PORT"] + PORT_STRIDE * i,
                         layout["METRICS_PORT"] + PORT_STRIDE * i, layout["OPENAI_PORT"] + i) for i in range(replicas)]


class ServeCluster:
    def __init__(self, model: str, work_dir: str | os.PathLike, replicas: int = 3, policy: str = "cache_aware",
                 settings: str = "", api_key: str | None = None, env: dict[str, str] | None = None,
                 command: list[str] | None = None) -> None:
        self.work_dir = Path(work_dir)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.replicas_n = replicas
        self.layout = cluster_ports(replicas)
        self.api_key = api_key
        self.log_path = self.work_dir / "serve-cluster.out"
        self.env = {**os.environ, **{k: str(v) for k, v in self.layout.items()}, "MODEL": model,
                    "REPLICAS": str(replicas), "POLICY": policy, "SETTINGS": settings,
                    "CLUSTER_LOG_DIR": str(self.work_dir / "logs"), "HEALTH_INTERVAL": "1", "EXIT_TIMEOUT": "10",
                    "READY_TIMEOUT": "300", **(env or {})}
        self.env.pop("MINISGL_API_KEY", None)
        self.env["API_KEY"] = api_key or ""
        self.command = command or [str(SCRIPT)]
        self.proc: subprocess.Popen | None = None
        self.tree: list[tuple[int, str, str]] = []

    # ------------------------------------------------------------ addresses

    @property
    def router_url(self) -> str:
        return f"http://127.0.0.1:{self.layout['ROUTER_PORT']}"

    @property
    def router_metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.layout['ROUTER_METRICS_PORT']}/metrics"

    @property
    def replicas(self) -> list[ReplicaPorts]:
        return replica_ports(self.layout, self.replicas_n)

    @property
    def ports(self) -> list[int]:
        return expand_ports(self.layout, self.replicas_n)

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def replica_log(self, index: int) -> str:
        return _read(self.work_dir / "logs" / f"replica-{index}.log")

    # ------------------------------------------------------------ life cycle

    def launch(self) -> "ServeCluster":
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(self.command, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        return self

    def start(self, timeout: float = 300.0) -> "ServeCluster":
        self.launch()
        try:
            self.wait_for("serve-cluster: READY", timeout)
        except BaseException:
            self.cleanup()
            raise
        self.tree = descendants(self.proc.pid)
        return self

    def text(self) -> str:
        return _read(self.log_path)

    def wait_for(self, needle: str, timeout: float, count: int = 1) -> None:
        deadline = time.monotonic() + timeout
        while self.text().count(needle) < count:
            if self.proc.poll() is not None:
                raise RuntimeError(f"serve-cluster exited ({self.proc.returncode}):\n{self.text()[-4000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {needle!r} after {timeout:.0f} s:\n{self.text()[-4000:]}")
            time.sleep(0.3)

    def wait_exit(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise TimeoutError(f"serve-cluster still running after {timeout:.0f} s:\n{self.text()[-4000:]}") from None

    def stop(self, sig: int = signal.SIGTERM, group: bool = False) -> None:
        if self.proc is not None and self.proc.poll() is None:
            if group:
                os.killpg(self.proc.pid, sig)
            else:
                self.proc.send_signal(sig)

    def leftovers(self, tree: list[tuple[int, str, str]] | None = None) -> tuple[list, list[int]]:
        """(processes of the recorded tree still alive, ports of the layout still held)."""
        alive = [p for p in (self.tree if tree is None else tree) if is_alive(p[0], p[1])]
        return alive, [port for port in self.ports if not port_is_free(port)]

    def wait_all_gone(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            alive, busy = self.leftovers()
            if not alive and not busy and self.proc.poll() is not None:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"after {timeout:.0f} s: alive {alive}, busy ports {busy}, "
                                     f"rc {self.proc.poll()}\n{self.text()[-3000:]}")
            time.sleep(0.2)

    def cleanup(self) -> None:
        for pid, start, _ in self.tree + (descendants(self.proc.pid) if self.proc else []):
            if is_alive(pid, start):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(10)


class ExtraRouter:
    """One more sglang-router (same flags as serve-cluster's) in front of the given workers."""

    def __init__(self, worker_urls: list[str], policy: str, log_path: str | os.PathLike,
                 health_check_interval: int = 1) -> None:
        port, metrics_port = free_ports(2)
        self.spec = RouterSpec(worker_urls, port, metrics_port, policy, health_check_interval, startup_timeout=120,
                               exit_timeout=5, host="127.0.0.1")
        self.log_path = Path(log_path)
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.spec.port}"

    def start(self, timeout: float = 120.0) -> "ExtraRouter":
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(self.spec.command(), stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + timeout
        while len(self.healthy_workers()) < len(self.spec.worker_urls):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the {self.spec.policy} router did not take its workers:\n"
                                   f"{_read(self.log_path)[-3000:]}")
            time.sleep(0.3)
        return self

    def workers(self) -> dict[str, bool]:
        return router_workers(self.url)

    def healthy_workers(self) -> list[str]:
        return [url for url, healthy in self.workers().items() if healthy]

    def stop(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(15)
                except subprocess.TimeoutExpired:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                    self.proc.wait(5)
            self.proc = None

    def __enter__(self) -> "ExtraRouter":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def router_sent(metrics_url: str, worker_urls: list[str]) -> list[float]:
    """How many requests sglang-router (0.3.2) has had answered by each worker so far, counted when
    the answer starts (its circuit breaker's `smg_worker_cb_outcomes_total{outcome="success"}`),
    in the order of `worker_urls`: which worker took a stream, while it streams."""
    with urllib.request.urlopen(metrics_url, timeout=10) as resp:
        text = resp.read().decode()
    return [parse_metric(text, "smg_worker_cb_outcomes_total", {"worker": url, "outcome": "success"})
            for url in worker_urls]


def router_workers(router_url: str) -> dict[str, bool]:
    """{worker url: healthy} from sglang-router's /workers ({} when it does not answer)."""
    try:
        with urllib.request.urlopen(f"{router_url}/workers", timeout=5) as resp:
            return {w["url"]: bool(w["is_healthy"]) for w in json.load(resp)["workers"]}
    except (OSError, ValueError, KeyError):
        return {}


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


class TreeSampler:
    """Every process seen below `root` while it runs (sampled every `interval` s on a thread), so
    that a run that ends on its own can still be checked for leftovers."""

    def __init__(self, root: int, interval: float = 0.1) -> None:
        self.root = root
        self.interval = interval
        self.seen: dict[tuple[int, str], str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "TreeSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.is_set():
            for pid, start, cmd in descendants(self.root):
                self.seen[(pid, start)] = cmd  # the latest: a wrapper script execs tritonserver
            self._stop.wait(self.interval)

    def alive(self) -> list[tuple[int, str]]:
        return [(pid, cmd) for (pid, start), cmd in self.seen.items() if is_alive(pid, start)]
