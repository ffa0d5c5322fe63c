"""How a scheduler receives user messages and sends events: in-process queues or ZMQ sockets.

frontend --PUSH--> rank 0 --PUSH--> ranks 1..N-1   (user messages, re-sent once per step)
frontend <--PULL-- rank 0                            (token and stats events)
"""

from __future__ import annotations

import os
import queue
from dataclasses import dataclass
from typing import Callable, Protocol

import zmq

from minisgl_backend.messages import SchedulerInput, SchedulerOutput, decode_inputs, encode


class SchedulerIO(Protocol):
    def recv(self, block: bool) -> list[SchedulerInput]:
        """New messages; with `block`, wait until at least one arrives."""

    def send(self, events: list[SchedulerOutput]) -> None:
        """Hand events to the frontend (rank 0 only; other ranks drop them)."""

    def close(self) -> None: ...


class LocalIO:
    """In-process IO for the offline API: the caller puts messages and reads events directly."""

    def __init__(self, listener: Callable[[list[SchedulerOutput]], None] | None = None) -> None:
        self.inbox: queue.SimpleQueue[SchedulerInput] = queue.SimpleQueue()
        self.outbox: list[SchedulerOutput] = []
        self.listener = listener  # called with each batch of events, inside the scheduler loop

    def put(self, msg: SchedulerInput) -> None:
        self.inbox.put(msg)

    def recv(self, block: bool) -> list[SchedulerInput]:
        msgs: list[SchedulerInput] = []
        if block:
            msgs.append(self.inbox.get())
        while True:
            try:
                msgs.append(self.inbox.get_nowait())
            except queue.Empty:
                return msgs

    def send(self, events: list[SchedulerOutput]) -> None:
        if self.listener is not None:
            self.listener(events)
        else:
            self.outbox.extend(events)

    def close(self) -> None:
        pass


@dataclass
class Addresses:
    """The ZMQ endpoints between the frontend and the scheduler processes."""

    to_rank0: str
    from_rank0: str
    to_ranks: list[str]  # rank 0 -> rank r, for r >= 1
    ready: str  # every rank -> the parent, once, when started (or failed)

    @classmethod
    def in_dir(cls, folder: str, tp_size: int) -> "Addresses":
        ipc = lambda name: f"ipc://{os.path.join(folder, name)}"  # noqa: E731
        return cls(ipc("in"), ipc("out"), [ipc(f"rank{r}") for r in range(1, tp_size)], ipc("ready"))


class ZmqSchedulerIO:
    """The scheduler side of the ZMQ links. Rank 0 relays every batch of messages it reads, even
    an empty one, to the other ranks, so that all ranks step through the same messages in lock-step."""

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
            return decode_inputs(self.inbox.recv())
        msgs: list[SchedulerInput] = []
        if block:
            msgs.extend(decode_inputs(self.inbox.recv()))
        while True:
            try:
                msgs.extend(decode_inputs(self.inbox.recv(zmq.NOBLOCK)))
            except zmq.Again:
                break
        if self.relays:
            packet = encode(msgs)
            for relay in self.relays:
                relay.send(packet)
        return msgs

    def send(self, events: list[SchedulerOutput]) -> None:
        if self.outbox is not None:
            self.outbox.send(encode(events))

    def close(self) -> None:
        self.ctx.destroy(linger=0)
