"""Starting and stopping the scheduler processes (one per TP rank) and the ZMQ links to them.

frontend --PUSH--> rank 0 --PUSH--> ranks 1..N-1   (user messages, re-sent once per step)
frontend <--PULL-- rank 0                            (token and stats events)
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import shutil
import socket
import tempfile
import threading
import traceback
from dataclasses import dataclass
from typing import Any

import msgspec
import zmq

from minisgl_backend.config import EngineConfig
from minisgl_backend.core import SchedulerInput, SchedulerOutput, ShutdownMsg

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

    @classmethod
    def in_dir(cls, folder: str, tp_size: int) -> "Addresses":
        ipc = lambda name: f"ipc://{os.path.join(folder, name)}"  # noqa: E731
        return cls(ipc("in"), ipc("out"), [ipc(f"rank{r}") for r in range(1, tp_size)])


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


def scheduler_main(flat_config: dict[str, Any], rank: int, addrs: Addresses, ready: Any) -> None:
    """Entry point of a scheduler process."""
    logging.basicConfig(level=os.environ.get("MINISGL_LOG_LEVEL", "WARNING"),
                        format=f"[minisgl rank{rank}] %(levelname)s %(name)s: %(message)s")
    io = None
    try:
        config = EngineConfig.from_flat(flat_config)
        scheduler = build_scheduler(config, rank, io_factory=lambda: ZmqSchedulerIO(rank, addrs))
        io = scheduler.io
        ready.send({"ok": True, "rank": rank, **scheduler_info(scheduler)})
        scheduler.run_forever()
    except Exception as exc:  # report start-up failures to the parent instead of hanging it
        logger.error("scheduler rank %d failed: %s", rank, traceback.format_exc())
        try:
            ready.send({"ok": False, "rank": rank, "error": f"{type(exc).__name__}: {exc}"})
        except Exception:
            pass
        raise SystemExit(1)
    finally:
        if io is not None:
            io.close()


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
    """The frontend's handle on the scheduler processes."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.tp_size = config.parallel.tp_size
        self.folder = tempfile.mkdtemp(prefix="minisgl-")
        self.addrs = Addresses.in_dir(self.folder, self.tp_size)
        self.procs: list[mp.process.BaseProcess] = []
        self.ctx = zmq.Context()
        self.to_rank0 = self.ctx.socket(zmq.PUSH)
        self.from_rank0 = self.ctx.socket(zmq.PULL)
        for sock in (self.to_rank0, self.from_rank0):
            sock.setsockopt(zmq.LINGER, 0)
        self.from_rank0.bind(self.addrs.from_rank0)
        self.to_rank0.connect(self.addrs.to_rank0)
        self._send_lock = threading.Lock()

    def start(self) -> dict[str, Any]:
        flat = self.config.to_flat()
        if self.tp_size > 1 and not flat["master_port"]:
            flat["master_port"] = free_port()
        spawn = mp.get_context("spawn")
        pipes = []
        for rank in range(self.tp_size):
            parent, child = spawn.Pipe(duplex=False)
            proc = spawn.Process(target=scheduler_main, args=(flat, rank, self.addrs, child),
                                 name=f"minisgl-scheduler-{rank}", daemon=True)
            proc.start()
            child.close()
            self.procs.append(proc)
            pipes.append(parent)
        try:
            infos = [self._wait_ready(p, rank) for rank, p in enumerate(pipes)]
        except Exception:
            self.close()
            raise
        return infos[0]

    def _wait_ready(self, pipe: Any, rank: int) -> dict[str, Any]:
        if not pipe.poll(_READY_TIMEOUT_S):
            self.kill()
            raise RuntimeError(f"scheduler rank {rank} did not start within {_READY_TIMEOUT_S:.0f} s")
        try:
            info = pipe.recv()
        except EOFError:
            info = {"ok": False, "error": f"exited with code {self.procs[rank].exitcode}"}
        if not info.get("ok"):
            self.kill()
            raise RuntimeError(f"scheduler rank {rank} failed to start: {info.get('error')}")
        return info

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
        return all(p.is_alive() for p in self.procs)

    def exit_codes(self) -> list[int | None]:
        return [p.exitcode for p in self.procs]

    def stop(self, timeout: float = 10.0) -> None:
        """Ask every rank to stop, then make sure none is left behind."""
        if any(p.is_alive() for p in self.procs):
            try:
                self.send(ShutdownMsg())
            except zmq.ZMQError:
                pass
        for proc in self.procs:
            proc.join(timeout)
        self.kill()

    def kill(self) -> None:
        for proc in self.procs:
            if proc.is_alive():
                proc.kill()
        for proc in self.procs:
            proc.join(5)

    def close(self) -> None:
        """Release the sockets and the socket folder; call once nothing uses them anymore."""
        self.ctx.destroy(linger=0)
        shutil.rmtree(self.folder, ignore_errors=True)
