"""The scheduler processes of a node (one per TP rank it runs), and node 0's handle on the whole
group: start, talk, supervise, stop."""

from __future__ import annotations

import ctypes
import dataclasses
import gc
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Callable

import zmq

from minisgl_backend.config import EngineConfig
from minisgl_backend.distributed.cluster import ClusterHost
from minisgl_backend.messages import (SchedulerInfo, SchedulerInput, SchedulerOutput, ShutdownMsg, decode_outputs,
                                      decode_ready, encode)
from minisgl_backend.scheduler.io import Addresses

logger = logging.getLogger(__name__)

_READY_TIMEOUT_S = 600.0


def freeze_startup_objects() -> None:
    """In a process of ours (a scheduler, the Triton stub), once started: move every object
    alive now (torch, transformers, the tokenizer and model) out of the collector's reach.
    Otherwise each full collection walks them all, a pause that lands in the middle of streams."""
    gc.collect()
    gc.freeze()


class RankProcesses:
    """This node's scheduler processes (its share of the TP ranks), started as `python -m
    minisgl_backend.launch` rather than with multiprocessing: inside Triton's Python-backend stub
    `sys.executable` is not a Python interpreter. Each child gets SIGKILL when its parent dies,
    so no orphan outlives the server. Node 0's frontend and `minisgl_backend.node` use it."""

    def __init__(self, config: EngineConfig, frontend: bool) -> None:
        self.config = config
        self.ranks = list(config.parallel.local_ranks)
        self.folder = tempfile.mkdtemp(prefix="minisgl-")
        self.addrs = Addresses.in_dir(self.folder, frontend)
        self.procs: list[subprocess.Popen] = []
        self.ctx = zmq.Context()
        self.ready = self.ctx.socket(zmq.PULL)
        self.ready.setsockopt(zmq.LINGER, 0)
        self.ready.bind(self.addrs.ready)

    def start(self, store_addr: str | None) -> None:
        spec = json.dumps({"config": self.config.to_flat(), "addrs": dataclasses.asdict(self.addrs),
                           "store": store_addr})
        for rank in self.ranks:
            self.procs.append(subprocess.Popen(
                [python_executable(), "-m", "minisgl_backend.launch", str(rank), spec],
                preexec_fn=die_with_parent, env=_child_env()))

    def wait_ready(self, timeout_s: float = _READY_TIMEOUT_S,
                   other_failure: Callable[[], str | None] = lambda: None) -> dict[int, SchedulerInfo]:
        """Wait until every rank of this node reported; raises RuntimeError when one failed,
        exited, `other_failure()` names a problem, or `timeout_s` passed."""
        infos: dict[int, SchedulerInfo] = {}
        deadline = time.monotonic() + timeout_s
        while len(infos) < len(self.ranks):
            if self.ready.poll(200):
                msg = decode_ready(self.ready.recv())
                if msg.info is None:
                    raise RuntimeError(f"scheduler rank {msg.rank} failed to start: {msg.error}")
                infos[msg.rank] = msg.info
            elif (problem := other_failure()) is not None:
                raise RuntimeError(problem)
            elif not self.all_alive():
                raise RuntimeError(f"a scheduler process exited during start-up (exit codes {self.exit_codes()})")
            elif time.monotonic() > deadline:
                raise RuntimeError(f"the scheduler did not start within {timeout_s:.0f} s")
        return infos

    def all_alive(self) -> bool:
        return all(p.poll() is None for p in self.procs)

    def exit_codes(self) -> list[int | None]:
        return [p.poll() for p in self.procs]

    def wait_exit(self, timeout_s: float) -> bool:
        """Wait up to `timeout_s` for every process to exit; whether they all did."""
        deadline = time.monotonic() + timeout_s
        for proc in self.procs:
            try:
                proc.wait(max(deadline - time.monotonic(), 0.01))
            except subprocess.TimeoutExpired:
                return False
        return True

    def kill(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
        for proc in self.procs:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                logger.error("scheduler process %d did not exit after SIGKILL", proc.pid)

    def close(self) -> None:
        """Release the sockets and the socket folder; call once nothing uses them anymore."""
        self.ctx.destroy(linger=0)
        shutil.rmtree(self.folder, ignore_errors=True)


class SchedulerProcesses:
    """Node 0's handle on the scheduler processes: serves the group's store (tp_size > 1), admits
    the other nodes, starts this node's ranks, talks to rank 0, notices a dead rank or a lost node."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.cluster: ClusterHost | None = None
        self.ranks = RankProcesses(config, frontend=True)
        self.addrs = self.ranks.addrs
        self.to_rank0 = self.ranks.ctx.socket(zmq.PUSH)
        self.from_rank0 = self.ranks.ctx.socket(zmq.PULL)
        for sock in (self.to_rank0, self.from_rank0):
            sock.setsockopt(zmq.LINGER, 0)
        self.from_rank0.bind(self.addrs.from_rank0)
        self.to_rank0.connect(self.addrs.to_rank0)
        self._send_lock = threading.Lock()

    @property
    def procs(self) -> list[subprocess.Popen]:
        return self.ranks.procs

    def start(self) -> SchedulerInfo:
        """Admit the other nodes, start this node's ranks and wait until all are ready; returns
        rank 0's info. Fails (leaving nothing running) naming what went wrong."""
        try:
            store_addr = None
            if self.config.parallel.tp_size > 1:
                self.cluster = ClusterHost(self.config)
                self.cluster.admit()
                store_addr = join_host_port(self.cluster.host, self.cluster.port)
            self.ranks.start(store_addr)
            try:
                infos = self.ranks.wait_ready(other_failure=self._cluster_failure)
            except RuntimeError as exc:
                raise RuntimeError(self._root_cause(str(exc))) from None
        except Exception as exc:
            self.kill(f"node 0 failed to start: {exc}")
            self.close()
            raise
        return infos[0]

    def send(self, msg: SchedulerInput) -> None:
        with self._send_lock:
            self.to_rank0.send(encode([msg]))

    def recv(self, timeout_ms: int) -> list[SchedulerOutput]:
        if not self.from_rank0.poll(timeout_ms):
            return []
        events: list[SchedulerOutput] = []
        while True:
            try:
                events.extend(decode_outputs(self.from_rank0.recv(zmq.NOBLOCK)))
            except zmq.Again:
                return events

    def all_alive(self) -> bool:
        return self.ranks.all_alive()

    def exit_codes(self) -> list[int | None]:
        return self.ranks.exit_codes()

    def _cluster_failure(self) -> str | None:
        return self.cluster.failure() if self.cluster is not None else None

    def _root_cause(self, local: str, grace_s: float = 2.0) -> str:
        """A rank here that fails in a collective is often only the echo of a rank that failed on
        another node: give that node a moment to report, and name both."""
        if self.cluster is None or not self.cluster.others:
            return local
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            remote = self._cluster_failure()
            if remote is not None:
                return remote if remote in local else f"{remote} (on node 0: {local})"
            time.sleep(0.1)
        return local

    def failure(self, events_flowing: bool) -> str | None:
        """Why the engine cannot serve anymore, or None: another node failed or went silent, or
        (checked only while no events arrive: rank 0 reports its own error first) a rank here died."""
        problem = self._cluster_failure()
        if problem is None and not events_flowing and not self.all_alive():
            problem = f"a scheduler process died (exit codes {self.exit_codes()})"
        return problem

    def stop(self, timeout: float = 10.0) -> None:
        """Ask every rank (on every node) to stop, then make sure none is left behind here."""
        if self.procs and self.all_alive():
            self.send(ShutdownMsg())
            self.ranks.wait_exit(timeout)
        if self.cluster is not None:
            self.cluster.end(clean=True, reason="node 0 unloaded the model")
            missing = self.cluster.wait_done(timeout)
            if missing:
                logger.warning("nodes %s did not confirm that their ranks exited", missing)
        self.ranks.kill()

    def kill(self, reason: str = "the engine failed") -> None:
        """Kill this node's ranks and tell the other nodes to kill theirs."""
        if self.cluster is not None:
            self.cluster.end(clean=False, reason=reason)
        self.ranks.kill()

    def close(self) -> None:
        """Release the sockets, the socket folder and the store; call once nothing uses them anymore."""
        self.ranks.close()
        if self.cluster is not None:
            self.cluster.close()


def join_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def python_executable() -> str:
    """A Python interpreter for the children: ours, unless we are embedded (Triton's stub)."""
    if os.path.basename(sys.executable).startswith("python"):
        return sys.executable
    for candidate in (os.path.join(sys.exec_prefix, "bin", f"python{sys.version_info.major}.{sys.version_info.minor}"),
                      os.path.join(sys.exec_prefix, "bin", "python3"), shutil.which("python3") or ""):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise RuntimeError("no Python interpreter found to start the scheduler processes")


def _child_env() -> dict[str, str]:
    """The children import exactly what this process imports (the venv's packages included)."""
    env = dict(os.environ)
    # A scheduler shares the CPU with tritonserver, the stub and the other ranks: OpenMP threads
    # that spin after each parallel region would burn the cores those need.
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    paths = [p for p in sys.path if p and os.path.isdir(p)]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths + env.get("PYTHONPATH", "").split(os.pathsep)))
    return env


PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
_LIBC = ctypes.CDLL(None, use_errno=True)  # loaded here, not in a forked child (preexec_fn)


def prctl(option: int, value: int) -> None:
    """prctl(2) with one argument (Linux); OSError when the kernel refuses."""
    if _LIBC.prctl(option, value, 0, 0, 0) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"prctl({option}, {value}): {os.strerror(errno)}")


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """A child's preexec_fn: the kernel sends it `sig` when its parent (precisely, the thread
    that started it) ends (PR_SET_PDEATHSIG; kept across exec of a program that is not setuid).
    A process may also arm it on itself."""
    prctl(PR_SET_PDEATHSIG, sig)
