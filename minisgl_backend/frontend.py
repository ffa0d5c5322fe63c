"""The frontend of the scheduler processes: starts them, routes requests through a
`RequestRouter`, and watches for engine death. The Triton model and a multi-rank `LLM` use it."""

from __future__ import annotations

import logging
import threading
from typing import Callable

from minisgl_backend.config import EngineConfig
from minisgl_backend.lora.registry import registry_for, unload_lora
from minisgl_backend.messages import ErrorEvent, SchedulerInfo, StatsEvent
from minisgl_backend.processes import SchedulerProcesses
from minisgl_backend.router import Consumer, RequestRouter, RequestStream, StreamOutput
from minisgl_backend.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class Frontend:
    """Owns the scheduler processes (node 0's TP ranks, and through them the group of every
    node) and the router of in-flight requests.

    `deliver`: see `RequestRouter`; None delivers each output from the receiving thread.
    """

    def __init__(self, config: EngineConfig, deliver: Callable[[RequestStream], None] | None = None,
                 lora_modules: dict[str, str] | None = None) -> None:
        from minisgl_backend.tokenizer import load_tokenizer

        self.config = config
        self.lora = registry_for(config, lora_modules)  # checked before any process starts
        self.tokenizer = load_tokenizer(config.model.model_path)
        self._procs = SchedulerProcesses(config)
        self.info: SchedulerInfo = self._procs.start()
        self.context_len = self.info.context_len
        self.router = RequestRouter(self.tokenizer, self.context_len, self._procs.send, deliver,
                                    config.frontend.stream_interval, config.fault.inject_detokenize_fault_seed,
                                    self.lora)
        self._stats: StatsEvent | None = None
        self._healthy = True
        self._closed = False
        self._receiver = threading.Thread(target=self._receive_loop, name="minisgl-frontend-recv", daemon=True)
        self._receiver.start()

    # ------------------------------------------------------------ public API

    def submit(self, prompt: str | list[int], params: SamplingParams, consumer: Consumer,
               stream: bool = True) -> int:
        return self.router.submit(prompt, params, consumer, stream)

    def check_prompt(self, prompt: str | list[int]) -> None:
        self.router.prepare(prompt)

    def abort(self, rid: int) -> None:
        self.router.abort(rid)

    def unload_lora(self, name: str) -> None:
        """Forget adapter `name` (AdapterError while requests of it run); the ranks drop its slot."""
        unload_lora(self.router, name, self._procs.send)

    def take(self, stream: RequestStream) -> StreamOutput | None:
        return self.router.take(stream)

    def stats(self) -> StatsEvent | None:
        return self._stats

    def is_healthy(self) -> bool:
        return self._healthy and not self._closed

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True  # first: the receiver must not mistake the stop for a crash
        self._receiver.join(timeout=5)
        self._procs.stop()
        self._procs.close()
        self.router.close("the server is shutting down")

    # ------------------------------------------------------------ receiving

    def _receive_loop(self) -> None:
        while not self._closed:
            events = self._procs.recv(timeout_ms=100)
            for event in self.router.dispatch(events):
                if isinstance(event, StatsEvent):
                    self._stats = event
                elif isinstance(event, ErrorEvent):
                    self._on_engine_death(event.message)
            problem = None if self._closed else self._procs.failure(events_flowing=bool(events))
            if problem is not None:
                self._on_engine_death(problem)
                return

    def _on_engine_death(self, message: str) -> None:
        """A rank died or failed, or another node did (or went silent): fail what is in flight,
        refuse new requests, and end the group on every node."""
        if not self._healthy:
            return
        self._healthy = False
        logger.error("engine failure: %s", message)
        self.router.close(f"engine failure: {message}")
        self._procs.kill(f"engine failure: {message}")
