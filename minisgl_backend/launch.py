"""Starting and stopping the scheduler processes (one per TP rank) and the ZMQ links to them.

frontend --PUSH--> rank 0 --PUSH--> ranks 1..N-1   (user messages, re-sent once per step)
frontend <--PULL-- rank 0                            (token and stats events)
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import logging
import os
import signal
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Any

import msgspec
import zmq

from minisgl_backend.config import EngineConfig
from minisgl_backend.messages import ErrorEvent, SchedulerInput, SchedulerOutput, ShutdownMsg

logger = logging.getLogger(__name__)

_ENCODER = msgspec.msgpack.Encoder()
_INPUT_DECODER = msgspec.msgpack.Decoder(list[SchedulerInput])
_OUTPUT_DECODER = msgspec.msgpack.Decoder(list[SchedulerOutput])
_READY_TIMEOUT_S = 600.0


@dataclass
class Addresses:
    to_rank0: str
    from_rank0: str
    to_ranks: list[str]  # rank 0 -> rank r, for r >= 1
    ready: str  # every rank -> the parent, once, when started (or failed)

    @classmethod
    def in_dir(cls, folder: str, tp_size: int) -> "Addresses":
        ipc = lambda name: f"ipc://{os.path.join(folder, name)}"  # noqa: E731
        return cls(ipc("in"), ipc("out"), [ipc(f"rank{r}") for r in range(1, tp_size)], ipc("ready"))


class ZmqSchedulerIO:
    """The scheduler side. Rank 0 relays every batch of messages it reads, even an empty one,
    to the other ranks, so that all ranks step through the same messages in lock-step."""

    def __init__(self, rank: int, addrs: Addresses) -> None:
        self.rank = rank
        self.ctx = zmq.Context()
        if rank == 0:
            self.inbox = self._socket(zmq.PULL, addrs.to_rank0, bind=True)
            self.outbox = self._socket(zmq.PUSH, addrs.from_rank0, bind=False)
            self.relays = [self._socket(zmq.PUSH, a, bind=True) for a in addrs.to_ranks]
        else:
            self.inbox = self._socket(zmq.PULL, addrs.to_ranks[rank - 1], bind=False)
            self.outbox, self.relays = None, []

    def _socket(self, kind: int, addr: str, bind: bool) -> zmq.Socket:
        sock = self.ctx.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        sock.bind(addr) if bind else sock.connect(addr)
        return sock

    def recv(self, block: bool) -> list[SchedulerInput]:
        if self.rank != 0:
            return _INPUT_DECODER.decode(self.inbox.recv())
        msgs: list[SchedulerInput] = []
        if block:
            msgs.extend(_INPUT_DECODER.decode(self.inbox.recv()))
        while True:
            try:
                msgs.extend(_INPUT_DECODER.decode(self.inbox.recv(zmq.NOBLOCK)))
            except zmq.Again:
                break
        if self.relays:
            packet = _ENCODER.encode(msgs)
            for relay in self.relays:
                relay.send(packet)
        return msgs

    def send(self, events: list[SchedulerOutput]) -> None:
        if self.outbox is not None:
            self.outbox.send(_ENCODER.encode(events))

    def close(self) -> None:
        self.ctx.destroy(linger=0)


def scheduler_main(flat_config: dict[str, Any], rank: int, addrs: Addresses) -> None:
    """Entry point of a scheduler process; reports readiness (or the start-up error) to the parent."""
    logging.basicConfig(level=os.environ.get("MINISGL_LOG_LEVEL", "WARNING"),
                        format=f"[minisgl rank{rank}] %(levelname)s %(name)s: %(message)s")
    ctx = zmq.Context()
    ready = ctx.socket(zmq.PUSH)
    ready.setsockopt(zmq.LINGER, 2000)
    ready.connect(addrs.ready)
    try:
        scheduler = _start_scheduler(flat_config, rank, addrs, ready)
        _serve(scheduler, rank)
    finally:
        ctx.destroy(linger=2000)


def _start_scheduler(flat_config: dict[str, Any], rank: int, addrs: Addresses, ready: zmq.Socket):
    try:
        config = EngineConfig.from_flat(flat_config)
        scheduler = build_scheduler(config, rank, io_factory=lambda: ZmqSchedulerIO(rank, addrs))
    except Exception as exc:  # report start-up failures to the parent instead of hanging it
        logger.error("scheduler rank %d failed to start: %s", rank, traceback.format_exc())
        ready.send_json({"ok": False, "rank": rank, "error": f"{type(exc).__name__}: {exc}"})
        raise SystemExit(1)
    ready.send_json({"ok": True, "rank": rank, **scheduler_info(scheduler)})
    return scheduler


def _serve(scheduler, rank: int) -> None:
    try:
        scheduler.run_forever()
    except Exception as exc:  # the engine broke: tell the frontend, which fails every request
        logger.error("scheduler rank %d failed: %s", rank, traceback.format_exc())
        scheduler.io.send([ErrorEvent(f"rank {rank}: {type(exc).__name__}: {exc}")])
        raise SystemExit(1)
    finally:
        scheduler.io.close()


def build_scheduler(config: EngineConfig, rank: int, io_factory):
    """Engine + scheduler of one rank, TP group initialised first when tp_size > 1."""
    import torch

    from minisgl_backend.distributed.group import init_distributed
    from minisgl_backend.engine.engine import Engine
    from minisgl_backend.scheduler.scheduler import Scheduler

    if config.device == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // config.parallel.tp_size))
    num_pages_min = init_distributed(config, rank)
    engine = Engine(config)
    num_pages = num_pages_min(engine.num_pages)
    return Scheduler(config, engine, io_factory(), num_pages=num_pages)


def scheduler_info(scheduler) -> dict[str, Any]:
    return {"context_len": scheduler.context_len, "vocab_size": scheduler.vocab_size,
            "num_pages": scheduler.cache.num_pages, "page_size": scheduler.cache.page_size}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SchedulerProcesses:
    """The frontend's handle on the scheduler processes.

    They are started as `python -m minisgl_backend.launch` rather than with multiprocessing:
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

    def start(self) -> dict[str, Any]:
        flat = self.config.to_flat()
        if self.tp_size > 1 and not flat["master_port"]:
            flat["master_port"] = free_port()
        spec = json.dumps({"config": flat, "addrs": dataclasses.asdict(self.addrs)})
        for rank in range(self.tp_size):
            self.procs.append(subprocess.Popen(
                [python_executable(), "-m", "minisgl_backend.launch", str(rank), spec],
                preexec_fn=_die_with_parent, env=_child_env()))
        try:
            infos = self._wait_ready()
        except Exception:
            self.kill()
            self.close()
            raise
        return infos[0]

    def _wait_ready(self) -> dict[int, dict[str, Any]]:
        infos: dict[int, dict[str, Any]] = {}
        deadline = time.monotonic() + _READY_TIMEOUT_S
        while len(infos) < self.tp_size:
            if self.ready.poll(200):
                info = self.ready.recv_json()
                if not info.get("ok"):
                    raise RuntimeError(f"scheduler rank {info.get('rank')} failed to start: {info.get('error')}")
                infos[info["rank"]] = info
            elif not self.all_alive():
                raise RuntimeError(f"a scheduler process exited during start-up (exit codes {self.exit_codes()})")
            elif time.monotonic() > deadline:
                raise RuntimeError(f"the scheduler did not start within {_READY_TIMEOUT_S:.0f} s")
        return infos

    def send(self, msg: SchedulerInput) -> None:
        with self._send_lock:
            self.to_rank0.send(_ENCODER.encode([msg]))

    def recv(self, timeout_ms: int) -> list[SchedulerOutput]:
        if not self.from_rank0.poll(timeout_ms):
            return []
        events: list[SchedulerOutput] = []
        while True:
            try:
                events.extend(_OUTPUT_DECODER.decode(self.from_rank0.recv(zmq.NOBLOCK)))
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
    paths = [p for p in sys.path if p and os.path.isdir(p)]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths + env.get("PYTHONPATH", "").split(os.pathsep)))
    return env


def _die_with_parent() -> None:
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _main(argv: list[str]) -> None:
    rank, spec = int(argv[1]), json.loads(argv[2])
    scheduler_main(spec["config"], rank, Addresses(**spec["addrs"]))


if __name__ == "__main__":
    _main(sys.argv)
