"""The frontend's handle on the scheduler processes (one per TP rank): start, talk, supervise, stop."""

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

import zmq

from minisgl_backend.config import EngineConfig
from minisgl_backend.messages import (SchedulerInfo, SchedulerInput, SchedulerOutput, ShutdownMsg, decode_outputs,
                                      decode_ready, encode)
from minisgl_backend.ports import free_port
from minisgl_backend.scheduler.io import Addresses

logger = logging.getLogger(__name__)

_READY_TIMEOUT_S = 600.0


def freeze_startup_objects() -> None:
    """In a process of ours (a scheduler, the Triton stub), once started: move every object
    alive now (torch, transformers, the tokenizer and model) out of the collector's reach.
    Otherwise each full collection walks them all, a pause that lands in the middle of streams."""
    gc.collect()
    gc.freeze()


class SchedulerProcesses:
    """They are started as `python -m minisgl_backend.launch` rather than with multiprocessing:
    inside Triton's Python-backend stub `sys.executable` is not a Python interpreter. Each child
    gets SIGKILL when its parent dies, so no orphan outlives the server.
    """

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.tp_size = config.parallel.tp_size
        self.folder = tempfile.mkdtemp(prefix="minisgl-")
        self.addrs = Addresses.in_dir(self.folder, self.tp_size)
        self.procs: list[subprocess.Popen] = []
        self.ctx = zmq.Context()
        self.to_rank0 = self.ctx.socket(zmq.PUSH)
        self.from_rank0 = self.ctx.socket(zmq.PULL)
        self.ready = self.ctx.socket(zmq.PULL)
        for sock in (self.to_rank0, self.from_rank0, self.ready):
            sock.setsockopt(zmq.LINGER, 0)
        self.from_rank0.bind(self.addrs.from_rank0)
        self.ready.bind(self.addrs.ready)
        self.to_rank0.connect(self.addrs.to_rank0)
        self._send_lock = threading.Lock()

    def start(self) -> SchedulerInfo:
        """Start every rank and wait until all are ready; returns rank 0's info."""
        flat = self.config.to_flat()
        if self.tp_size > 1 and not flat["master_port"]:
            flat["master_port"] = free_port()
        spec = json.dumps({"config": flat, "addrs": dataclasses.asdict(self.addrs)})
        for rank in range(self.tp_size):
            self.procs.append(subprocess.Popen(
                [python_executable(), "-m", "minisgl_backend.launch", str(rank), spec],
                preexec_fn=die_with_parent, env=_child_env()))
        try:
            infos = self._wait_ready()
        except Exception:
            self.kill()
            self.close()
            raise
        return infos[0]

    def _wait_ready(self) -> dict[int, SchedulerInfo]:
        infos: dict[int, SchedulerInfo] = {}
        deadline = time.monotonic() + _READY_TIMEOUT_S
        while len(infos) < self.tp_size:
            if self.ready.poll(200):
                msg = decode_ready(self.ready.recv())
                if msg.info is None:
                    raise RuntimeError(f"scheduler rank {msg.rank} failed to start: {msg.error}")
                infos[msg.rank] = msg.info
            elif not self.all_alive():
                raise RuntimeError(f"a scheduler process exited during start-up (exit codes {self.exit_codes()})")
            elif time.monotonic() > deadline:
                raise RuntimeError(f"the scheduler did not start within {_READY_TIMEOUT_S:.0f} s")
        return infos

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
        return all(p.poll() is None for p in self.procs)

    def exit_codes(self) -> list[int | None]:
        return [p.poll() for p in self.procs]

    def stop(self, timeout: float = 10.0) -> None:
        """Ask every rank to stop, then make sure none is left behind."""
        if self.procs and self.all_alive():
            self.send(ShutdownMsg())
            deadline = time.monotonic() + timeout
            for proc in self.procs:
                try:
                    proc.wait(max(deadline - time.monotonic(), 0.1))
                except subprocess.TimeoutExpired:
                    break
        self.kill()

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
