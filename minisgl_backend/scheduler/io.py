"""How a scheduler receives user messages and sends events: in-process queues or ZMQ sockets.

frontend --PUSH--> rank 0 --PUSH--> ranks 1..N-1   (user messages, re-sent once per step)
frontend <--PULL-- rank 0                            (token and stats events)

The frontend links are ipc:// (rank 0 runs beside the frontend). Rank 0's relay to a rank on its
own node is ipc:// too, to a rank on another node tcp:// (bound on a free port, on `node_addr`
or every interface); rank 0 publishes each rank's endpoint in the group's store and that rank
connects to it, so no address is configured and no ipc:// address leaves its host.
"""

from __future__ import annotations

import os
import queue
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Protocol

import zmq

from minisgl_backend.config import EngineConfig
from minisgl_backend.distributed.store import key
from minisgl_backend.messages import SchedulerInput, SchedulerOutput, decode_inputs, encode

if TYPE_CHECKING:
    from torch.distributed import Store


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
    """The ZMQ endpoints between a node's parent process and its scheduler processes."""

    to_rank0: str  # node 0's frontend -> rank 0 ("" on other nodes)
    from_rank0: str  # rank 0 -> node 0's frontend ("" on other nodes)
    ready: str  # every rank of the node -> its parent, once, when started (or failed)
    folder: str  # the node's socket folder (rank 0's ipc:// relays to the ranks beside it)

    @classmethod
    def in_dir(cls, folder: str, frontend: bool) -> "Addresses":
        ipc = lambda name: f"ipc://{os.path.join(folder, name)}"  # noqa: E731
        return cls(ipc("in") if frontend else "", ipc("out") if frontend else "", ipc("ready"), folder)


class ZmqSchedulerIO:
    """The scheduler side of the ZMQ links. Rank 0 relays every batch of messages it reads, even
    an empty one, to the other ranks, so that all ranks step through the same messages in
    lock-step. `store`: the group's store (tp_size > 1), where the relay endpoints meet."""

    def __init__(self, rank: int, addrs: Addresses, config: EngineConfig, store: Store | None = None) -> None:
        self.rank = rank
        self.ctx = zmq.Context()
        if rank == 0:
            self.inbox = self._socket(zmq.PULL, addrs.to_rank0, bind=True)
            self.outbox = self._socket(zmq.PUSH, addrs.from_rank0, bind=False)
            self.relays = [self._bind_relay(r, addrs, config, store) for r in range(1, config.parallel.tp_size)]
        else:
            endpoint = store.get(relay_key(rank)).decode()
            self.inbox = self._socket(zmq.PULL, endpoint, bind=False)
            self.outbox, self.relays = None, []

    def _socket(self, kind: int, addr: str, bind: bool) -> zmq.Socket:
        sock = self.ctx.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        if addr.startswith("tcp://"):
            sock.setsockopt(zmq.IPV6, 1)  # IPv6 peers too (IPv4 ones are unaffected)
        sock.bind(addr) if bind else sock.connect(addr)
        return sock

    def _bind_relay(self, rank: int, addrs: Addresses, config: EngineConfig, store: Store) -> zmq.Socket:
        par = config.parallel
        if rank in par.local_ranks:
            endpoint = f"ipc://{os.path.join(addrs.folder, f'rank{rank}')}"
            sock = self._socket(zmq.PUSH, endpoint, bind=True)
        else:
            sock = self._socket(zmq.PUSH, f"tcp://{par.node_addr or '*'}:0", bind=True)
            port = sock.getsockopt_string(zmq.LAST_ENDPOINT).rsplit(":", 1)[1]
            host = par.node_addr or par.init_address()[0]
            endpoint = f"tcp://{'[' + host + ']' if ':' in host else host}:{port}"
        store.set(relay_key(rank), endpoint)
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


def relay_key(rank: int) -> str:
    """Where rank 0 publishes the endpoint rank `rank` reads its messages from."""
    return key("relay", rank)
