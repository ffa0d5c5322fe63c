"""How a scheduler receives user messages and sends events: in-process queues or ZMQ sockets."""

from __future__ import annotations

import queue
from typing import Callable, Protocol

from minisgl_backend.messages import SchedulerInput, SchedulerOutput


class SchedulerIO(Protocol):
    def recv(self, block: bool) -> list[SchedulerInput]:
        """New messages; with `block`, wait until at least one arrives."""

    def send(self, events: list[SchedulerOutput]) -> None:
        """Hand events to the frontend (rank 0 only; other ranks drop them)."""


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
